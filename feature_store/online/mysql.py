"""The online store over the MySQL protocol: RonDB (NDB) in production, MariaDB locally.

This is the only module of the project that imports pymysql or writes SQL. Every value goes
to the server as a %s parameter; identifiers are validated (`base.IDENTIFIER_RE`) and
backtick-quoted before they are put in a statement. The SQL is the subset that MariaDB 10.11
and MySQL 8.0 NDB (RonDB) both run: `CREATE TABLE IF NOT EXISTS ... ENGINE=`,
`INSERT ... ON DUPLICATE KEY UPDATE c=VALUES(c)` (deprecated but supported by MySQL 8.0;
MariaDB lacks the newer row-alias form), `SELECT ... WHERE k IN (...)`.

One store holds one connection behind a lock (thread-safe, calls are serialised; use one
store per thread or process for parallelism). The connection runs in autocommit mode so reads
never see a stale snapshot; writes open an explicit transaction. When the server restarted or
the connection dropped, the call reconnects and is retried once: every operation here is
idempotent (upserts, IF [NOT] EXISTS DDL, reads), so a retry cannot apply anything twice.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pymysql
from pymysql.err import InterfaceError, OperationalError

from common.config import DatabaseConfig
from feature_store.online.base import (
    MAX_KEY_CHARS,
    MAX_STRING_CHARS,
    OnlineStore,
    SchemaMismatch,
    TableNotFound,
    TableSpec,
    check_columns,
    check_compatible,
    normalise_key,
    prepare_rows,
    validate_identifier,
)

T = TypeVar("T")

# Client/server error codes that mean "this connection is gone" (worth one reconnect + retry).
_CONNECTION_LOST = {
    0,  # pymysql InterfaceError(0, ''): the connection object is already closed
    1053,  # ER_SERVER_SHUTDOWN
    1927,  # ER_CONNECTION_KILLED (MariaDB)
    2003,  # can't connect
    2006,  # server has gone away
    2013,  # lost connection during query
    2014,  # commands out of sync (a half-read result after an interrupted call)
    2055,  # lost connection (system error)
    4031,  # ER_CLIENT_INTERACTION_TIMEOUT (MySQL 8.0.24+)
}
_ER_NO_SUCH_TABLE = 1146
_ER_BAD_FIELD = 1054

_SQL_TYPES = {
    "int64": "BIGINT",
    "float64": "DOUBLE",
    "string": f"VARCHAR({MAX_STRING_CHARS})",
    "json": "TEXT",
}
# information_schema.COLUMNS.DATA_TYPE -> our column type, to check an existing table.
_FROM_SQL_TYPE = {
    "bigint": "int64",
    "double": "float64",
    "varchar": "string",
    "text": "json",
    "mediumtext": "json",
    "longtext": "json",
}
# Binary collation for string keys: ids are case-sensitive. (Both MariaDB and MySQL pad
# trailing spaces in this collation: "a" and "a " are the same key.)
_KEY_STRING = f"VARCHAR({MAX_KEY_CHARS}) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"


def _q(name: str) -> str:
    """Backtick-quote an identifier that has passed `validate_identifier`."""
    return f"`{validate_identifier(name)}`"


def _translate(e: pymysql.err.MySQLError) -> Exception:
    """Map the server errors callers act on to the store's exceptions; others pass unchanged."""
    code = e.args[0] if e.args else None
    msg = e.args[1] if len(e.args) > 1 else str(e)
    if code == _ER_NO_SUCH_TABLE:
        return TableNotFound(msg)
    if code == _ER_BAD_FIELD:
        return SchemaMismatch(f"{msg} (the table was created from another spec)")
    return e


def _is_connection_lost(e: BaseException) -> bool:
    return isinstance(e, OperationalError | InterfaceError) and bool(e.args) and e.args[0] in _CONNECTION_LOST


