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
  and scalars are converted) and come back decoded (tuples come back as lists).
"""

from __future__ import annotations

import json
import math
import numbers
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

IDENTIFIER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
COLUMN_TYPES = ("int64", "float64", "string", "json")
KEY_TYPES = ("int64", "string")

# Size limits of the SQL column types (see mysql.py), enforced by every store alike.
MAX_KEY_CHARS = 64  # VARCHAR(64)
MAX_STRING_CHARS = 255  # VARCHAR(255)
MAX_JSON_BYTES = 65_535  # TEXT
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
        columns: column name -> one of "int64", "float64", "string", "json" (the key included).
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
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("string is not valid Unicode (lone surrogate)") from None
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


# ---------------------------------------------------------------------------------------------


class OnlineStore(ABC):
    """Key-value access to feature rows: upserts in one transaction, one query per batch read."""

    @abstractmethod
    def ensure_table(self, spec: TableSpec) -> None:
        """Create the table if it does not exist.

        Args:
            spec: the table schema.
        Raises:
            SchemaMismatch: the table exists but lacks a column of the spec or has another type/key.
        """

    @abstractmethod
    def write_batch(self, spec: TableSpec, rows: list[dict[str, Any]]) -> int:
        """Upsert whole rows in ONE transaction: all rows are written or none.

        Args:
            spec: the table schema (the table must exist).
            rows: dicts holding the key column and any subset of the other columns; a missing
                column is written as None.
        Returns:
            The number of rows written (an empty list sends nothing and returns 0).
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
    def drop_table(self, spec: TableSpec) -> None:
        """Drop the table if it exists.

        Args:
            spec: the table schema (only its name is used).
        """

    @abstractmethod
    def list_tables(self) -> list[str]:
        """Returns: the names of the tables in the store, sorted."""

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

    def __init__(self) -> None:
        self._tables: dict[str, tuple[TableSpec, dict[Any, tuple[Any, ...]]]] = {}
        self._lock = threading.Lock()
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

    def write_batch(self, spec: TableSpec, rows: list[dict[str, Any]]) -> int:
        prepared = prepare_rows(spec, rows)
        if not prepared:
            return 0
        with self._lock:
            self._check_open()
            stored_spec, data = self._table(spec)
            self._statements += 1
            key_idx = list(spec.columns).index(spec.key)
            stored_cols = list(stored_spec.columns)
            for values in prepared:
                by_col = dict(zip(spec.columns, values, strict=True))
                old = data.get(values[key_idx])
                # Like SQL's ON DUPLICATE KEY UPDATE: columns outside this spec keep their value.
                data[values[key_idx]] = tuple(
                    by_col[c] if c in by_col else (old[i] if old is not None else None)
                    for i, c in enumerate(stored_cols)
                )
        return len(prepared)

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
            index = {c: i for i, c in enumerate(stored_spec.columns)}
            out: dict[Any, dict[str, Any]] = {}
            for k in wanted:
                row = data.get(k)
                if row is None:
                    continue
                rec = {}
                for c in cols:
                    v = row[index[c]]
                    rec[c] = json.loads(v) if spec.columns[c] == "json" and v is not None else v
                out[k] = rec
            return out

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
