"""Test MariaDB servers that a crashed test session left running, found and stopped.

A local MariaDB is launched detached (feature_store.local_db: it outlives the process that
started it, as `rayrec db start` needs), so a test session killed before its fixtures' teardown
leaves its servers running. Every server a session starts has its data dir under that session's
pytest temp folder (<root>/pytest-<N>/...), and each session writes its pid there (OWNER_FILE):
a server whose session is not running any more is a leak.
"""
from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterable
from pathlib import Path

from feature_store.local_db import _alive

OWNER_FILE = ".rayrec_session_pid"
SERVER_NAMES = ("mariadbd", "mysqld")
SESSION_NAME = re.compile(r"pytest-\d+")  # the session folders pytest numbers under its root


def claim_session(basetemp: Path) -> None:
    """Mark `basetemp` as this process's session folder."""
    (basetemp / OWNER_FILE).write_text(str(os.getpid()))


def processes() -> Iterable[tuple[int, list[str]]]:
    """(pid, command line) of every process /proc shows."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:  # it exited meanwhile
            continue
        yield int(proc.name), [c.decode(errors="replace") for c in cmd if c]


def leaked_servers(root: Path, current: Path, procs: Iterable[tuple[int, list[str]]],
                   alive=_alive) -> list[tuple[int, str]]:
    """(pid, data dir) of the servers under `root` whose session (a `pytest-<N>` folder of `root`)
    is not `current` and has no live owner: its OWNER_FILE is missing or names a process that ended."""
    out = []
    for pid, cmd in procs:
        if not cmd or Path(cmd[0]).name not in SERVER_NAMES:
            continue
        datadir = next((a.split("=", 1)[1] for a in cmd if a.startswith("--datadir=")), None)
        if datadir is None or not Path(datadir).is_relative_to(root):
            continue
        session = root / Path(datadir).relative_to(root).parts[0]
        if session == current or not SESSION_NAME.fullmatch(session.name):
            continue  # ours, or not a folder pytest numbered (under a --basetemp's parent: a user's own files)
        try:
            owner = int((session / OWNER_FILE).read_text())
        except (OSError, ValueError):
            owner = None
        if owner is None or not alive(owner):
            out.append((pid, datadir))
    return out


def stop(pid: int, timeout_s: float = 20.0) -> None:
    """SIGTERM (MariaDB shuts down cleanly on it), then SIGKILL after `timeout_s`."""
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not _alive(pid):  # gone, or a zombie
                return
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return


def reap(root: Path, current: Path) -> list[tuple[int, str]]:
    """Stop the servers earlier, ended sessions left running; returns what was stopped."""
    found = leaked_servers(root, current, processes())
    for pid, _ in found:
        stop(pid)
    return found
