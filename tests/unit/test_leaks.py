"""Which test MariaDBs count as left behind by a crashed session (tests/leaks.py)."""
from __future__ import annotations

from pathlib import Path

import leaks


def _server(datadir: Path) -> list[str]:
    return ["/usr/sbin/mariadbd", "--no-defaults", f"--datadir={datadir}", "--port=3307"]


def test_only_servers_of_ended_sessions_under_the_root_are_leaks(tmp_path: Path):
    root = tmp_path / "pytest-of-me"
    current, running, ended, unowned = (root / f"pytest-{i}" for i in range(4))
    for d in (current, running, ended, unowned):
        d.mkdir(parents=True)
    (current / leaks.OWNER_FILE).write_text("10")
    (running / leaks.OWNER_FILE).write_text("11")
    (ended / leaks.OWNER_FILE).write_text("12")
    procs = [
        (1, _server(current / "mariadb0" / "db" / "data")),  # this session's
        (2, _server(running / "mariadb0" / "db" / "data")),  # another session, still running
        (3, _server(ended / "ft_db0" / "db" / "data")),  # its session ended: a leak
        (4, _server(unowned / "ldb0" / "db" / "data")),  # a session that never claimed its folder
        (5, _server(tmp_path / "elsewhere" / "db" / "data")),  # not a test server (a user's run)
        (8, _server(root / ".rayrec" / "demo" / "db" / "data")),  # under the root, but no pytest session folder
        (6, ["/usr/bin/python3", f"--datadir={ended}/x"]),  # not a server
        (7, []),  # a kernel thread
    ]
    found = leaks.leaked_servers(root, current, procs, alive=lambda pid: pid in (10, 11))
    assert found == [(3, str(ended / "ft_db0" / "db" / "data")), (4, str(unowned / "ldb0" / "db" / "data"))]
