"""A local MariaDB server run as a plain background process inside the workdir.

The demo and the tests use it as the MySQL-protocol online store (production uses RonDB, see
`feature_store.online.mysql`). Everything lives under `Workdir.db_dir`:

    db/data/           the data dir (created by mariadb-install-db on first start)
    db/run/            unix socket and pid file
    db/mysqld.err      the server's error log
    db/mysqld.out      the server's stdout/stderr
    db/install-db.log  output of mariadb-install-db
    db/password        the app user's password (mode 0600) unless the env var is set

The server listens on 127.0.0.1:<cfg.port> and on its own unix socket only, ignores
/etc/mysql (`--no-defaults`) and survives the process that started it. Bootstrap SQL
(database, user, grants) goes through the system `mariadb` client over the unix socket as
the socket-authenticated admin account that mariadb-install-db creates (root when running as
root, else the current OS user).
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from common.config import DatabaseConfig
from common.workdir import Workdir
from feature_store.online.mysql import VERSION_SQL, bootstrap_sql

INSTALL_COMMAND = "apt-get install -y mariadb-server"
BIND_HOST = "127.0.0.1"
# Besides $PATH: the server binary lives in sbin, which a non-root PATH often lacks.
EXTRA_BIN_DIRS: tuple[str, ...] = ("/usr/sbin", "/usr/local/sbin", "/usr/local/mysql/bin")
_REQUIRED = {
    "server": "mariadbd",
    "install_db": "mariadb-install-db",
    "client": "mariadb",
    "admin": "mariadb-admin",
}
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_USER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,31}$")
_RESERVED_USERS = {"root", "mysql", "mariadb.sys"}
_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux


class MariaDBMissing(RuntimeError):
    """The MariaDB server binaries are not installed."""


class PortInUse(RuntimeError):
    """The configured port is taken by another process."""


class MariaDBStartError(RuntimeError):
    """The server did not come up; the message quotes the tail of mysqld.err."""


def find_binary(name: str) -> str | None:
    """Absolute path of an executable on $PATH or in `EXTRA_BIN_DIRS`, else None."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(EXTRA_BIN_DIRS))


def find_binaries() -> dict[str, str]:
    """Paths of the MariaDB server and client tools.

    Raises:
        MariaDBMissing: naming the missing programs and the install command.
    """
    found = {role: find_binary(name) for role, name in _REQUIRED.items()}
    missing = [_REQUIRED[role] for role, path in found.items() if path is None]
    if missing:
        raise MariaDBMissing(
            f"MariaDB is not installed (missing: {', '.join(missing)}). Install it with "
            f"`{INSTALL_COMMAND}` (as root; `make demo` and `make test` install it when run as root)."
        )
    return {role: str(path) for role, path in found.items()}


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} not readable)"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else f"({path} is empty)"


