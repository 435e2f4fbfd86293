"""The online store over the MySQL protocol: RonDB (NDB) in production, MariaDB locally.

This is the only module of the project that imports pymysql or writes SQL. Every value goes
to the server as a %s parameter, except read keys that escaping would leave unchanged (int64,
plain ASCII: `_rows_of`); identifiers are validated (`base.IDENTIFIER_RE`) and
backtick-quoted before they are put in a statement. The SQL is the subset that MariaDB 10.11
and MySQL 8.0 NDB (RonDB) both run: `CREATE TABLE IF NOT EXISTS ... ENGINE=`,
`INSERT ... ON DUPLICATE KEY UPDATE c=VALUES(c)` (deprecated but supported by MySQL 8.0;
MariaDB lacks the newer row-alias form), `SELECT ... WHERE k IN (...)`, `JSON_TABLE` (MariaDB
10.6+, MySQL 8.0.4+), `GROUP_CONCAT`, scalar subqueries in a select list
(`SELECT (SELECT ..), (SELECT ..)`), `SELECT ... FOR UPDATE`.

Reads are built for pymysql, which decodes every column of every row in Python: `read_concat`
asks the server for ONE value, the concatenation of the rows' packed values
(`GROUP_CONCAT(v SEPARATOR '')`), so the client parses one bytes object instead of one result
row per key; `read_concat_many` asks for one such value per table in one statement. The session's group_concat_max_len is raised at connect; a result that was still
cut short (the server then reports a warning with the result, so checking costs nothing) is
read again row by row. The keys go as one JSON array joined to the table (`JSON_TABLE`), or
as an IN list under NDB (`_rows_of`); keys that need no escaping are put into the statement as
they are: pymysql formats parameters into the statement text anyway, key by key.

One store holds one connection behind a lock (thread-safe, calls are serialised; use one
store per thread or process for parallelism). The connection runs in autocommit mode so reads
never see a stale snapshot; writes open an explicit transaction. When the server restarted or
the connection dropped, the call reconnects and is retried once: every operation here is
idempotent (upserts, IF [NOT] EXISTS DDL, reads), so a retry cannot apply anything twice.
A write the server rolled back as a deadlock victim or on a lock wait timeout (concurrent
writers of the same keys) is run again whole, up to `_TXN_ATTEMPTS` times.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, get_args

import pymysql
from pymysql.err import InterfaceError, OperationalError

from common.config import DatabaseConfig
from feature_store.online.base import (
    MAX_BYTES,
    MAX_DICTIONARY_BYTES,
    MAX_KEY_CHARS,
    MAX_STRING_CHARS,
    OnlineStore,
    SchemaMismatch,
    TableNotFound,
    TableSpec,
    UpdateFn,
    check_bytes_column,
    check_columns,
    check_compatible,
    check_dictionary_values,
    check_newer_column,
    latest_per_key,
    normalise_key,
    plain_string_keys,
    prepare_rows,
    validate_identifier,
)

T = TypeVar("T")
DICTIONARY_TABLE = "rayrec_dictionary"  # feature_store.dictionary: code -> value, for every group

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
_ER_DUP_ENTRY = 1062
_RETRY_TXN = {1205, 1213}  # lock wait timeout, deadlock: the transaction is retried
_TXN_ATTEMPTS = 5
_DATABASE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
GROUP_CONCAT_MAX_LEN = 1 << 26  # 64 MiB; results beyond max_allowed_packet fall back to rows

_SQL_TYPES = {
    "int64": "BIGINT",
    "float64": "DOUBLE",
    "string": f"VARCHAR({MAX_STRING_CHARS})",
    "json": "TEXT",
    "bytes": f"VARBINARY({MAX_BYTES})",
}
# information_schema.COLUMNS.DATA_TYPE -> our column type, to check an existing table.
_FROM_SQL_TYPE = {
    "bigint": "int64",
    "double": "float64",
    "varchar": "string",
    "text": "json",
    "mediumtext": "json",
    "longtext": "json",
    "varbinary": "bytes",
}
# Binary collation for string keys: ids are case-sensitive. (Both MariaDB and MySQL pad
# trailing spaces in this collation: "a" and "a " are the same key.)
_KEY_STRING = f"VARCHAR({MAX_KEY_CHARS}) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"


# The local server's set-up, run by feature_store.local_db through the `mariadb` client as the
# server's admin over its unix socket (the app's user does not exist yet).
VERSION_SQL = "SELECT VERSION();\n"


TLS_MODES: tuple[str, ...] = get_args(DatabaseConfig.model_fields["tls"].annotation)  # one list: the config's


def tls_options(mode: str, ca: str | None = None) -> dict[str, Any]:
    """pymysql's connect() options for a TLS mode (DatabaseConfig.tls). pymysql 2 encrypts by
    default when the server offers TLS and checks nothing; "required" insists on TLS,
    "verify" also checks the certificate (against `ca`, else the system's CAs) and host name."""
    if mode not in TLS_MODES:
        raise ValueError(f"tls must be one of {TLS_MODES}, not {mode!r}")
    if ca is not None and mode != "verify":
        raise ValueError(f"a TLS CA file is only used with tls 'verify', not {mode!r}")
    if mode == "disabled":
        return {"ssl_disabled": True}
    if mode == "preferred":
        return {}
    # An SSLContext of our own: pymysql's dict form skips the host-name check without a CA.
    if ca is not None and not os.path.isfile(ca):
        raise ValueError(f"TLS CA file {ca!r} does not exist")
    ctx = ssl.create_default_context(cafile=ca)  # certificate and host name checked
    if mode == "required":
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return {"ssl": ctx}


def bootstrap_sql(database: str, user: str, password: str) -> str:
    """The database, the app's user (from 127.0.0.1 and the socket) with `password`, and its
    grants; idempotent. The client tool takes no parameters, so the password goes in as a
    string literal (`_sql_string`) and the names must already be validated."""
    pw = _sql_string(password)
    grant_db = database.replace("_", "\\_")  # `_` is a wildcard in GRANT ... ON db.*
    stmts = [f"CREATE DATABASE IF NOT EXISTS `{database}` CHARACTER SET utf8mb4"]
    for host in ("127.0.0.1", "localhost"):
        account = f"'{user}'@'{host}'"
        stmts += [
            f"CREATE USER IF NOT EXISTS {account} IDENTIFIED BY {pw}",
            f"ALTER USER {account} IDENTIFIED BY {pw}",
            f"GRANT ALL PRIVILEGES ON `{grant_db}`.* TO {account}",
        ]
    return ";\n".join(stmts) + ";\n"


def _sql_string(value: str) -> str:
    """A single-quoted SQL string literal (default sql_mode, i.e. backslash escapes on)."""
    if "\0" in value:
        raise ValueError("a NUL character cannot be used in a password")
    escaped = (
        value.replace("\\", "\\\\")
        .replace("'", "\\'")
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\x1a", "\\Z")
    )
    return f"'{escaped}'"


def _q(name: str) -> str:
    """Backtick-quote an identifier that has passed `validate_identifier`."""
    return f"`{validate_identifier(name)}`"


def _rolled_back_by_the_server(e: BaseException) -> bool:
    """A deadlock victim or a lock wait timeout: the server undid the work, which may run again."""
    return isinstance(e, OperationalError) and bool(e.args) and e.args[0] in _RETRY_TXN


def _retry_deadlocks(statement: Callable[..., T], *args: Any) -> T:
    """`statement(*args)` (one autocommit statement), run again when the server rolled it back
    as a deadlock victim or after a lock wait timeout: it was undone whole, so rerunning is safe."""
    for n in range(_TXN_ATTEMPTS):
        try:
            return statement(*args)
        except OperationalError as e:
            if not _rolled_back_by_the_server(e) or n + 1 == _TXN_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def _in_transaction(conn: pymysql.connections.Connection,
                    body: Callable[[pymysql.connections.Connection], bool]) -> bool:
    """`body(conn)` in one transaction: committed when it returns True, else rolled back. Run
    again whole when the server rolled it back as a deadlock victim or after a lock wait
    timeout (concurrent writers of the same keys); any other error rolls back and is raised."""
    for n in range(_TXN_ATTEMPTS):
        try:
            conn.begin()
            done = body(conn)
            if done:
                conn.commit()
            else:
                conn.rollback()
            return done
        except BaseException as e:
            try:
                conn.rollback()
            except Exception:  # a lost connection rolls back on the server
                pass
            if _rolled_back_by_the_server(e) and n + 1 < _TXN_ATTEMPTS:
                continue
            raise
    raise AssertionError("unreachable")


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


def _placeholders(n: int) -> str:
    """`(%s,%s,...)`: every value goes to the driver as a query parameter."""
    return "(" + ",".join(["%s"] * n) + ")"


# what pymysql's escape_string would change, and what JSON would escape
_UNSAFE_INLINE = re.compile(r"[\x00-\x1f'\"\\]")


def _distinct_keys(spec: TableSpec, keys: Sequence[Any]) -> list[Any]:
    """The distinct keys of a read, in the order given, validated (plain ASCII strings are
    checked with a few C calls for all of them, see `plain_string_keys`)."""
    plain = plain_string_keys(spec, keys)
    if plain is not None:
        return plain
    return list(dict.fromkeys(normalise_key(spec, k) for k in keys))


def _rows_of(spec: TableSpec, wanted: list[Any], by_key: bool) -> tuple[str, list[Any] | None]:
    """The FROM clause selecting the rows of the distinct keys `wanted` as `t`, and its
    parameters (None when the keys are inlined).

    By default the keys go as ONE JSON array that JSON_TABLE turns into rows joined to the
    table by primary key: MariaDB spends 11-18% less CPU on it than on a 250-key IN list
    (whose ranges it sorts and merges; `benchmarks/online_store.py`, `statement_in_list`), and
    the rows come back in the order of `wanted`. `by_key`: an IN list instead, for NDB, which
    reads it as one batch of primary-key lookups, and for a single key, where the IN form
    costs the server less (the join's fixed cost is not repaid below about 20 keys).

    pymysql binds parameters on the client: it formats each one into the statement text,
    which for 250 keys costs more than the rest of a read. Keys it would not change (int64;
    ASCII strings without quotes, backslashes and control characters; one regex over all of
    them) are therefore put in as they are, quoted once for the whole list; any other keys
    go through pymysql's escaping (a JSON array: as one parameter).
    """
    table, key = _q(spec.name), _q(spec.key)
    ints = spec.key_type == "int64"  # normalised: Python ints in range
    joined = "" if ints else "".join(wanted)
    inline = ints or (joined.isascii() and _UNSAFE_INLINE.search(joined) is None)
    if by_key:
        if inline:
            keys_sql = "(" + ",".join(map(str, wanted)) + ")" if ints else "('" + "','".join(wanted) + "')"
            return f"{table} AS t WHERE t.{key} IN {keys_sql}", None
        return f"{table} AS t WHERE t.{key} IN {_placeholders(len(wanted))}", list(wanted)
    if inline:
        doc = "'[" + ",".join(map(str, wanted)) + "]'" if ints else "'[\"" + '","'.join(wanted) + "\"]'"
        params = None
    else:
        doc, params = "%s", [json.dumps(wanted, ensure_ascii=False)]
    key_type = _KEY_STRING if not ints else "BIGINT"
    return (f"JSON_TABLE({doc}, '$[*]' COLUMNS (k {key_type} PATH '$')) AS j "
            f"JOIN {table} AS t ON t.{key} = j.k"), params


def _concat(conn: pymysql.connections.Connection, reads: list[tuple[str, tuple[str, list[Any] | None]]]) -> list[bytes]:
    """`GROUP_CONCAT(t.column SEPARATOR '')` of each (column, (FROM clause, parameters)) in
    one statement (parameters: of the only read)."""
    sql = "SELECT " + ", ".join(f"(SELECT GROUP_CONCAT(t.{col} SEPARATOR '') FROM {src})" for col, (src, _) in reads)
    params = reads[0][1][1] if len(reads) == 1 else None
    with conn.cursor() as cur:
        cur.execute(sql, params)
        values = cur.fetchone()
        if not cur.warning_count:
            return [b"" if v is None else bytes(v) for v in values]
        # A value cut at group_concat_max_len (or NULL past max_allowed_packet) comes with a
        # warning: read the rows instead.
        out = []
        for col, (src, src_params) in reads:
            cur.execute(f"SELECT t.{col} FROM {src}", src_params)
            out.append(b"".join(r[0] for r in cur.fetchall() if r[0] is not None))
        return out


def _upsert_sql(spec: TableSpec, newer_column: str | None) -> str:
    """INSERT ... ON DUPLICATE KEY UPDATE for all columns of `spec`; with `newer_column`, a
    stored row is replaced only when the new value is >= the stored one (assignments run left
    to right, so the condition column is assigned last)."""
    cols = list(spec.columns)
    updates = [c for c in cols if c != spec.key] or [spec.key]
    if newer_column is None:
        sets = [f"{_q(c)}=VALUES({_q(c)})" for c in updates]
    else:
        n = _q(newer_column)
        cond = f"({n} IS NULL OR VALUES({n}) >= {n})"
        ordered = [c for c in updates if c != newer_column] + [newer_column]
        sets = [f"{_q(c)}=IF({cond}, VALUES({_q(c)}), {_q(c)})" for c in ordered]
    return (
        f"INSERT INTO {_q(spec.name)} ({', '.join(_q(c) for c in cols)}) "
        f"VALUES ({', '.join(['%s'] * len(cols))}) "
        f"ON DUPLICATE KEY UPDATE {', '.join(sets)}"
    )


def _decode_row(spec: TableSpec, cols: list[str], row: tuple[Any, ...]) -> dict[str, Any]:
    rec = dict(zip(cols, row, strict=True))
    for c in cols:
        if spec.columns[c] == "json" and rec[c] is not None:
            rec[c] = json.loads(rec[c])
        elif spec.columns[c] == "bytes" and rec[c] is not None:
            rec[c] = bytes(rec[c])
    return rec


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
        key_form: str = "auto",
        tls: str = "preferred",
        tls_ca: str | None = None,
    ) -> None:
        """Connect (eagerly, so a wrong address or password fails here).

        Args:
            host, port, database, user, password: where and as whom to connect.
            connect_timeout: seconds to wait for the TCP connection and handshake.
            read_timeout, write_timeout: socket timeouts of one call (None: wait forever).
            chunk_size: rows per executemany call inside a write transaction.
            key_form: how reads send their keys (`_rows_of`): "json" (one JSON array joined by
                JSON_TABLE), "in" (an IN list) or "auto" (an IN list under NDB and for one key,
                else JSON).
            tls, tls_ca: TLS to the server (`tls_options`; DatabaseConfig.tls).
        Raises:
            ConnectionError: the server cannot be reached or refuses the login.
            ValueError: an unknown key_form.
        """
        if key_form not in ("auto", "json", "in"):
            raise ValueError(f"key_form must be 'auto', 'json' or 'in', not {key_form!r}")
        self._key_form = key_form
        if not isinstance(database, str) or not _DATABASE_RE.match(database):
            raise ValueError(f"invalid database name {database!r}: must match {_DATABASE_RE.pattern}")
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
            init_command=f"SET SESSION group_concat_max_len = {GROUP_CONCAT_MAX_LEN}",
            **tls_options(tls, tls_ca),
        )
        self._tls = tls
        self._chunk_size = chunk_size
        self._lock = threading.RLock()  # re-entered by a dictionary read inside update_rows
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
        return cls(cfg.host, cfg.port, cfg.database, cfg.user, password, **({"tls": cfg.tls, "tls_ca": cfg.tls_ca} | kwargs))

    def __repr__(self) -> str:
        return f"MySQLOnlineStore({self._where})"

    @property
    def concat_order(self) -> str:  # type: ignore[override]
        """"request" (the JSON_TABLE join, `_rows_of`), or "key" for IN lists (in ascending
        order as a primary-key range read returns them; a hint, see OnlineStore)."""
        if self._key_form == "in" or (self._key_form == "auto" and self._engine == "NDBCLUSTER"):
            return "key"
        return "request"

    def __reduce__(self) -> Any:
        raise TypeError(
            "MySQLOnlineStore holds a live connection and cannot be pickled; "
            "create it inside the worker/actor with MySQLOnlineStore.from_config(...)"
        )

    # connection handling --------------------------------------------------------------------
    def _connect(self) -> pymysql.connections.Connection:
        try:
            self._conn = pymysql.connect(**self._params)
        except (pymysql.err.MySQLError, ssl.SSLError) as e:
            self._conn = None
            tls = "" if self._tls == "preferred" else f" (tls: {self._tls})"
            raise ConnectionError(f"cannot connect to the online store {self._where}{tls}: {e}") from None
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

    def write_batch(
        self, spec: TableSpec, rows: list[dict[str, Any]], *, newer_column: str | None = None,
        marker: tuple[TableSpec, dict[str, Any]] | None = None,
    ) -> int:
        newer = check_newer_column(spec, newer_column)
        prepared = prepare_rows(spec, rows)  # validates everything before any SQL is sent
        if newer is not None:
            prepared = latest_per_key(spec, prepared, newer)
        # the marker is an upsert too: a retry after a commit whose answer was lost writes it again
        marked = (_upsert_sql(marker[0], None), prepare_rows(marker[0], [marker[1]])[0]) if marker else None
        if not prepared and marked is None:
            return 0
        sql = _upsert_sql(spec, newer_column)
        step = self._chunk_size

        def upsert(conn: pymysql.connections.Connection) -> bool:
            with conn.cursor() as cur:
                for i in range(0, len(prepared), step):
                    cur.executemany(sql, prepared[i : i + step])
                if marked is not None:
                    cur.execute(*marked)
            return True

        self._run(lambda conn: _in_transaction(conn, upsert))
        return len(prepared)

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
        head = f"SELECT {', '.join(_q(c) for c in select)} FROM {_q(spec.name)} WHERE {_q(spec.key)} IN "

        sql = head + _placeholders(len(wanted))

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

    def read_concat(self, spec: TableSpec, keys: Sequence[Any], column: str) -> bytes:
        return self.read_concat_many([(spec, keys, column)])[0]

    def read_concat_many(self, reads: Sequence[tuple[TableSpec, Sequence[Any], str]]) -> list[bytes]:
        """Several tables' `read_concat` in ONE statement, a scalar subquery per table
        (`SELECT (SELECT GROUP_CONCAT(..) ..), (SELECT ..)`): one round trip for all.

        The keys reach the server as ONE JSON array joined to the table (`_rows_of`); a
        single key, and every read under NDBCLUSTER (which reads it as one batch of primary-key
        lookups), as an IN list instead."""
        asked: list[tuple[int, TableSpec, list[Any], str]] = []
        for i, (spec, keys, column) in enumerate(reads):
            check_bytes_column(spec, column)
            wanted = _distinct_keys(spec, keys)
            if wanted:
                asked.append((i, spec, wanted, _q(column)))
        if not asked:
            return [b"" for _ in reads]

        def op(conn: pymysql.connections.Connection) -> list[bytes]:
            in_list = self._key_form == "in" or (self._key_form == "auto" and self._engine_for(conn) == "NDBCLUSTER")
            sources = [_rows_of(spec, wanted, in_list or (self._key_form == "auto" and len(wanted) == 1))
                       for _, spec, wanted, _ in asked]
            if len(sources) > 1 and any(params is not None for _, params in sources):
                # keys bound as parameters next to inlined ones (which may hold '%'): one at a time
                return [_concat(conn, [(col, src)])[0] for (_, _, _, col), src in zip(asked, sources, strict=True)]
            return _concat(conn, [(col, src) for (_, _, _, col), src in zip(asked, sources, strict=True)])

        out = [b""] * len(reads)
        for (i, _, _, _), value in zip(asked, self._run(op), strict=True):
            out[i] = value
        return out

    def table_stats(self, spec: TableSpec, max_column: str | None = None) -> dict[str, Any]:
        if max_column is not None:
            check_columns(spec, [max_column])
        top = f"MAX({_q(max_column)})" if max_column is not None else "NULL"

        def op(conn: pymysql.connections.Connection) -> dict[str, Any]:
            with conn.cursor() as cur:
                cur.execute(f"SELECT COUNT(*), {top} FROM {_q(spec.name)}")
                n, mx = cur.fetchone()
            return {"rows": int(n), "max": mx}

        return self._run(op)

    def update_rows(
        self,
        reads: Sequence[tuple[TableSpec, Any]],
        update: UpdateFn,
        *,
        once: tuple[TableSpec, dict[str, Any]] | None = None,
    ) -> bool:
        keys = [(spec, normalise_key(spec, k)) for spec, k in reads]
        once_sql = once_values = None
        if once is not None:
            once_spec = once[0]
            once_values = prepare_rows(once_spec, [once[1]])[0]
            once_sql = (
                f"INSERT INTO {_q(once_spec.name)} ({', '.join(_q(c) for c in once_spec.columns)}) "
                f"VALUES ({', '.join(['%s'] * len(once_spec.columns))})"
            )

        def attempt(conn: pymysql.connections.Connection) -> bool:
            with conn.cursor() as cur:
                if once_sql is not None:
                    try:
                        cur.execute(once_sql, once_values)
                    except pymysql.err.IntegrityError as e:
                        if e.args and e.args[0] == _ER_DUP_ENTRY:
                            return False
                        raise
                rows: list[dict[str, Any] | None] = []
                for spec, k in keys:
                    cols = list(spec.columns)
                    cur.execute(
                        f"SELECT {', '.join(_q(c) for c in cols)} FROM {_q(spec.name)} "
                        f"WHERE {_q(spec.key)} = %s FOR UPDATE",
                        (k,),
                    )
                    got = cur.fetchone()
                    rows.append(None if got is None else _decode_row(spec, cols, got))
                writes = [(spec, prepare_rows(spec, [row])) for spec, row in update(rows)]
                for spec, prepared in writes:
                    cur.executemany(_upsert_sql(spec, None), prepared)
            return True

        return self._run(lambda conn: _in_transaction(conn, attempt))

    def dictionary_entries(self, after: int = 0) -> list[tuple[int, str]]:
        def op(conn: pymysql.connections.Connection) -> list[tuple[int, str]]:
            with conn.cursor() as cur:
                cur.execute(f"SELECT `code`, `value` FROM {_q(DICTIONARY_TABLE)} WHERE `code` > %s ORDER BY `code`",
                            (int(after),))
                return [(int(c), bytes(v).decode("utf-8")) for c, v in cur.fetchall()]

        try:
            return self._run(op)
        except TableNotFound:
            return []

    def dictionary_assign(self, values: Sequence[str]) -> dict[str, int]:
        wanted = check_dictionary_values(values)

        def codes(cur: pymysql.cursors.Cursor, part: list[bytes]) -> dict[str, int]:
            cur.execute(f"SELECT `value`, `code` FROM {_q(DICTIONARY_TABLE)} WHERE `value` IN {_placeholders(len(part))}",
                        part)
            return {bytes(v).decode("utf-8"): int(c) for v, c in cur.fetchall()}

        insert = f"INSERT IGNORE INTO {_q(DICTIONARY_TABLE)} (`value`) VALUES (%s)"

        def op(conn: pymysql.connections.Connection) -> dict[str, int]:
            self._ensure_dictionary(conn)
            out: dict[str, int] = {}
            # In sorted order (UTF-8 keeps code point order), concurrent writers lock the unique
            # index in the same order; a deadlock that still happens is retried.
            ordered = sorted(wanted)
            with conn.cursor() as cur:
                for i in range(0, len(ordered), 500):
                    part = [v.encode("utf-8") for v in ordered[i : i + 500]]
                    got = codes(cur, part)
                    new = [b for b in part if b.decode("utf-8") not in got]
                    if new:  # IGNORE: a value another writer coded meanwhile keeps its code
                        _retry_deadlocks(cur.executemany, insert, new)
                        got.update(codes(cur, new))
                    out.update(got)
            lost = [v for v in wanted if v not in out]
            if lost:
                raise RuntimeError(f"the online store's dictionary did not keep {lost[0][:40]!r}")
            return out

        return self._run(op) if wanted else {}

    def _ensure_dictionary(self, conn: pymysql.connections.Connection) -> None:
        engine = self._engine_for(conn)
        with conn.cursor() as cur:
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {_q(DICTIONARY_TABLE)} (`code` BIGINT NOT NULL AUTO_INCREMENT, "
                f"`value` VARBINARY({MAX_DICTIONARY_BYTES}) NOT NULL, PRIMARY KEY (`code`), UNIQUE KEY `value` (`value`)) "
                f"ENGINE={engine}"
            )

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

    def ping(self) -> None:
        def op(conn: pymysql.connections.Connection) -> None:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
                cur.fetchall()

        self._run(op)

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

    def server_statement_count(self) -> int:
        """Statements the server has run for all its clients (the global 'Questions' counter,
        this method's own included): a benchmark's count of what each request costs the store."""

        def op(conn: pymysql.connections.Connection) -> int:
            with conn.cursor() as cur:
                cur.execute("SHOW GLOBAL STATUS LIKE 'Questions'")
                row = cur.fetchone()
            return int(row[1])

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