class MySQLOnlineStore(OnlineStore):
    """`OnlineStore` on a MySQL-protocol server (RonDB/MySQL NDB or MariaDB)."""

    def __init__(
        self,
        host: str,
        port: int,
        database: str,
        user: str,
        password: str,
        connect_timeout: float = 5,
        *,
        read_timeout: float | None = 60,
        write_timeout: float | None = 60,
        chunk_size: int = 1000,
    ) -> None:
        """Connect (eagerly, so a wrong address or password fails here).

        Args:
            host, port, database, user, password: where and as whom to connect.
            connect_timeout: seconds to wait for the TCP connection and handshake.
            read_timeout, write_timeout: socket timeouts of one call (None: wait forever).
            chunk_size: rows per executemany call inside a write transaction.
        Raises:
            ConnectionError: the server cannot be reached or refuses the login.
        """
        validate_identifier(database, "database name")
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        self._where = f"{user}@{host}:{port}/{database}"
        self._params: dict[str, Any] = dict(
            host=host,
            port=int(port),
            user=user,
            # pymysql would encode a str password as latin-1; servers hash the UTF-8 bytes.
            password=password.encode("utf-8") if isinstance(password, str) else password,
            database=database,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            write_timeout=write_timeout,
            charset="utf8mb4",
            autocommit=True,
            local_infile=False,
        )
        self._chunk_size = chunk_size
        self._lock = threading.Lock()
        self._conn: pymysql.connections.Connection | None = None
        self._engine: str | None = None
        self._closed = False
        self._diag_statements = 0  # statements issued by statement_count() itself
        with self._lock:
            self._connect()

    @classmethod
    def from_config(cls, cfg: DatabaseConfig, password: str, **kwargs: Any) -> MySQLOnlineStore:
        """Build a store from the `database` config section.

        Args:
            cfg: host, port, database and user.
            password: the user's password (see `LocalMariaDB.password()` or cfg.password_env).
            kwargs: passed on to the constructor (timeouts, chunk_size).
        """
        return cls(cfg.host, cfg.port, cfg.database, cfg.user, password, **kwargs)

    def __repr__(self) -> str:
        return f"MySQLOnlineStore({self._where})"

    def __reduce__(self) -> Any:
        raise TypeError(
            "MySQLOnlineStore holds a live connection and cannot be pickled; "
            "create it inside the worker/actor with MySQLOnlineStore.from_config(...)"
        )

    # connection handling --------------------------------------------------------------------
    def _connect(self) -> pymysql.connections.Connection:
        try:
            self._conn = pymysql.connect(**self._params)
        except pymysql.err.MySQLError as e:
            self._conn = None
            raise ConnectionError(f"cannot connect to the online store {self._where}: {e}") from None
        self._diag_statements = 0
        return self._conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # the socket is already broken
                pass

    def _run(self, fn: Callable[[pymysql.connections.Connection], T]) -> T:
        """Run fn(connection) under the lock; reconnect and retry once if the connection was lost."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            for attempt in (0, 1):
                conn = self._conn if self._conn is not None else self._connect()
                try:
                    return fn(conn)
                except (OperationalError, InterfaceError) as e:
                    if not _is_connection_lost(e):
                        raise _translate(e) from None
                    self._drop_connection()
                    # A socket timeout is a slow server, not a restarted one: do not wait twice.
                    if attempt == 1 or "timed out" in str(e):
                        raise ConnectionError(
                            f"lost the connection to the online store {self._where}: {e}"
                        ) from e
                except pymysql.err.MySQLError as e:
                    raise _translate(e) from None
                except (ValueError, LookupError):
                    raise
                except BaseException:
                    # Anything else mid-call (e.g. KeyboardInterrupt during a read) may leave an
                    # unread result on the wire: start from a fresh connection next time.
                    self._drop_connection()
                    raise
            raise AssertionError("unreachable")

    def _engine_for(self, conn: pymysql.connections.Connection) -> str:
        if self._engine is None:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT UPPER(ENGINE) FROM information_schema.ENGINES "
                    "WHERE UPPER(ENGINE) = %s AND SUPPORT IN ('YES', 'DEFAULT')",
                    ("NDBCLUSTER",),
                )
                self._engine = "NDBCLUSTER" if cur.fetchone() else "InnoDB"
        return self._engine

    # OnlineStore ----------------------------------------------------------------------------
    def ensure_table(self, spec: TableSpec) -> None:
        defs = []
        for col, typ in spec.columns.items():
            if col == spec.key:
                sql_type = _KEY_STRING if typ == "string" else "BIGINT"
                defs.append(f"{_q(col)} {sql_type} NOT NULL")
            else:
                defs.append(f"{_q(col)} {_SQL_TYPES[typ]} NULL")
        defs.append(f"PRIMARY KEY ({_q(spec.key)})")

        def op(conn: pymysql.connections.Connection) -> None:
            engine = self._engine_for(conn)
            with conn.cursor() as cur:
                cur.execute(
                    f"CREATE TABLE IF NOT EXISTS {_q(spec.name)} ({', '.join(defs)}) "
                    f"ENGINE={engine} DEFAULT CHARSET=utf8mb4"
                )
                cur.execute(
                    "SELECT COLUMN_NAME, LOWER(DATA_TYPE), COLUMN_KEY FROM information_schema.COLUMNS "
                    "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s",
                    (spec.name,),
                )
                rows = cur.fetchall()
            existing = {name: _FROM_SQL_TYPE.get(dtype, dtype) for name, dtype, _ in rows}
            keys = [name for name, _, ckey in rows if ckey == "PRI"]
            check_compatible(spec, existing, keys[0] if len(keys) == 1 else None)

        self._run(op)

    def write_batch(self, spec: TableSpec, rows: list[dict[str, Any]]) -> int:
        prepared = prepare_rows(spec, rows)  # validates everything before any SQL is sent
        if not prepared:
            return 0
        cols = list(spec.columns)
        updates = [c for c in cols if c != spec.key] or [spec.key]
        sql = (
            f"INSERT INTO {_q(spec.name)} ({', '.join(_q(c) for c in cols)}) "
            f"VALUES ({', '.join(['%s'] * len(cols))}) "
            f"ON DUPLICATE KEY UPDATE {', '.join(f'{_q(c)}=VALUES({_q(c)})' for c in updates)}"
        )
        step = self._chunk_size

        def op(conn: pymysql.connections.Connection) -> int:
            try:
                conn.begin()
                with conn.cursor() as cur:
                    for i in range(0, len(prepared), step):
                        cur.executemany(sql, prepared[i : i + step])
                conn.commit()
            except BaseException:
                try:
                    conn.rollback()
                except Exception:  # a lost connection rolls back on the server
                    pass
                raise
            return len(prepared)

        return self._run(op)

    def read_batch(
        self, spec: TableSpec, keys: Sequence[Any], columns: Sequence[str] | None = None
    ) -> dict[Any, dict[str, Any]]:
        cols = check_columns(spec, columns)
        wanted = list(dict.fromkeys(normalise_key(spec, k) for k in keys))
        if not wanted:
            return {}
        # SELECT the requested columns in order, with the key in front when it was not requested.
        offset = 0 if spec.key in cols else 1
        select = cols if offset == 0 else [spec.key, *cols]
        key_pos = select.index(spec.key)
        json_cols = [c for c in cols if spec.columns[c] == "json"]
        sql = (
            f"SELECT {', '.join(_q(c) for c in select)} FROM {_q(spec.name)} "
            f"WHERE {_q(spec.key)} IN ({', '.join(['%s'] * len(wanted))})"
        )

        def op(conn: pymysql.connections.Connection) -> tuple[tuple[Any, ...], ...]:
            with conn.cursor() as cur:
                cur.execute(sql, wanted)
                return cur.fetchall()

        fetched = self._run(op)
        out: dict[Any, dict[str, Any]] = {}
        loads = json.loads
        for row in fetched:
            rec = dict(zip(cols, row[offset:] if offset else row, strict=True))
            for c in json_cols:
                v = rec[c]
                if v is not None:
                    rec[c] = loads(v)
            out[row[key_pos]] = rec
        return out

    def drop_table(self, spec: TableSpec) -> None:
        def op(conn: pymysql.connections.Connection) -> None:
            with conn.cursor() as cur:
                cur.execute(f"DROP TABLE IF EXISTS {_q(spec.name)}")

        self._run(op)

    def list_tables(self) -> list[str]:
        def op(conn: pymysql.connections.Connection) -> list[str]:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE()"
                )
                return sorted(r[0] for r in cur.fetchall())

        return self._run(op)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop_connection()

    # diagnostics ----------------------------------------------------------------------------
    def statement_count(self) -> int:
        """Statements this connection has sent (the server's session 'Questions' counter, minus
        the statements of this method). It restarts at 0 after a reconnect."""

        def op(conn: pymysql.connections.Connection) -> int:
            with conn.cursor() as cur:
                cur.execute("SHOW SESSION STATUS LIKE 'Questions'")
                row = cur.fetchone()
            self._diag_statements += 1
            return int(row[1]) - self._diag_statements

        return self._run(op)

    def server_info(self) -> dict[str, Any]:
        """Returns: {"version", "engine" (the one ensure_table uses), "host", "port", "database"}."""

        def op(conn: pymysql.connections.Connection) -> dict[str, Any]:
            engine = self._engine_for(conn)
            with conn.cursor() as cur:
                cur.execute("SELECT VERSION()")
                (version,) = cur.fetchone()
            return {
                "version": version,
                "engine": engine,
                "host": self._params["host"],
                "port": self._params["port"],
                "database": self._params["database"],
            }

        return self._run(op)
