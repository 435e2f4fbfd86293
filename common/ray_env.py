"""Environment variables that Ray and Serve read when their processes start, and the folder
(with its short link) that they name for Serve's HAProxy files.

Kept apart from `ray_apps.local` (which imports Serve and FastAPI) so that light processes, such
as the load benchmark's client, can name the same settings without loading the app."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

# Ray puts Serve's HAProxy files under <base>/<56-character node id>/, and HAProxy binds its admin
# socket as `admin.sock.<pid>.tmp` first: with a unix socket path's 107 bytes, <base> may be 27.
HAPROXY_BASE_MAX_LEN = 27
HAPROXY_FILE_VARIABLES = {  # Ray's variable -> the file's name under <base>; Ray's default base is /tmp/haproxy-serve
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
}
LINK_DIR = Path("/tmp")  # not $TMPDIR, which can be long (macOS)

# Ray Train's controller moves one step per health-check poll (every 2 s by default): starting the
# worker group, taking a report, seeing the run finish each wait for the next poll. At 0.2 s a
# 3-report fit whose worker imports the two-tower module took 14.7-20.1 s on the 2-core machine
# instead of 20.8-26.4 (docs/scaling.md F40); a pipeline run has four fits. A poll is one small
# actor call per worker, and one that misses is awaited in the next round, not failed.
# Train's preemption watcher, one more actor process per fit, only logs drained nodes (spot
# preemption), which a local one-node Ray never has: without it a tiny 2-member ensemble fit took
# 24.3-26.7 s instead of 27.8-29.6 (docs/scaling.md F47).
RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def use_train_env() -> None:
    """Put `RAY_TRAIN_ENV` in this process's environment where unset, before it starts a local
    Ray: Ray's processes, Train's controller among them, inherit it."""
    for name, value in RAY_TRAIN_ENV.items():
        os.environ.setdefault(name, value)


def ray_serving_env(haproxy: bool, worker_niceness: int, control_loop_interval_s: float,
                    drain_s: float) -> dict[str, str]:
    """Environment of the Ray processes that serve: Serve's HAProxy ingress on or off, the
    niceness Ray adds to its workers (replicas, and the HAProxy one of them starts), how often
    Serve's controller runs its control loop, and how long a stopped replica behind HAProxy still
    answers (common.config.ServeConfig says why each)."""
    return {"RAY_SERVE_ENABLE_HA_PROXY": "1" if haproxy else "0", "RAY_worker_niceness": str(worker_niceness),
            "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": repr(float(control_loop_interval_s)),
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": repr(float(drain_s))}


def haproxy_files_env(directory: Path) -> dict[str, str]:
    """Environment that puts Serve's HAProxy files (config, server state, admin and metrics
    sockets, HAProxy's output) in `directory`, instead of /tmp/haproxy-serve where every Ray head
    would leave a folder. A `directory` too long for the sockets is named through a short link
    in /tmp (`haproxy_link`): the files themselves stay in `directory`."""
    directory = directory.absolute()  # the link's target, and the string its name is hashed from
    directory.mkdir(parents=True, exist_ok=True)
    base = directory if len(str(directory)) <= HAPROXY_BASE_MAX_LEN else haproxy_link(directory)
    return {var: str(base / name) if name else str(base) for var, name in HAPROXY_FILE_VARIABLES.items()}


def new_head_haproxy_env(directory: Path) -> dict[str, str]:
    """`haproxy_files_env` for a Ray head about to start: `directory` first emptied of what earlier
    heads left there (`clear_haproxy_dir`)."""
    clear_haproxy_dir(directory)
    return haproxy_files_env(directory)


def _link_path(directory: Path) -> Path:
    return LINK_DIR / f"rrh-{hashlib.sha1(str(directory.absolute()).encode()).hexdigest()[:10]}"


def haproxy_link(directory: Path) -> Path:
    """/tmp/rrh-<hash of `directory`>, a symlink to it (made, or repointed if it is a stale link)."""
    directory, link = directory.absolute(), _link_path(directory)
    for _ in range(2):  # again if another process made the link between the check and the create
        if link.is_symlink() and os.readlink(link) == str(directory):
            return link
        if link.is_symlink():
            link.unlink(missing_ok=True)
        elif link.exists():
            raise RuntimeError(f"{link} exists and is not a link: it cannot name HAProxy's folder {directory}")
        try:
            link.symlink_to(directory, target_is_directory=True)
        except FileExistsError:
            continue
        return link
    raise RuntimeError(f"could not link {link} to {directory}")


def remove_haproxy_link(directory: Path) -> None:
    """Remove the link `haproxy_files_env` made for `directory`, if any (when its head stops)."""
    link = _link_path(directory)
    if link.is_symlink() and os.readlink(link) == str(directory.absolute()):
        link.unlink(missing_ok=True)


def clear_haproxy_dir(directory: Path) -> None:
    """Empty `directory` of what earlier heads left there (a folder per Ray node id, each with its
    config, sockets and HAProxy's output); call it before a new head starts."""
    if directory.is_dir():
        for child in directory.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
