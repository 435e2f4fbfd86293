"""Shared pytest fixtures.

Keep this file generic: each fixture's helpers are plain functions named after what they do,
so other fixtures (and tests that need a server of their own) can reuse them.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from common.config import DatabaseConfig
from common.workdir import Workdir
from feature_store.local_db import LocalMariaDB, MariaDBMissing

# ---------------------------------------------------------------------------------------------
# MariaDB


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class MariaDBHandle:
    """A running local MariaDB: the server object, its config and the app user's password."""

    server: LocalMariaDB
    cfg: DatabaseConfig
    password: str = field(repr=False)

    @property
    def host(self) -> str:
        return self.cfg.host

    @property
    def port(self) -> int:
        return self.cfg.port

    @property
    def database(self) -> str:
        return self.cfg.database

    @property
    def user(self) -> str:
        return self.cfg.user


def local_mariadb_config(**overrides: object) -> DatabaseConfig:
    """A DatabaseConfig for a test server on a free port. The password env variable is one
    nobody sets, so the password comes from the workdir's password file."""
    values: dict[str, object] = dict(
        host="127.0.0.1",
        port=free_tcp_port(),
        database="rayrec_test",
        user="rayrec_test",
        password_env="RAYREC_TEST_DB_PASSWORD_UNSET",
        local=True,
    )
    values.update(overrides)
    return DatabaseConfig(**values)


def start_local_mariadb(root: Path, cfg: DatabaseConfig | None = None) -> MariaDBHandle:
    """Start a LocalMariaDB in workdir `root`; fails the test (no skip) if MariaDB is missing."""
    cfg = cfg or local_mariadb_config()
    server = LocalMariaDB(Workdir.at(root), cfg)
    try:
        server.start()
    except MariaDBMissing as e:
        pytest.fail(str(e), pytrace=False)
    return MariaDBHandle(server=server, cfg=cfg, password=server.password())


@pytest.fixture(scope="session")
def mariadb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDBHandle]:
    """A real MariaDB for the whole session (database/user `rayrec_test`), stopped at the end.

    Use `MySQLOnlineStore.from_config(mariadb.cfg, mariadb.password)` to talk to it. Tests that
    stop/start it must leave it running.
    """
    handle = start_local_mariadb(tmp_path_factory.mktemp("mariadb"))
    try:
        yield handle
    finally:
        handle.server.stop()
