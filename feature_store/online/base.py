"""The online store interface: key -> feature row lookups on the serving hot path.

A table is described by a `TableSpec` (name, key column, column types). Stores upsert whole
rows in one transaction and read many keys in one round trip. `InMemoryOnlineStore` is a
dict-backed fake with the same semantics for unit tests; `feature_store.online.mysql`
holds the real MySQL-protocol implementation (RonDB in production, MariaDB locally).

Semantics shared by every store (the contract suite in tests/integration checks them):
- Rows are written whole: a column missing from a row is stored as None (NULL).
- Validation happens before anything is written, so a bad row means nothing is written; the
  error names the row index and the column.
- float64 NaN is stored as None; json values are any JSON-serialisable value (numpy arrays
  and scalars are converted) and come back decoded (tuples come back as lists); bytes values
  are stored verbatim (VARBINARY, bounded by MAX_BYTES).
- Table and column names are lower-case identifiers (`[a-z0-9_]`, not starting with a digit):
  SQL identifiers are case-insensitive, so one spelling per name avoids clashes.
- `write_batch(..., newer_column=c)` is a conditional upsert: a row replaces a stored row only
  when its value in column `c` is >= the stored one (ties: the new row wins), which lets
  late-arriving rows land without overwriting newer ones.
- `read_concat` returns the concatenation of one bytes column for many keys in ONE query, for
  values that carry their own key and length (feature_store.codec): a store may aggregate on
  the server so the client decodes one value instead of one row per key.
- `update_rows` is a read-modify-write in one transaction, idempotent by a "once" row
  (an event id): a retried event is applied once.
"""

from __future__ import annotations

import json
import math
import numbers
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

IDENTIFIER_RE = re.compile(r"^[a-z_][a-z0-9_]{0,63}$")
COLUMN_TYPES = ("int64", "float64", "string", "json", "bytes")
KEY_TYPES = ("int64", "string")

# Size limits of the SQL column types (see mysql.py), enforced by every store alike.
MAX_KEY_CHARS = 64  # VARCHAR(64)
# MySQL-protocol servers (RonDB, MySQL, MariaDB) compare VARCHAR keys in their PAD SPACE
# collations without trailing spaces: 'a ' would find, and overwrite, the row of 'a'.
KEY_TRAILING_SPACE = "a string key cannot end with a space (the server would take it for the key without it)"
MAX_STRING_CHARS = 255  # VARCHAR(255)
MAX_JSON_BYTES = 65_535  # TEXT
MAX_BYTES = 14_000  # VARBINARY(14000): well inside an NDB row (about 30 KB) and an InnoDB row
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def validate_identifier(name: Any, what: str = "identifier") -> str:
    """Return `name` if it is a safe SQL identifier, else raise ValueError naming it."""
    if not isinstance(name, str) or not IDENTIFIER_RE.match(name):
        raise ValueError(f"invalid {what} {name!r}: must match {IDENTIFIER_RE.pattern}")
    return name


@dataclass(frozen=True)
class TableSpec:
    """Schema of one online table.

    Attributes:
        name: table name (a plain SQL identifier).
        key: the primary-key column; must be one of `columns` and of type "string" or "int64".
        columns: column name -> one of "int64", "float64", "string", "json", "bytes" (the key
            included).
    """

    name: str
    key: str
    columns: dict[str, str] = field(hash=False)

    def __post_init__(self) -> None:
        validate_identifier(self.name, "table name")
        if not isinstance(self.columns, dict) or not self.columns:
            raise ValueError(f"table {self.name!r}: columns must be a non-empty dict")
        object.__setattr__(self, "columns", dict(self.columns))  # a private copy: the spec is frozen
        lowered: dict[str, str] = {}
        for col, typ in self.columns.items():
            validate_identifier(col, f"column name in table {self.name!r}")
            if typ not in COLUMN_TYPES:
                raise ValueError(
                    f"table {self.name!r}: column {col!r} has type {typ!r}; expected one of {COLUMN_TYPES}"
                )
            # SQL column names are case-insensitive: two columns differing only in case clash.
            if col.lower() in lowered:
                raise ValueError(f"table {self.name!r}: columns {lowered[col.lower()]!r} and {col!r} clash")
            lowered[col.lower()] = col
        validate_identifier(self.key, f"key column of table {self.name!r}")
        if self.key not in self.columns:
            raise ValueError(f"table {self.name!r}: key column {self.key!r} is not among the columns")
        if self.columns[self.key] not in KEY_TYPES:
            raise ValueError(
                f"table {self.name!r}: key column {self.key!r} has type {self.columns[self.key]!r}; "
                f"expected one of {KEY_TYPES}"
            )

    @property
    def key_type(self) -> str:
        return self.columns[self.key]

    @property
    def value_columns(self) -> list[str]:
        """The non-key columns, in declaration order."""
        return [c for c in self.columns if c != self.key]


