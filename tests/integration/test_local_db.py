"""LocalMariaDB: a private MariaDB process per workdir (start/stop/status, password handling)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import leaks
import pytest
from conftest import free_tcp_port

from common.config import DatabaseConfig
from common.workdir import Workdir
from feature_store import local_db
from feature_store.local_db import LocalMariaDB, MariaDBMissing, MariaDBStartError, PortInUse
from feature_store.online.mysql import MySQLOnlineStore

pytestmark = pytest.mark.integration

PASSWORD_ENV = "RAYREC_TEST_LOCALDB_PASSWORD"


def _cfg(port: int | None = None, **kw: object) -> DatabaseConfig:
    values: dict[str, object] = dict(
        port=port or free_tcp_port(), database="rayrec_ldb", user="rayrec_ldb", password_env=PASSWORD_ENV
    )
    values.update(kw)
    return DatabaseConfig(**values)


def _can_login(cfg: DatabaseConfig, password: str) -> bool:
    try:
        MySQLOnlineStore.from_config(cfg, password, connect_timeout=3).close()
    except ConnectionError:
        return False
    return True


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _servers_for(data_dir: Path) -> list[int]:
    """Live (non-zombie) mariadbd processes started with this data dir."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"--datadir={data_dir}".encode() in cmd and state != "Z":
            pids.append(int(entry.name))
    return pids


@pytest.fixture(autouse=True)
def _no_password_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMariaDB]:
    """One server shared by the tests that leave it running."""
    os.environ.pop(PASSWORD_ENV, None)
    db = LocalMariaDB(Workdir.at(tmp_path_factory.mktemp("ldb")), _cfg())
    try:
        db.start()
    except MariaDBMissing as e:
        pytest.fail(str(e), pytrace=False)
    yield db
    db.stop()


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[LocalMariaDB]:
    """A not-yet-started server of its own, stopped after the test whatever happened."""
    db = LocalMariaDB(Workdir.at(tmp_path / "wd"), _cfg())
    yield db
    db.stop()
    assert _servers_for(db.data_dir) == []


def test_start_is_idempotent(server: LocalMariaDB) -> None:
    pid = server.status()["pid"]
    again = server.start()
    assert again["pid"] == pid
    assert _servers_for(server.data_dir) == [pid]


def test_status(server: LocalMariaDB) -> None:
    st = server.status()
    assert set(st) == {"running", "pid", "port", "host", "data_dir", "version"}
    assert st["running"] is True and isinstance(st["pid"], int)
    assert st["port"] == server.cfg.port and st["host"] == "127.0.0.1"
    assert st["data_dir"] == str(server.wd.db_dir / "data")
    assert "MariaDB" in st["version"]
    assert int(server.pid_file.read_text()) == st["pid"]


def test_password_file_is_private_and_the_password_is_never_logged(server: LocalMariaDB) -> None:
    path = server.wd.db_password_file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    pw = server.password()
    assert len(pw) >= 24 and path.read_text().strip() == pw
    assert pw not in repr(server.status())
    for log in (server.error_log, server.output_log, server.install_log):
        assert pw not in log.read_text(errors="replace"), log
    environ = Path(f"/proc/{server.status()['pid']}/environ").read_bytes()
    assert pw.encode() not in environ


def test_app_user_reaches_its_database_only(server: LocalMariaDB) -> None:
    cfg, pw = server.cfg, server.password()
    assert _can_login(cfg, pw)
    assert not _can_login(cfg, pw + "x")
    other_db = cfg.model_copy(update={"database": "mysql"})
    assert not _can_login(other_db, pw)
    # the server listens on 127.0.0.1 only
    assert server.status()["host"] == "127.0.0.1"


def test_env_password_takes_precedence(server: LocalMariaDB, monkeypatch: pytest.MonkeyPatch) -> None:
    file_pw = server.password()
    env_pw = "env 'pässword'; with \\ back\"slash -- and `ticks`"
    monkeypatch.setenv(PASSWORD_ENV, env_pw)
    assert server.password() == env_pw
    pid = server.status()["pid"]
    assert server.start()["pid"] == pid  # no restart, but the password is reset
    assert _can_login(server.cfg, env_pw)
    assert not _can_login(server.cfg, file_pw)
    assert server.wd.db_password_file.read_text().strip() == file_pw  # the file is left alone
    assert env_pw not in server.error_log.read_text(errors="replace")
    monkeypatch.delenv(PASSWORD_ENV)
    server.start()
    assert _can_login(server.cfg, file_pw)
    assert not _can_login(server.cfg, env_pw)


def test_password_is_generated_once(tmp_path: Path) -> None:
    db = LocalMariaDB(Workdir.at(tmp_path), _cfg())
    pw = db.password()
    assert db.password() == pw
    assert stat.S_IMODE(db.wd.db_password_file.stat().st_mode) == 0o600