def _proc_state(pid: int) -> str | None:
    """The state letter from /proc/<pid>/stat ('Z' for a zombie), None if no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return "?"
    return stat[stat.rindex(")") + 2 :].split(" ", 1)[0]


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (reaping it if it is our child)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if _proc_state(pid) == "Z":
        # A killed multi-threaded process shows a zombie leader while its other threads still
        # exit (and hold its sockets and files): it is gone once only the leader is left.
        try:
            if len(os.listdir(f"/proc/{pid}/task")) > 1:
                return True
        except OSError:
            pass
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return True


class LocalMariaDB:
    """Start, stop and inspect a private MariaDB server for one workdir."""

    def __init__(
        self,
        workdir: Workdir,
        cfg: DatabaseConfig,
        *,
        startup_timeout: float = 60.0,
        stop_timeout: float = 60.0,
        buffer_pool_size: str = "256M",
        extra_args: Sequence[str] = (),
    ) -> None:
        """
        Args:
            workdir: the run's workdir; the server lives in `workdir.db_dir`.
            cfg: port, database, user and the name of the password env variable.
            startup_timeout: seconds to wait for the server to answer a ping.
            stop_timeout: seconds to wait after SIGTERM before SIGKILL.
            buffer_pool_size: InnoDB buffer pool size (mariadbd syntax, e.g. "256M").
            extra_args: more mariadbd options, appended last.
        """
        if not _IDENT.match(cfg.database):
            raise ValueError(f"invalid database name {cfg.database!r}: must match {_IDENT.pattern}")
        if not _USER.match(cfg.user):
            raise ValueError(f"invalid database user {cfg.user!r}: must match {_USER.pattern}")
        if cfg.user.lower() in _RESERVED_USERS or cfg.user == self._admin_user():
            raise ValueError(f"database user {cfg.user!r} is reserved for the server's admin account")
        self.wd = workdir
        self.cfg = cfg
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.buffer_pool_size = buffer_pool_size
        self.extra_args = list(extra_args)

    # paths -------------------------------------------------------------------------------
    @property
    def db_dir(self) -> Path:
        return self.wd.db_dir

    @property
    def data_dir(self) -> Path:
        return self.db_dir / "data"

    @property
    def run_dir(self) -> Path:
        return self.db_dir / "run"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "mysqld.pid"

    @property
    def error_log(self) -> Path:
        return self.db_dir / "mysqld.err"

    @property
    def output_log(self) -> Path:
        return self.db_dir / "mysqld.out"

    @property
    def install_log(self) -> Path:
        return self.db_dir / "install-db.log"

    @property
    def socket_path(self) -> Path:
        """`run/mysqld.sock`, or a short path in the temp dir when that one is too long for a socket."""
        path = self.run_dir / "mysqld.sock"
        if len(os.fsencode(path)) <= _MAX_SOCKET_PATH:
            return path
        digest = hashlib.sha1(os.fsencode(self.db_dir)).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"rayrec-mysqld-{digest}.sock"

    # public API --------------------------------------------------------------------------
    def start(self) -> dict[str, Any]:
        """Start the server if it is not running, then ensure the database, user and grants.

        Returns:
            `status()`.
        Raises:
            MariaDBMissing: the binaries are not installed.
            PortInUse: cfg.port is taken by another process.
            MariaDBStartError: the server exited or did not answer in time (quotes mysqld.err).
        """
        bins = find_binaries()
        password = self.password()
        self.db_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with self._locked():
            running = self._server_pid()
            if running is not None:
                self._check_running_port(running)
            else:
                self._clear_stale_files()
                self._check_port_free()
                self._init_data_dir(bins)
                pid = self._spawn(bins)
                self._wait_ready(bins, pid)
            self._bootstrap(bins, password)
        return self.status()

    def check_startable(self) -> None:
        """Raise PortInUse if `start` would fail on a taken port, writing nothing: a command
        checks this before it creates a workdir, so that the failure leaves no half-made run."""
        running = self._server_pid()
        if running is not None:
            self._check_running_port(running)
        else:
            self._check_port_free()

    def stop(self) -> bool:
        """Stop the server: SIGTERM, then SIGKILL after `stop_timeout`; waits until it is gone.

        Returns:
            True if a server was stopped, False if none was running (stale files are removed).
        """
        if not self.db_dir.is_dir():
            return False
        with self._locked():
            pid = self._server_pid()
            if pid is None:
                self._clear_stale_files()
                return False
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not self._wait_gone(pid, self.stop_timeout):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                if not self._wait_gone(pid, 30.0):
                    raise RuntimeError(f"mariadbd (pid {pid}) did not exit after SIGKILL")
            self._clear_stale_files()
            return True

    def status(self) -> dict[str, Any]:
        """Returns: {"running", "pid", "port", "host", "data_dir", "version"} (no secrets)."""
        pid = self._server_pid()
        version = self._server_version() if pid is not None else None
        return {
            "running": pid is not None,
            "pid": pid,
            "port": self.cfg.port,
            "host": BIND_HOST,
            "data_dir": str(self.data_dir),
            "version": version,
        }

    def password(self) -> str:
        """The app user's password: $<cfg.password_env> if set, else the workdir's password file
        (generated with mode 0600 the first time)."""
        env = os.environ.get(self.cfg.password_env)
        if env:
            return env
        path = self.wd.db_password_file
        for _ in range(2):
            try:
                if path.stat().st_mode & 0o077:
                    os.chmod(path, 0o600)
                pw = path.read_text().strip()
                if not pw:
                    raise RuntimeError(f"password file {path} is empty; delete it to generate a new one")
                return pw
            except FileNotFoundError:
                pass
            path.parent.mkdir(parents=True, exist_ok=True)
            pw = secrets.token_urlsafe(24)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue  # created concurrently: read that one
            with os.fdopen(fd, "w") as f:
                f.write(pw + "\n")
            return pw
        raise RuntimeError(f"cannot read or create the password file {path}")

    # internals ---------------------------------------------------------------------------
    @staticmethod
    def _admin_user() -> str:
        """The socket-authenticated admin account created by mariadb-install-db."""
        return "root" if os.geteuid() == 0 else getpass.getuser()

    def _child_env(self) -> dict[str, str]:
        """Environment for the server and the client tools: without the password variable."""
        env = {k: v for k, v in os.environ.items() if k not in (self.cfg.password_env, "MYSQL_PWD")}
        env["MYSQL_HISTFILE"] = os.devnull
        return env

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise start/stop of this workdir's server across processes."""
        self.db_dir.mkdir(parents=True, exist_ok=True)
        with open(self.db_dir / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _server_pid(self) -> int | None:
        """The pid from the pid file if that process is alive and is this workdir's mariadbd."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        if pid <= 0 or not _alive(pid):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            return None
        except OSError:
            return pid  # no /proc access: trust the live pid
        if f"--datadir={self.data_dir}".encode() not in cmdline:
            return None  # the pid was reused by an unrelated process
        return pid

    def _check_running_port(self, pid: int) -> None:
        """A server already running for this workdir must listen on cfg.port."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return
        ports = [a.split(b"=", 1)[1].decode() for a in cmdline if a.startswith(b"--port=")]
        if ports and ports[-1] != str(self.cfg.port):
            raise RuntimeError(
                f"the MariaDB of {self.db_dir} is already running on port {ports[-1]}, not on the "
                f"configured port {self.cfg.port}; stop it first"
            )

    def _clear_stale_files(self) -> None:
        sock = self.socket_path
        for p in (self.pid_file, sock, sock.with_name(sock.name + ".lock")):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def _check_port_free(self, grace: float = 2.0) -> None:
        """Raise PortInUse unless cfg.port can be bound (retrying for `grace` seconds, the time a
        just-killed server may still hold it)."""
        port = self.cfg.port
        deadline = time.monotonic() + grace
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((BIND_HOST, port))
                    return
                except OSError as e:
                    err = e
            if time.monotonic() > deadline:
                raise PortInUse(
                    f"cannot start MariaDB: port {port} on {BIND_HOST} is already in use by another "
                    f"process ({err.strerror}); stop that process or set database.port to a free port"
                ) from None
            time.sleep(0.1)

    def _init_data_dir(self, bins: dict[str, str]) -> None:
        if (self.data_dir / "mysql").is_dir():
            return
        if self.data_dir.exists() and any(self.data_dir.iterdir()):
            raise MariaDBStartError(
                f"{self.data_dir} is not empty but holds no initialised MariaDB data dir (no mysql/); "
                "move it away and start again"
            )
        # Initialise into a scratch dir and rename it: an interrupted run leaves no half-made data dir.
        tmp = self.db_dir / "data.init"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [
            bins["install_db"],
            "--no-defaults",
            f"--datadir={tmp}",
            "--auth-root-authentication-method=socket",
            f"--auth-root-socket-user={self._admin_user()}",
            "--skip-test-db",
        ]
        if os.geteuid() == 0:
            cmd.append("--user=root")
        with open(self.install_log, "wb") as log:
            rc = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._child_env(),
                timeout=600,
            ).returncode
        if rc != 0 or not (tmp / "mysql").is_dir():
            raise MariaDBStartError(
                f"mariadb-install-db failed (exit {rc}); see {self.install_log}:\n{_tail(self.install_log)}"
            )
        with contextlib.suppress(FileNotFoundError):
            self.data_dir.rmdir()  # an empty leftover
        tmp.rename(self.data_dir)

    def _server_args(self, bins: dict[str, str]) -> list[str]:
        args = [bins["server"], "--no-defaults"]  # --no-defaults must come first
        if os.geteuid() == 0:
            # mariadbd refuses root without it; the workdir may not be traversable by `mysql`.
            args.append("--user=root")
        args += [
            f"--datadir={self.data_dir}",
            f"--socket={self.socket_path}",
            f"--pid-file={self.pid_file}",
            f"--log-error={self.error_log}",
            f"--port={self.cfg.port}",
            f"--bind-address={BIND_HOST}",
            "--skip-name-resolve",
            "--local-infile=0",
            f"--innodb-buffer-pool-size={self.buffer_pool_size}",
            # A local, rebuildable store: flush the redo log once a second, not per commit.
            "--innodb-flush-log-at-trx-commit=2",
            # Feature reads are batches of primary-key lookups: a hash index over the hot pages
            # takes about 40% off the server's CPU per lookup (off by default since 10.5).
            "--innodb-adaptive-hash-index=ON",
            # ...in ONE partition: the parts split the hash cells by index, so with the default
            # 8 a single hot primary key gets 1/8 of them and walks long chains (at 1M article
            # rows: 14% of the server's CPU per 250-key read). MySQL has the same option.
            "--loose-innodb-adaptive-hash-index-parts=1",
            "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_general_ci",
            "--max-connections=200",
            *self.extra_args,
        ]
        return args

    def _spawn(self, bins: dict[str, str]) -> int:
        """Launch mariadbd in a new session through a shell that exits at once, so the server is
        no child of ours (no zombie, survives this process). Returns its pid."""
        env = self._child_env()
        env["RAYREC_MYSQLD_OUT"] = str(self.output_log)
        launcher = subprocess.run(
            [
                "/bin/sh",
                "-c",
                '"$@" </dev/null >>"$RAYREC_MYSQLD_OUT" 2>&1 & echo $!',
                "sh",
                *self._server_args(bins),
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=env,
            start_new_session=True,
            timeout=30,
        )
        try:
            return int(launcher.stdout.strip())
        except ValueError:
            raise MariaDBStartError(f"could not launch mariadbd: {launcher.stderr.strip()}") from None

    def _ping(self, bins: dict[str, str]) -> bool:
        r = subprocess.run(
            [
                bins["admin"],
                "--no-defaults",
                f"--socket={self.socket_path}",
                f"--user={self._admin_user()}",
                "--connect-timeout=2",
                "ping",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=self._child_env(),
            timeout=30,
        )
        return r.returncode == 0

    def _wait_ready(self, bins: dict[str, str], pid: int) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if not _alive(pid):
                tail = _tail(self.error_log)
                if "Address already in use" in tail or "Bind on TCP/IP port" in tail:
                    raise PortInUse(
                        f"mariadbd could not listen on {BIND_HOST}:{self.cfg.port}: the port is already "
                        f"in use by another process. Tail of {self.error_log}:\n{tail}"
                    )
                raise MariaDBStartError(f"mariadbd exited during startup. Tail of {self.error_log}:\n{tail}")
            if self._ping(bins):
                return
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self._wait_gone(pid, 10.0)
                raise MariaDBStartError(
                    f"mariadbd did not answer a ping within {self.startup_timeout:.0f} s (killed it). "
                    f"Tail of {self.error_log}:\n{_tail(self.error_log)}"
                )
            time.sleep(0.1)

    def _admin_sql(self, bins: dict[str, str], sql: str, *, secret: str | None = None) -> str:
        """Run SQL as the socket-authenticated admin; returns stdout. `secret` is redacted from errors."""
        r = subprocess.run(
            [
                bins["client"],
                "--no-defaults",
                f"--socket={self.socket_path}",
                f"--user={self._admin_user()}",
                "--batch",
                "--skip-column-names",
                "--default-character-set=utf8mb4",
                "--connect-timeout=5",
            ],
            input=sql.encode("utf-8"),
            capture_output=True,
            env=self._child_env(),
            timeout=60,
        )
        if r.returncode != 0:
            msg = r.stderr.decode("utf-8", "replace").strip()
            if secret:
                msg = msg.replace(secret, "***")
            raise RuntimeError(f"bootstrap SQL on the local MariaDB failed: {msg}")
        return r.stdout.decode("utf-8", "replace")

    def _bootstrap(self, bins: dict[str, str], password: str) -> None:
        # the database and user names were validated in __init__
        self._admin_sql(bins, bootstrap_sql(self.cfg.database, self.cfg.user, password), secret=password)

    def _server_version(self) -> str | None:
        try:
            bins = find_binaries()
            out = self._admin_sql(bins, VERSION_SQL).strip()
        except (MariaDBMissing, RuntimeError, subprocess.TimeoutExpired, OSError):
            return None
        return out or None

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True