class TableNotFound(LookupError):
    """The table was never created with `ensure_table` (or was dropped)."""


class SchemaMismatch(ValueError):
    """`ensure_table` found an existing table whose columns do not match the spec."""


# ---------------------------------------------------------------------------------------------
# Validation and normalisation shared by all stores.


def _json_default(o: Any) -> Any:
    tolist = getattr(o, "tolist", None)  # numpy arrays and numpy scalars
    if callable(tolist):
        return tolist()
    raise TypeError(f"object of type {type(o).__name__} is not JSON serialisable")


def encode_json(value: Any) -> str:
    """JSON text of a json-column value (numpy arrays/scalars allowed; NaN/inf rejected)."""
    return json.dumps(
        value, default=_json_default, allow_nan=False, ensure_ascii=False, separators=(",", ":")
    )


def _normalise_value(typ: str, value: Any, *, is_key: bool) -> Any:
    """Return the canonical Python value of one cell, or raise ValueError/TypeError (no context)."""
    if value is None:
        if is_key:
            raise ValueError("key is None")
        return None
    if typ == "int64":
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"expected an integer, got {type(value).__name__}")
        v = int(value)
        if not INT64_MIN <= v <= INT64_MAX:
            raise ValueError(f"integer {v} out of int64 range")
        return v
    if typ == "float64":
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"expected a number, got {type(value).__name__}")
        v = float(value)
        if math.isnan(v):
            return None
        if math.isinf(v):
            raise ValueError("infinite floats cannot be stored")
        return v
    if typ == "string":
        if not isinstance(value, str):
            raise TypeError(f"expected a str, got {type(value).__name__}")
        limit = MAX_KEY_CHARS if is_key else MAX_STRING_CHARS
        if len(value) > limit:
            raise ValueError(f"string of {len(value)} characters exceeds the limit of {limit}")
        if is_key and value.endswith(" "):
            raise ValueError(KEY_TRAILING_SPACE)
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("string is not valid Unicode (lone surrogate)") from None
        return value
    if typ == "bytes":
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"expected bytes, got {type(value).__name__}")
        value = bytes(value)
        if len(value) > MAX_BYTES:
            raise ValueError(f"{len(value)} bytes exceed the limit of {MAX_BYTES}")
        return value
    # json
    try:
        text = encode_json(value)
        size = len(text.encode("utf-8"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"not JSON-serialisable: {e}") from None
    if size > MAX_JSON_BYTES:
        raise ValueError(f"JSON text exceeds {MAX_JSON_BYTES} bytes")
    return text


def normalise_key(spec: TableSpec, key: Any) -> Hashable:
    """Canonical Python form of a key (numpy ints -> int); raises ValueError for a wrong type."""
    try:
        return _normalise_value(spec.key_type, key, is_key=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"table {spec.name!r}: invalid key {key!r}: {e}") from None


def storable_key(spec: TableSpec, key: Any) -> bool:
    """Whether a row of `spec` can have `key`: False for a value of the key's type that none can
    (a string over MAX_KEY_CHARS, an integer outside int64, a lone surrogate).

    Raises:
        ValueError: the key is of another type (a caller's mistake, not a missing row).
    """
    try:
        _normalise_value(spec.key_type, key, is_key=True)
    except TypeError as e:
        raise ValueError(f"table {spec.name!r}: invalid key {key!r}: {e}") from None
    except ValueError:
        return False
    return True


def plain_string_keys(spec: TableSpec, keys: Sequence[Any]) -> list[str] | None:
    """The distinct keys, when they are all short ASCII str of a string-keyed table (the common
    case, checked with a few C calls instead of one validation per key); else None."""
    if spec.key_type != "string" or not keys:
        return None
    if set(map(type, keys)) != {str}:
        return None
    if max(map(len, keys)) > MAX_KEY_CHARS or not "".join(keys).isascii():
        return None
    return list(dict.fromkeys(keys))


def prepare_rows(spec: TableSpec, rows: Sequence[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Validate every row and return tuples in `spec.columns` order, json columns as JSON text.

    Nothing is returned unless every row is valid, which is what makes writes all-or-nothing.

    Raises:
        ValueError: naming the row index and the column of the first bad value.
    """
    cols = list(spec.columns.items())
    known = spec.columns
    out: list[tuple[Any, ...]] = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"table {spec.name!r}: row {i}: expected a dict, got {type(row).__name__}")
        if spec.key not in row:
            raise ValueError(f"table {spec.name!r}: row {i}: missing key column {spec.key!r}")
        for col in row:
            if col not in known:
                raise ValueError(f"table {spec.name!r}: row {i}: unknown column {col!r}")
        values = []
        for col, typ in cols:
            try:
                values.append(_normalise_value(typ, row.get(col), is_key=(col == spec.key)))
            except (TypeError, ValueError) as e:
                raise ValueError(f"table {spec.name!r}: row {i}: column {col!r} ({typ}): {e}") from None
        out.append(tuple(values))
    return out


def check_columns(spec: TableSpec, columns: Sequence[str] | None) -> list[str]:
    """The columns a read returns: all of `spec.columns` (key included) when None."""
    if columns is None:
        return list(spec.columns)
    if isinstance(columns, str):
        raise ValueError(f"table {spec.name!r}: columns must be a sequence of names, not a str")
    cols = list(dict.fromkeys(columns))
    for c in cols:
        if c not in spec.columns:
            raise ValueError(f"table {spec.name!r}: unknown column {c!r}")
    return cols


def check_newer_column(spec: TableSpec, column: str | None) -> int | None:
    """Position of the conditional-upsert column in `spec.columns` (None when not given)."""
    if column is None:
        return None
    if spec.columns.get(column) != "int64" or column == spec.key:
        raise ValueError(f"table {spec.name!r}: newer_column {column!r} must be a non-key int64 column")
    return list(spec.columns).index(column)


def check_bytes_column(spec: TableSpec, column: str) -> None:
    if spec.columns.get(column) != "bytes":
        raise ValueError(f"table {spec.name!r}: {column!r} is not a bytes column")


# A read-modify-write callback: the rows read (None where absent) -> the rows to upsert.
UpdateFn = Callable[[list[dict[str, Any] | None]], Sequence[tuple[TableSpec, dict[str, Any]]]]


class AlreadyApplied(Exception):
    """Raised inside stores when the `once` row of `update_rows` is already stored."""


# ---------------------------------------------------------------------------------------------


class OnlineStore(ABC):
    """Key-value access to feature rows: upserts in one transaction, one query per batch read."""

    #: How `read_concat` usually arranges its values, a hint for decoders (which check it):
    #: "request" (the distinct keys in the order asked), "key" (ascending keys) or "any".
    concat_order = "any"

    @abstractmethod
    def ensure_table(self, spec: TableSpec) -> None:
        """Create the table if it does not exist.

        Args:
            spec: the table schema.
        Raises:
            SchemaMismatch: the table exists but lacks a column of the spec or has another type/key.
        """

    @abstractmethod
    def write_batch(
        self, spec: TableSpec, rows: list[dict[str, Any]], *, newer_column: str | None = None,
        marker: tuple[TableSpec, dict[str, Any]] | None = None,
    ) -> int:
        """Upsert whole rows in ONE transaction: all rows are written or none.

        Args:
            spec: the table schema (the table must exist).
            rows: dicts holding the key column and any subset of the other columns; a missing
                column is written as None.
            newer_column: an int64 column (e.g. the event time); when given, a row replaces a
                stored row only if its value is >= the stored one (NULL counts as oldest), and
                within the batch the row with the largest value wins (ties: the later row).
            marker: (spec, row), one more row upserted in the same transaction, even when `rows`
                is empty: finding it later proves that the batch committed (the feature store's
                crash recovery reads it).
        Returns:
            The number of rows written (an empty list and no marker sends nothing and returns 0).
        Raises:
            ValueError: a row lacks the key, has an unknown column or a value of the wrong type;
                the message names the row index and the column. Nothing is written.
            TableNotFound: the table does not exist.
        """

    @abstractmethod
    def read_batch(
        self, spec: TableSpec, keys: Sequence[Any], columns: Sequence[str] | None = None
    ) -> dict[Any, dict[str, Any]]:
        """Read many keys with ONE query.

        Args:
            spec: the table schema.
            keys: keys to look up (duplicates allowed; numpy integers accepted).
            columns: columns to return; None means all columns of the spec, the key included.
        Returns:
            key -> {column: value} with the columns in the requested order; keys that are not
            stored are absent; NULL/NaN read as None; json columns decoded. No keys: {} and
            no query.
        Raises:
            TableNotFound: the table does not exist.
            ValueError: an unknown column or a key of the wrong type.
        """

    @abstractmethod
    def read_concat(self, spec: TableSpec, keys: Sequence[Any], column: str) -> bytes:
        """The values of one bytes column for many keys, concatenated, with ONE query.

        The values must be self-delimiting (each carries its own length and key, see
        feature_store.codec): the order of the values is unspecified and keys that are not
        stored contribute nothing.

        Args:
            spec: the table schema.
            keys: keys to look up (duplicates are read once).
            column: a column of type "bytes".
        Returns:
            The concatenated values (b"" when no key is stored; no query when `keys` is empty).
        Raises:
            TableNotFound: the table does not exist.
            ValueError: `column` is not a bytes column, or a key has the wrong type.
        """

    def read_concat_many(self, reads: Sequence[tuple[TableSpec, Sequence[Any], str]]) -> list[bytes]:
        """`read_concat` of several (spec, keys, column) reads, in ONE statement where the store
        can (a request's reads of several feature groups in one round trip); here, one by one.

        Returns:
            One concatenation per read, in the order of `reads`.
        """
        return [self.read_concat(spec, keys, column) for spec, keys, column in reads]

    @abstractmethod
    def table_stats(self, spec: TableSpec, max_column: str | None = None) -> dict[str, Any]:
        """Row count (and the largest value of one column) of a table, in one query.

        Args:
            spec: the table schema.
            max_column: a column whose maximum to return (None: none).
        Returns:
            {"rows": int, "max": value or None}.
        Raises:
            TableNotFound: the table does not exist.
        """

    @abstractmethod
    def update_rows(
        self,
        reads: Sequence[tuple[TableSpec, Any]],
        update: UpdateFn,
        *,
        once: tuple[TableSpec, dict[str, Any]] | None = None,
    ) -> bool:
        """Read-modify-write in ONE transaction, applied at most once per `once` row.

        1. When `once` = (spec, row) is given, the row is inserted; if its key is already
           stored, nothing else happens and False is returned (the event was applied before).
        2. The rows named by `reads` are read (and locked until commit); `update(rows)` gets
           them in order (None where absent) and returns (spec, row) pairs to upsert.
        3. Everything commits together, or nothing does (an exception in `update` or a lost
           connection rolls back). `update` may be called more than once (deadlock retry): it
           must depend only on its argument.

        Returns:
            True if applied now, False if `once` was already stored.
        Raises:
            ValueError: a row to write is invalid (nothing is written).
            TableNotFound: a table does not exist.
        """

    @abstractmethod
    def dictionary_entries(self, after: int = 0) -> list[tuple[int, str]]:
        """The string dictionary's entries (code, value) with a code above `after`, in code
        order (feature_store.dictionary); none while no value has a code."""

    @abstractmethod
    def dictionary_assign(self, values: Sequence[str]) -> dict[str, int]:
        """value -> code for `values`, giving each value that has none a new code (codes are
        positive, unique, never reused or changed; concurrent callers get the same code for
        the same value). Values are compared exactly (case, trailing spaces).

        Raises:
            ValueError: a value is not a str or longer than 1020 bytes of UTF-8 (nothing assigned).
        """

    @abstractmethod
    def drop_table(self, spec: TableSpec) -> None:
        """Drop the table if it exists.

        Args:
            spec: the table schema (only its name is used).
        """

    @abstractmethod
    def list_tables(self) -> list[str]:
        """Returns: the names of the tables in the store, sorted."""

    def ping(self) -> None:
        """Raise when the store cannot be reached (readiness checks)."""
        self.list_tables()

    @abstractmethod
    def close(self) -> None:
        """Release the connection; further calls are not allowed (idempotent)."""

    def statement_count(self) -> int:
        """Diagnostic: statements this store has sent to its backend so far (tests, benchmarks).

        Returns:
            A monotone counter within one connection; differences between two calls count the
            statements issued in between.
        """
        raise NotImplementedError

    def __enter__(self) -> OnlineStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InMemoryOnlineStore(OnlineStore):
    """A dict-backed fake with the same semantics as the SQL stores, for unit tests."""

    concat_order = "request"

    def __init__(self) -> None:
        self._tables: dict[str, tuple[TableSpec, dict[Any, tuple[Any, ...]]]] = {}
        self._dictionary: dict[str, int] = {}
        self._lock = threading.RLock()  # re-entered by a dictionary read inside update_rows
        self._statements = 0
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("InMemoryOnlineStore is closed")

    def _table(self, spec: TableSpec) -> tuple[TableSpec, dict[Any, tuple[Any, ...]]]:
        try:
            return self._tables[spec.name]
        except KeyError:
            raise TableNotFound(f"table {spec.name!r} does not exist") from None

    def ensure_table(self, spec: TableSpec) -> None:
        with self._lock:
            self._check_open()
            self._statements += 1
            existing = self._tables.get(spec.name)
            if existing is None:
                self._tables[spec.name] = (spec, {})
                return
            check_compatible(spec, dict(existing[0].columns), existing[0].key)

    def write_batch(
        self, spec: TableSpec, rows: list[dict[str, Any]], *, newer_column: str | None = None,
        marker: tuple[TableSpec, dict[str, Any]] | None = None,
    ) -> int:
        newer = check_newer_column(spec, newer_column)
        prepared = prepare_rows(spec, rows)
        if newer is not None:
            prepared = latest_per_key(spec, prepared, newer)
        marked = (marker[0], prepare_rows(marker[0], [marker[1]])) if marker is not None else None
        if not prepared and marked is None:
            return 0
        with self._lock:
            self._check_open()
            self._table(spec)
            if marked is not None:
                self._table(marked[0])
            self._statements += 1
            self._upsert(spec, prepared, newer)
            if marked is not None:
                self._upsert(*marked)
        return len(prepared)

    def _upsert(self, spec: TableSpec, prepared: list[tuple[Any, ...]], newer: int | None = None) -> None:
        stored_spec, data = self._table(spec)
        key_idx = list(spec.columns).index(spec.key)
        stored_cols = list(stored_spec.columns)
        newer_stored = stored_cols.index(list(spec.columns)[newer]) if newer is not None else None
        for values in prepared:
            old = data.get(values[key_idx])
            if newer is not None and old is not None and old[newer_stored] is not None:
                if values[newer] is None or values[newer] < old[newer_stored]:
                    continue
            by_col = dict(zip(spec.columns, values, strict=True))
            # Like SQL's ON DUPLICATE KEY UPDATE: columns outside this spec keep their value.
            data[values[key_idx]] = tuple(
                by_col[c] if c in by_col else (old[i] if old is not None else None)
                for i, c in enumerate(stored_cols)
            )

    def _decode(self, spec: TableSpec, stored_spec: TableSpec, row: tuple[Any, ...], cols: list[str]) -> dict:
        index = {c: i for i, c in enumerate(stored_spec.columns)}
        rec = {}
        for c in cols:
            v = row[index[c]]
            rec[c] = json.loads(v) if spec.columns[c] == "json" and v is not None else v
        return rec

    def read_batch(
        self, spec: TableSpec, keys: Sequence[Any], columns: Sequence[str] | None = None
    ) -> dict[Any, dict[str, Any]]:
        cols = check_columns(spec, columns)
        wanted = list(dict.fromkeys(normalise_key(spec, k) for k in keys))
        if not wanted:
            return {}
        with self._lock:
            self._check_open()
            stored_spec, data = self._table(spec)
            self._statements += 1
            out: dict[Any, dict[str, Any]] = {}
            for k in wanted:
                row = data.get(k)
                if row is not None:
                    out[k] = self._decode(spec, stored_spec, row, cols)
            return out

    def read_concat(self, spec: TableSpec, keys: Sequence[Any], column: str) -> bytes:
        return self.read_concat_many([(spec, keys, column)])[0]

    def read_concat_many(self, reads: Sequence[tuple[TableSpec, Sequence[Any], str]]) -> list[bytes]:
        asked = []
        for spec, keys, column in reads:
            check_bytes_column(spec, column)
            asked.append((spec, list(dict.fromkeys(normalise_key(spec, k) for k in keys)), column))
        if not any(wanted for _, wanted, _ in asked):
            return [b"" for _ in asked]
        with self._lock:
            self._check_open()
            tables = [self._table(spec) if wanted else None for spec, wanted, _ in asked]  # these must exist
            self._statements += 1
            out = []
            for (_, wanted, column), table in zip(asked, tables, strict=True):
                if table is None:
                    out.append(b"")
                    continue
                stored_spec, data = table
                pos = list(stored_spec.columns).index(column)
                out.append(b"".join(row[pos] for k in wanted
                                    if (row := data.get(k)) is not None and row[pos] is not None))
            return out

    def table_stats(self, spec: TableSpec, max_column: str | None = None) -> dict[str, Any]:
        if max_column is not None:
            check_columns(spec, [max_column])
        with self._lock:
            self._check_open()
            stored_spec, data = self._table(spec)
            self._statements += 1
            top = None
            if max_column is not None:
                pos = list(stored_spec.columns).index(max_column)
                values = [r[pos] for r in data.values() if r[pos] is not None]
                top = max(values) if values else None
            return {"rows": len(data), "max": top}

    def update_rows(
        self,
        reads: Sequence[tuple[TableSpec, Any]],
        update: UpdateFn,
        *,
        once: tuple[TableSpec, dict[str, Any]] | None = None,
    ) -> bool:
        keys = [(spec, normalise_key(spec, k)) for spec, k in reads]
        once_prepared = prepare_rows(once[0], [once[1]])[0] if once is not None else None
        with self._lock:
            self._check_open()
            self._statements += 1
            if once is not None:
                once_spec = once[0]
                _, once_data = self._table(once_spec)
                if once_prepared[list(once_spec.columns).index(once_spec.key)] in once_data:
                    return False
            rows: list[dict[str, Any] | None] = []
            for spec, k in keys:
                stored_spec, data = self._table(spec)
                row = data.get(k)
                rows.append(None if row is None else self._decode(spec, stored_spec, row, list(spec.columns)))
            writes = [(spec, prepare_rows(spec, [row])) for spec, row in update(rows)]
            for spec, _ in writes:
                self._table(spec)
            # everything validated: apply (the lock makes it atomic for readers)
            if once is not None:
                self._upsert(once[0], [once_prepared])
            for spec, prepared in writes:
                self._upsert(spec, prepared)
            return True

    def dictionary_entries(self, after: int = 0) -> list[tuple[int, str]]:
        with self._lock:
            self._check_open()
            self._statements += 1
            return sorted((c, v) for v, c in self._dictionary.items() if c > after)

    def dictionary_assign(self, values: Sequence[str]) -> dict[str, int]:
        wanted = check_dictionary_values(values)
        with self._lock:
            self._check_open()
            self._statements += 1
            for v in wanted:
                self._dictionary.setdefault(v, len(self._dictionary) + 1)
            return {v: self._dictionary[v] for v in wanted}

    def drop_table(self, spec: TableSpec) -> None:
        with self._lock:
            self._check_open()
            self._statements += 1
            self._tables.pop(spec.name, None)

    def list_tables(self) -> list[str]:
        with self._lock:
            self._check_open()
            self._statements += 1
            return sorted(s.name for s, _ in self._tables.values())

    def close(self) -> None:
        self._closed = True

    def statement_count(self) -> int:
        return self._statements


MAX_DICTIONARY_BYTES = 1020  # the dictionary's value column: VARBINARY(1020)


def check_dictionary_values(values: Sequence[Any]) -> list[str]:
    """The distinct values, each checked to be a str of at most 1020 bytes of UTF-8."""
    wanted = list(dict.fromkeys(values))
    for v in wanted:
        if not isinstance(v, str):
            raise ValueError(f"dictionary value {v!r}: expected a str, got {type(v).__name__}")
        try:
            size = len(v.encode("utf-8"))
        except UnicodeEncodeError:
            raise ValueError(f"dictionary value {v[:40]!r}: not valid Unicode (lone surrogate)") from None
        if size > MAX_DICTIONARY_BYTES:
            raise ValueError(f"dictionary value {v[:40]!r}...: {size} bytes, above {MAX_DICTIONARY_BYTES}")
    return wanted


def latest_per_key(spec: TableSpec, prepared: list[tuple[Any, ...]], newer: int) -> list[tuple[Any, ...]]:
    """Keep, per key, the row with the largest `newer` value (ties and NULLs: the later row)."""
    return keep_latest(prepared, list(spec.columns).index(spec.key), newer)


def keep_latest(rows: Sequence[Any], key: Any, newer: Any) -> list[Any]:
    """Per `row[key]`, the row with the largest `row[newer]`: ties go to the later row, None
    counts as oldest. The rule an upsert with `newer_column` applies (`write_batch`), for
    prepared tuples (column indexes) and row dicts (column names) alike."""
    best: dict[Any, Any] = {}
    for row in rows:
        old = best.get(row[key])
        if old is None or old[newer] is None or (row[newer] is not None and row[newer] >= old[newer]):
            best[row[key]] = row
    return list(best.values())


def check_compatible(spec: TableSpec, existing: dict[str, str], existing_key: str | None) -> None:
    """Raise SchemaMismatch unless an existing table (column -> type) can hold `spec`'s rows."""
    problems = []
    if existing_key is None or existing_key.lower() != spec.key.lower():
        problems.append(f"key is {existing_key!r}, spec wants {spec.key!r}")
    lower = {c.lower(): t for c, t in existing.items()}
    for col, typ in spec.columns.items():
        have = lower.get(col.lower())
        if have is None:
            problems.append(f"column {col!r} is missing")
        elif have != typ:
            problems.append(f"column {col!r} is {have}, spec wants {typ}")
    if problems:
        raise SchemaMismatch(f"table {spec.name!r} exists with a different schema: " + "; ".join(problems))