def test_stop_frees_the_port_and_is_a_noop_when_stopped(fresh: LocalMariaDB) -> None:
    assert fresh.stop() is False  # never started
    st = fresh.start()
    port = fresh.cfg.port
    assert _listening(port)
    assert fresh.stop() is True
    assert not _listening(port)
    assert not fresh.pid_file.exists()
    assert _servers_for(fresh.data_dir) == []
    assert fresh.status()["running"] is False and fresh.status()["pid"] is None
    assert fresh.status()["version"] is None
    assert fresh.stop() is False
    # a restart keeps the data dir (no second mariadb-install-db) and gets a new process
    assert fresh.start()["pid"] != st["pid"]


def test_stale_pid_files_do_not_block_start(fresh: LocalMariaDB) -> None:
    fresh.start()
    fresh.stop()
    # 1) the pid of a process that has exited
    dead = subprocess.Popen(["true"])
    dead.wait()
    fresh.pid_file.write_text(f"{dead.pid}\n")
    assert fresh.status()["running"] is False
    pid = fresh.start()["pid"]
    assert pid != dead.pid and _listening(fresh.cfg.port)
    fresh.stop()
    # 2) a live process that is not our server (a recycled pid): never signalled
    fresh.pid_file.write_text(f"{os.getpid()}\n")
    assert fresh.status()["running"] is False
    assert fresh.stop() is False  # and we are still alive
    assert not fresh.pid_file.exists()
    fresh.pid_file.write_text(f"{os.getpid()}\n")
    assert fresh.start()["pid"] != os.getpid()


def test_crashed_server_is_restarted(fresh: LocalMariaDB) -> None:
    pid = fresh.start()["pid"]
    os.kill(pid, 9)  # leaves the pid file and the socket behind
    deadline = time.monotonic() + 10
    while fresh.status()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fresh.pid_file.exists() and fresh.status()["running"] is False
    new = fresh.start()
    assert new["running"] and new["pid"] != pid
    assert _can_login(fresh.cfg, fresh.password())


def test_port_used_by_another_process(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        db = LocalMariaDB(Workdir.at(tmp_path), _cfg(port))
        with pytest.raises(PortInUse, match=f"port {port}"):
            db.start()
        assert _servers_for(db.data_dir) == []
        assert db.status()["running"] is False


def test_missing_binaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(local_db, "EXTRA_BIN_DIRS", ())
    db = LocalMariaDB(Workdir.at(tmp_path / "wd"), _cfg())
    with pytest.raises(MariaDBMissing, match="apt-get install -y mariadb-server") as e:
        db.start()
    assert "mariadbd" in str(e.value) and "make test" in str(e.value)
    assert isinstance(e.value, RuntimeError)
    assert not db.data_dir.exists()


def test_startup_failure_quotes_the_error_log(tmp_path: Path) -> None:
    db = LocalMariaDB(Workdir.at(tmp_path), _cfg(), extra_args=["--no-such-option-xyz"], startup_timeout=30)
    with pytest.raises(MariaDBStartError, match="no-such-option-xyz") as e:
        db.start()
    assert str(db.error_log) in str(e.value)
    assert _servers_for(db.data_dir) == []


@pytest.mark.parametrize("user", ["root", "mysql"])
def test_reserved_users_are_refused(tmp_path: Path, user: str) -> None:
    with pytest.raises(ValueError, match=repr(user)):
        LocalMariaDB(Workdir.at(tmp_path), _cfg(user=user))


def test_start_refuses_a_running_server_on_another_port(server: LocalMariaDB) -> None:
    other = LocalMariaDB(server.wd, server.cfg.model_copy(update={"port": free_tcp_port()}))
    with pytest.raises(RuntimeError, match=f"already running on port {server.cfg.port}"):
        other.start()
    assert server.status()["running"]


def test_a_server_left_by_a_session_that_ended_is_stopped(tmp_path: Path):
    """tests/leaks.py: a server whose test session ended without its teardown is found by its data
    dir under the pytest root and stopped; the running session's own servers are left alone."""
    root = tmp_path / "pytest-of-someone"
    ended, current = root / "pytest-7", root / "pytest-8"
    ended.mkdir(parents=True)
    current.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    (ended / leaks.OWNER_FILE).write_text(str(gone.pid))  # a session process that is not running
    leaks.claim_session(current)
    left, mine = (LocalMariaDB(Workdir.at(d / "mariadb0"), _cfg()) for d in (ended, current))
    try:
        left.start()
        mine.start()
        pid, my_pid = left.status()["pid"], mine.status()["pid"]
        assert leaks.reap(root, current) == [(pid, str(left.data_dir))]
        assert not left.status()["running"]
        assert mine.status()["pid"] == my_pid
    finally:
        left.stop()
        mine.stop()
