"""The feature store: feature-group versions offline (Parquet) and online (one table each).

    fs = FeatureStore(workdir, online_store)
    fg = fs.create_feature_group(ARTICLES)            # a new version: v1, v2, ... side by side
    result = fg.insert(frame, validation="strict")    # offline append + online upsert of the latest rows
    rows = fg.read_online(["0108775015"])              # key -> row
    history = fg.read(start, end)                      # offline rows, event time in [start, end)
    ref = fs.write("articles", frame)                  # new version + insert, for the pipeline

An insert validates first (feature_store.validation): with policy "strict" any failed rule
rejects the batch before anything is written. It then stages the Parquet files, writes the
online rows in ONE transaction, and publishes the offline commit last, so a failed insert
leaves neither store changed. The online transaction also writes the commit's marker row (table
`fs_offline_commits`): when a process dies between that transaction and the publish, the next
insert into the version (or the next `get_feature_group` of it) finds the staged commit, sees
its marker online and publishes it, or, with no marker, removes it (`FeatureGroupVersion.recover`).
A write that fails is settled the same way at once: a transaction whose answer was lost with the
connection committed, and the insert succeeds; when the store cannot be asked, the commit waits
for the next insert or open. Either way both stores hold the batch or neither does.

An insert of more keys than one online transaction should hold (`max_txn_rows`, e.g. a new
version of a large group; NDB keeps a transaction's rows in memory until it commits) is written
in transactions of that size instead, the marker with the last. Such a commit goes forward once
it is staged: if its online write fails or its process dies before the last transaction, the
commit stays staged and the next insert, open or `recover()` writes its rows again (upserts that
keep the newer row: writing twice is harmless) and publishes it. The rows of its first
transactions are online in the meantime; they are not rolled back, since they may have replaced
older rows.

Online, a key's row is replaced only by a row with an event time >= the stored one
(`OnlineStore.write_batch(newer_column=...)`), so late-arriving rows never overwrite newer ones
and every online row equals the latest offline row of its key.

Each pipeline run writes new versions, and RonDB keeps every online table in memory:
`FeatureStore.retire_online(keep=2, protect=...)` (`rayrec features retire`, or the pipeline
with `database.keep_online_versions`) drops the online tables of older versions, never one a
manifest serves. A retired version is offline only: its Parquet files stay readable, online
reads of it and inserts into it are refused with a message.

Online rows are packed (feature_store.codec): the table holds the key, the event time in
microseconds and one VARBINARY value. The group definition of each online table is registered
in the store itself (table `fs_feature_groups`), so a reader needs only the table name, e.g. the
`online_table` of a manifest's FeatureGroupRef; it is cached per store after the first read.
"""
from __future__ import annotations

import json
import math
import time
import uuid
import weakref
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common.artifacts import FeatureGroupRef, atomic_write_text
from common.config import DatabaseConfig
from common.workdir import Workdir
from feature_store.codec import RowCodec
from feature_store.dictionary import Dictionary
from feature_store.groups import GROUPS
from feature_store.offline import OfflineTable, StagedCommit, latest_per_key, to_event_times, to_micros
from feature_store.online.base import (
    OnlineStore,
    SchemaMismatch,
    TableNotFound,
    TableSpec,
    keep_latest,
    normalise_key,
)
from feature_store.schema import ONLINE_ROW_COLUMN, ONLINE_TIME_COLUMN, FeatureGroup, check_name
from feature_store.validation import ValidationFailed, ValidationReport, check_policy, validate

REGISTRY = TableSpec(
    "fs_feature_groups",
    "table_name",
    {"table_name": "string", "group_name": "string", "version": "int64", "definition": "json", "created_us": "int64"},
)
META_FILE = "_meta.json"
PROGRESS_EVERY_S = 10.0  # a large insert's online write: seconds between progress lines
# One packed online row while an insert holds it: (key, event time in microseconds, packed bytes).
# A tuple takes about 120 bytes less than the dict the store is given (`_write_online`).
OnlineRow = tuple[Any, int, bytes]
PACK_CHUNK_ROWS = 10_000  # rows whose columns are Python values at once while an insert packs them
# One row per insert, written in the insert's online transaction: recovery's proof that it committed.
COMMITS = TableSpec(
    "fs_offline_commits",
    "commit_id",
    {"commit_id": "string", "table_name": "string", "commit_no": "int64", "written_us": "int64"},
)


def _codable_values(group: FeatureGroup, columns: Sequence[list[Any]]) -> list[str]:
    """The distinct values of the group's dictionary features that get a code (the others fail
    their row's packing with a message naming the feature)."""
    out: dict[str, None] = {}
    for f, col in zip(group.value_features, columns, strict=True):
        if not f.dictionary:
            continue
        for v in dict.fromkeys(v for v in col if type(v) is str):
            if f.limit is not None and len(v) > f.limit:
                continue
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                continue
            out[v] = None
    return list(out)


def table_spec(group: FeatureGroup, version: int) -> TableSpec:
    """The online table of a group version: key, event time (us), packed row."""
    return group.table_spec(version)


# ---------------------------------------------------------------------------------------------
# Online tables and their registry


@dataclass(frozen=True)
class OnlineTable:
    """What a reader needs to decode one online feature-group table."""

    group: FeatureGroup
    version: int
    spec: TableSpec
    codec: RowCodec


_TABLES: weakref.WeakKeyDictionary[OnlineStore, dict[str, OnlineTable]] = weakref.WeakKeyDictionary()
_DICTIONARIES: weakref.WeakKeyDictionary[OnlineStore, Dictionary] = weakref.WeakKeyDictionary()
_COMMIT_TABLE_MADE: weakref.WeakSet[OnlineStore] = weakref.WeakSet()


def _now_us() -> int:
    return int(datetime.now(UTC).timestamp() * 1e6)


def commit_marker(store: OnlineStore, table_name: str, commit: int) -> dict[str, Any]:
    """A new marker row for an insert's online transaction (its table created once per store)."""
    if store not in _COMMIT_TABLE_MADE:
        store.ensure_table(COMMITS)
        _COMMIT_TABLE_MADE.add(store)
    return marker_row(table_name, commit, uuid.uuid4().hex)


def marker_row(table_name: str, commit: int, commit_id: str) -> dict[str, Any]:
    return {"commit_id": commit_id, "table_name": table_name, "commit_no": int(commit), "written_us": _now_us()}


def marker_stored(store: OnlineStore, commit_id: str) -> bool:
    try:
        return bool(store.read_batch(COMMITS, [commit_id], ["commit_id"]))
    except TableNotFound:
        return False


def store_dictionary(store: OnlineStore) -> Dictionary:
    """The string dictionary of `store` as this process knows it (one per store)."""
    d = _DICTIONARIES.get(store)
    if d is None:
        d = _DICTIONARIES[store] = Dictionary(store.dictionary_entries, store.dictionary_assign)
    return d


def register_online_table(store: OnlineStore, group: FeatureGroup, version: int) -> OnlineTable:
    """Create the table of a group version and record its definition in the registry.

    Raises:
        SchemaMismatch: the table is registered with another definition.
    """
    spec = group.table_spec(version)
    store.ensure_table(REGISTRY)
    existing = store.read_batch(REGISTRY, [spec.name], ["definition"]).get(spec.name)
    if existing is not None and existing["definition"] != group.to_dict():
        raise SchemaMismatch(f"online table {spec.name!r} is registered with another definition of {group.name!r}")
    store.ensure_table(spec)
    if existing is None:
        store.write_batch(REGISTRY, [{
            "table_name": spec.name, "group_name": group.name, "version": int(version),
            "definition": group.to_dict(), "created_us": _now_us(),
        }])
    table = OnlineTable(group, int(version), spec, group.codec(store_dictionary(store)))
    _TABLES.setdefault(store, {})[spec.name] = table
    return table


def online_table(store: OnlineStore, table_name: str) -> OnlineTable:
    """The registered group definition of an online table (cached per store).

    Raises:
        TableNotFound: no feature group is registered under that table name.
    """
    cached = _TABLES.get(store, {}).get(table_name)
    if cached is not None:
        return cached
    try:
        row = store.read_batch(REGISTRY, [table_name]).get(table_name)
    except TableNotFound:
        row = None
    if row is None:
        raise TableNotFound(
            f"{table_name!r} is not a registered feature-group table (write the group with this "
            "version of rayrec: `rayrec pipeline` or `rayrec features build`)"
        )
    group = FeatureGroup.from_dict(row["definition"])
    version = int(row["version"])
    table = OnlineTable(group, version, group.table_spec(version), group.codec(store_dictionary(store)))
    _TABLES.setdefault(store, {})[table_name] = table
    return table


def read_online(store: OnlineStore, ref: FeatureGroupRef, name: str, keys: Sequence[Any],
                columns: Sequence[str] | None = None) -> dict[Any, dict[str, Any]]:
    """One batched read of a group for many keys, by manifest reference.

    Returns:
        key -> {column: value} (frame spelling; all columns, the key included, when `columns`
        is None); keys that are not stored are absent.
    """
    return read_online_many(store, [(ref, name, keys)], columns)[0]


def read_online_many(store: OnlineStore, reads: Sequence[tuple[FeatureGroupRef, str, Sequence[Any]]],
                     columns: Sequence[str] | None = None) -> list[dict[Any, dict[str, Any]]]:
    """`read_online` of several (ref, name, keys) in ONE statement (one round trip)."""
    tables = []
    for ref, name, _ in reads:
        if ref.online_table is None:
            raise ValueError(f"feature group {name!r} v{ref.version} has no online table")
        tables.append(online_table(store, ref.online_table))
    return _read_dicts(store, [(t, keys) for t, (_, _, keys) in zip(tables, reads, strict=True)], columns)


def _read_dicts(store: OnlineStore, reads: Sequence[tuple[OnlineTable, Sequence[Any]]],
                columns: Sequence[str] | None) -> list[dict[Any, dict[str, Any]]]:
    """ONE statement for every (table, keys): key -> {column: value} per table, keys not stored absent."""
    bufs = store.read_concat_many([(t.spec, keys, ONLINE_ROW_COLUMN) for t, keys in reads])
    out = []
    for (t, keys), buf in zip(reads, bufs, strict=True):
        names, indexes = _column_plan(t, columns)
        rows = _rows_to_dicts(t, *t.codec.decode_columns(buf, indexes), names)
        if not rows.keys() <= (asked := set(keys)):  # 'a ' finds a's row (PAD SPACE): not what was asked
            rows = {k: v for k, v in rows.items() if k in asked}
        out.append(rows)
    return out


# (id of the table, columns) -> (the table itself, so that its id stays taken; the plan)
_PLANS: dict[tuple[int, tuple[str, ...] | None], tuple[OnlineTable, tuple[list[str], set[int] | None]]] = {}


def _column_plan(table: OnlineTable, columns: Sequence[str] | None) -> tuple[list[str], set[int] | None]:
    """The output columns (frame spelling; all with the key when `columns` is None) and the codec
    indexes to decode (None: all), worked out once per table and column list, not per read."""
    key = (id(table), None if columns is None else tuple(columns))
    cached = _PLANS.get(key)
    plan = cached[1] if cached is not None and cached[0] is table else None
    if plan is None:
        if columns is None:
            plan = ([table.group.key, *table.codec.names], None)
        else:
            names = [table.group.feature(c).column for c in columns]
            index = {n: i for i, n in enumerate(table.codec.names)}
            plan = (names, {index[c] for c in names if c in index})
        _PLANS[key] = (table, plan)
    return plan


def _rows_to_dicts(table: OnlineTable, keys: list[Any], cols: list[tuple], wanted: list[str]):
    """key -> {column: value} for the `wanted` columns of decoded rows."""
    by_name = dict(zip(table.codec.names, cols, strict=True))
    by_name[table.group.key] = keys
    picked = [by_name[c] for c in wanted]
    return {k: dict(zip(wanted, vals, strict=True)) for k, vals in zip(keys, zip(*picked, strict=True), strict=True)}


# ---------------------------------------------------------------------------------------------
# Offline -> online row conversion


def to_online_rows(group: FeatureGroup, frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows of a frame as an online read returns them: plain Python values by feature type
    (NaN -> None, numpy -> int/float/list), frame spelling, the key included."""
    cols = list(group.columns)
    converted = [_column_values(group.feature(c).dtype, frame[c]) for c in cols]
    return [dict(zip(cols, vals, strict=True)) for vals in zip(*converted, strict=True)]


def _column_values(dtype: str, s: pd.Series) -> list[Any]:
    """One column as plain Python values of its feature type (None for nulls)."""
    if dtype in ("int64", "float64") and s.dtype != object:
        v = s.to_numpy(dtype=np.float64, na_value=np.nan) if dtype == "float64" else None
        if dtype == "float64":
            return [None if x != x else x for x in v.tolist()]
        if pd.api.types.is_integer_dtype(s.dtype) and not s.hasnans:
            return s.astype("int64").tolist()
    return [_plain(dtype, v) for v in s.tolist()]


def _plain(dtype: str, v: Any) -> Any:
    if v is None or v is pd.NA or v is pd.NaT or (isinstance(v, float) and math.isnan(v)):
        return None
    if dtype == "int64":
        return int(v)
    if dtype == "float64":
        return float(v)
    if dtype == "bool":
        return bool(v)
    if dtype.startswith("list_"):
        items = v.tolist() if hasattr(v, "tolist") else list(v)
        return [int(x) for x in items] if dtype == "list_int64" else (
            [float(x) for x in items] if dtype == "list_float64" else items)
    if dtype == "json":
        return json.loads(json.dumps(v, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    return v


# ---------------------------------------------------------------------------------------------


@dataclass
class InsertResult:
    group: str
    version: int
    commit: int
    rows: int  # rows written offline
    online_rows: int  # rows sent online (the latest of each key in the batch)
    report: ValidationReport


def prepare_frame(g: FeatureGroup, frame: pd.DataFrame, event_time: Any) -> pd.DataFrame:
    """`frame` as `insert` checks and writes it: the group's columns (optional ones None when
    absent) and the event time (`event_time` for every row when the frame has none)."""
    out = frame.copy()
    if g.event_time not in out.columns:
        if event_time is None:
            raise ValueError(
                f"feature group {g.name!r}: frame lacks the event-time column {g.event_time!r} "
                "(or pass event_time=...)"
            )
        out[g.event_time] = pd.Timestamp(event_time)
    for f in g.features:
        if f.optional and f.column not in out.columns:
            out[f.column] = None
    missing = [c for c in g.columns if c not in out.columns]
    if missing:
        raise ValueError(f"feature group {g.name!r}: frame lacks columns {missing}")
    return out[[*g.columns, g.event_time]]


class FeatureGroupVersion:
    """One version of a feature group: its offline Parquet files and its online table."""

    def __init__(self, fs: FeatureStore, group: FeatureGroup, version: int, retired_at: str | None = None):
        """`retired_at`: when `retire_online` dropped the version's online table (its definition
        file says so; None while it is online)."""
        self.fs = fs
        self.group = group
        self.version = int(version)
        self.root = fs.group_dir(group.name, version)
        self.offline = OfflineTable(self.root, group)
        self.spec = group.table_spec(version)
        self.retired_at = retired_at

    def __repr__(self) -> str:
        return f"FeatureGroupVersion({self.group.name!r}, v{self.version})"

    @property
    def name(self) -> str:
        return self.group.name

    @property
    def online_enabled(self) -> bool:
        return self.group.online and self.fs.online is not None and self.retired_at is None

    @property
    def ref(self) -> FeatureGroupRef:
        """The manifest reference of this version."""
        return FeatureGroupRef(
            version=self.version,
            offline_path=self.fs.wd.relative(self.root),
            online_table=self.spec.name if self.online_enabled else None,
            primary_key=[self.group.key],
        )

    # writing --------------------------------------------------------------------------------
    def validate(self, frame: pd.DataFrame, event_time: Any = None) -> ValidationReport:
        """Check a frame as `insert` would, writing nothing."""
        return validate(self.group, prepare_frame(self.group, frame, event_time), "always")[0]

    def insert(self, frame: pd.DataFrame, validation: str = "strict", event_time: Any = None) -> InsertResult:
        """Append `frame` offline (one commit) and upsert the latest row of each key online.

        Args:
            frame: one row per event, columns in frame spelling (extra columns are ignored;
                optional features may be missing).
            validation: "strict" (any failed rule: nothing written, ValidationFailed) or
                "always" (write and report; see feature_store.validation).
            event_time: the event time of every row when the frame has no event-time column.
        Raises:
            ValidationFailed: policy "strict" and a rule failed (nothing was written).
            ValueError: a required column is missing, or the version was retired from the online
                store (`retire_online`: it takes no more rows; write a new version).
            ConnectionError: the online write failed (nothing was written; where the store could
                not say whether it committed, the next insert or open settles it). An insert
                written in several transactions (more keys than the store's `max_txn_rows`) is
                then finished by the next insert, open or `recover()` instead.
        """
        check_policy(validation)
        report, frame = validate(self.group, prepare_frame(self.group, frame, event_time), validation)
        if validation == "strict" and not report.ok:
            raise ValidationFailed(report)
        self._check_not_retired()
        times = to_event_times(frame[self.group.event_time]) if len(frame) else pd.Series([], dtype="datetime64[us]")
        rows = self._online_rows(frame, times) if self.online_enabled else []  # packs (and checks) all first
        with self.offline.locked():
            self._check_not_retired(reread=True)  # another process may have retired it meanwhile
            if self.online_enabled and self.spec.name not in _TABLES.get(self.fs.online, {}):
                register_online_table(self.fs.online, self.group, self.version)  # e.g. a new online database
            self._settle_pending()
            self.offline.vacuum()
            commit = self.offline.next_commit()
            staged = self.offline.stage(frame, times, commit)
            marker = commit_marker(self.fs.online, self.spec.name, commit) if rows else None
            parts = self._transactions(rows)
            self.offline.prepare(staged, {"validation": report.to_dict(),
                                          "online_marker": marker["commit_id"] if marker else None,
                                          "online_transactions": len(parts)})
            sent = self._write_or_settle(staged, parts, marker) if marker else 0
            self.offline.publish(staged, {"online_rows": sent})
        return InsertResult(self.name, self.version, commit, len(frame), sent, report)

    def _transactions(self, rows: list[OnlineRow]) -> list[list[OnlineRow]]:
        """The online rows of one insert split into transactions of at most `max_txn_rows` keys
        (the latest row of each key, as the store would keep); one transaction when they fit."""
        step = self.fs.max_txn_rows
        if len(rows) <= step:
            return [rows]
        rows = keep_latest(rows, 0, 1)  # (key, event time, packed): as the store would keep them
        return [rows[i : i + step] for i in range(0, len(rows), step)]

    def _write_online(self, parts: list[list[OnlineRow]], marker: dict[str, Any], done: list[int]) -> int:
        """Upsert each part in its own transaction, the marker with the last one; `done[0]`
        counts the transactions committed. Returns the rows written. A write of several parts
        prints a progress line every `PROGRESS_EVERY_S`. Rows become the store's dicts one part
        at a time (`OnlineRow`)."""
        sent, total, shown = 0, sum(len(p) for p in parts), time.monotonic()
        key = self.group.primary_key
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            rows = [{key: k, ONLINE_TIME_COLUMN: t, ONLINE_ROW_COLUMN: b} for k, t, b in part]
            sent += self.fs.online.write_batch(self.spec, rows, newer_column=ONLINE_TIME_COLUMN,
                                               marker=(COMMITS, marker) if last else None)
            done[0] += 1
            if not last and time.monotonic() - shown >= PROGRESS_EVERY_S:
                shown = time.monotonic()
                print(f"[feature store] {self.spec.name}: {sent:,} of {total:,} rows online "
                      f"({done[0]} of {len(parts)} transactions)", flush=True)
        return sent

    def _write_or_settle(self, staged: StagedCommit, parts: list[list[OnlineRow]], marker: dict[str, Any]) -> int:
        """The online write of a prepared commit; on failure, settle the commit as its marker says
        (`_failed_write_outcome`) and raise. Returns the rows written."""
        done = [0]
        try:
            return self._write_online(parts, marker, done)
        except BaseException as error:
            outcome = self._failed_write_outcome(marker, error, len(parts), done[0])
            if outcome == "absent":
                self.offline.abort(staged)
                raise
            if outcome == "forward":
                error.add_note(f"{self!r}: commit {staged.commit} was being written online in {len(parts)} "
                               f"transactions of up to {self.fs.max_txn_rows} rows; {done[0]} committed. It stays "
                               "staged: the next insert into this version, or opening it, writes it again and "
                               "publishes it (FeatureGroupVersion.recover)")
            if outcome != "committed":
                raise  # the commit stays pending: the next insert or open settles it
        return sum(len(p) for p in parts)  # it committed; only the answer was lost (rows before the dedup)

    def _failed_write_outcome(self, marker: dict[str, Any], error: BaseException, parts: int, done: int) -> str:
        """What a failed online write did: "absent" (nothing committed), "committed" (the last
        transaction went through and the connection lost its answer: the marker is there),
        "unknown" (the store cannot be asked now) or "forward" (an insert in several
        transactions stopped before its last: rows of it may be online, so it is finished, not
        undone)."""
        if isinstance(error, ValueError) and done == 0:  # refused before any SQL was sent
            return "absent"
        try:
            if marker_stored(self.fs.online, marker["commit_id"]):
                return "committed"
        except Exception:  # noqa: BLE001 - the store is down: recovery asks again later
            return "unknown"
        return "forward" if parts > 1 else "absent"

    def recover(self) -> list[int]:
        """Settle the commits an insert left staged when its process died (`OfflineTable.pending`):
        publish those whose online transaction committed; finish those written in several
        transactions (write their rows online again, then publish); remove the others. Returns
        the numbers of the commits published. Inserts do this first; `get_feature_group` too."""
        with self.offline.locked():
            return self._settle_pending()

    def _settle_pending(self) -> list[int]:
        published = []
        for staged in self.offline.pending():
            marker = staged.meta.get("online_marker")
            if marker is not None and self.fs.online is None:
                raise RuntimeError(f"{self!r} has commit {staged.commit}, left by an insert that did not finish, "
                                   "whose online write only its online store can confirm: open the feature store "
                                   "with that store")
            recovered = {"recovered_at": datetime.now(UTC).isoformat(timespec="seconds")}
            if marker is not None and marker_stored(self.fs.online, marker):
                self.offline.publish(staged, recovered)
            elif marker is not None and staged.meta.get("online_transactions", 1) > 1:
                self.offline.publish(staged, {**recovered, "online_rows": self._write_again(staged, marker)})
            else:
                self.offline.abort(staged)
                continue
            published.append(staged.commit)
        return published

    def _write_again(self, staged: StagedCommit, commit_id: str) -> int:
        """Write the online rows of a staged commit again, from its files, with its marker."""
        frame = self.offline.read_staged(staged)
        rows = self._online_rows(frame, to_event_times(frame[self.group.event_time]))
        if self.spec.name not in _TABLES.get(self.fs.online, {}):
            register_online_table(self.fs.online, self.group, self.version)  # as insert does
        commit_marker(self.fs.online, self.spec.name, staged.commit)  # its table, once per store
        return self._write_online(self._transactions(rows), marker_row(self.spec.name, staged.commit, commit_id), [0])

    # retiring -------------------------------------------------------------------------------
    def retire_online(self) -> bool:
        """Make this version offline only: drop its online table and record when in its
        definition file. RonDB keeps every table in its data nodes' memory, and each pipeline
        run writes new versions, so the old ones' tables would pile up; their Parquet files,
        commits and training data stay readable (`read`, feature views' `training_data`).

        A staged insert is settled first (`recover`). The definition file is written before
        the table is dropped, so a process that dies in between leaves a retired version whose
        table the next call drops. Returns True when this call retired it, False when it
        already was (the table is dropped again if it is still there).

        Raises:
            ValueError: the group has no online table, or the feature store no online store.
        """
        if not self.group.online:
            raise ValueError(f"{self!r} is offline only: it has no online table to retire")
        if self.fs.online is None:
            raise ValueError(f"{self!r}: retiring drops its online table; open the feature store with its online store")
        with self.offline.locked():
            meta = self._meta()
            newly = meta.get("online_retired_at") is None
            if newly:
                self._settle_pending()  # a staged insert is published or removed while the table is there
                meta["online_retired_at"] = datetime.now(UTC).isoformat(timespec="seconds")
                atomic_write_text(self.root / META_FILE, json.dumps(meta, indent=1))
            self.retired_at = meta["online_retired_at"]
            _TABLES.get(self.fs.online, {}).pop(self.spec.name, None)
            self.fs.online.drop_table(self.spec)
        return newly

    def _meta(self) -> dict[str, Any]:
        return json.loads((self.root / META_FILE).read_text())

    def _check_not_retired(self, reread: bool = False) -> None:
        if reread and self.group.online:
            self.retired_at = self._meta().get("online_retired_at")
        if self.retired_at is not None and self.group.online:
            raise ValueError(f"feature group {self.name!r} v{self.version} was retired from the online store at "
                             f"{self.retired_at} and takes no more rows: write a new version "
                             "(FeatureStore.create_feature_group, `rayrec features build`)")

    def _online_rows(self, frame: pd.DataFrame, times: pd.Series) -> list[OnlineRow]:
        """Every row packed for the online table, in frame order (a row that cannot be packed
        raises, naming it). The columns become Python values `PACK_CHUNK_ROWS` rows at a time:
        all at once they were the insert's peak memory (100,000 article rows: RSS grew 290 MB
        against 209 MB; benchmarks/feature_insert.py, `peak_rss_growth_mb`, docs/scaling.md F50).
        Each row is a tuple, not a dict, since all of them are held until the write (1.37M
        customers in 20,000-row transactions: RSS grew 900 MB against 736 MB, F51)."""
        g = self.group
        dictionary = store_dictionary(self.fs.online) if g.dictionary_features else None
        codec = g.codec(dictionary)
        if dictionary is not None:  # codes for the values first: one read and one write at most
            dictionary.ensure(_codable_values(g, [_column_values(f.dtype, frame[f.column]) if f.dictionary else []
                                                  for f in g.value_features]))
        micros = to_micros(times).tolist()
        encode = codec.encode_values
        rows: list[OnlineRow] = []
        for start in range(0, len(frame), PACK_CHUNK_ROWS):
            part = frame.iloc[start : start + PACK_CHUNK_ROWS]
            keys = _column_values(g.key_feature.dtype, part[g.key])
            columns = [_column_values(f.dtype, part[f.column]) for f in g.value_features]
            for i, values in enumerate(zip(*columns, strict=True), start):
                try:
                    packed = encode(keys[i - start], values)
                except ValueError as e:
                    raise ValueError(f"feature group {g.name!r}: row {i}: {e}") from None
                rows.append((keys[i - start], micros[i], packed))
        return rows

    # reading --------------------------------------------------------------------------------
    def read(self, start: Any = None, end: Any = None, *, latest: bool = False, as_of: Any = None,
             max_commit: int | None = None, internal: bool = False) -> pd.DataFrame:
        """Offline rows with start <= event time < end (frame spelling, with the event time).

        Args:
            latest: only the latest row of each key (the online row); with `as_of`, the latest
                with event time <= as_of.
            max_commit: ignore inserts after this commit (reproducible reads).
            internal: keep the `_commit` and `_row` columns.
        """
        end_excl = end
        if as_of is not None:
            limit = to_event_times([as_of]).iloc[0] + pd.Timedelta(microseconds=1)
            end_excl = limit if end is None else min(limit, to_event_times([end]).iloc[0])
        frame = self.offline.read(start, end_excl, max_commit, internal=True)
        if latest:
            frame = latest_per_key(frame, self.group.key, self.group.event_time).reset_index(drop=True)
        if not internal:
            frame = frame.drop(columns=["_commit", "_row"])
        return frame

    def read_online(self, keys: Sequence[Any], columns: Sequence[str] | None = None) -> dict[Any, dict[str, Any]]:
        """key -> row (frame spelling) for the stored keys, with ONE query."""
        return _read_dicts(self.fs.online, [(self.online_table(), keys)], columns)[0]

    def online_table(self) -> OnlineTable:
        if self.retired_at is not None and self.group.online:
            raise ValueError(f"feature group {self.name!r} v{self.version} was retired from the online store at "
                             f"{self.retired_at}: its rows are offline only (read it with `read`, or serve a "
                             "newer version)")
        if not self.online_enabled:
            raise ValueError(f"feature group {self.name!r} v{self.version} has no online table")
        return online_table(self.fs.online, self.spec.name)

    def stats(self) -> dict[str, Any]:
        """Row counts and freshness, offline and online."""
        commits = self.offline.commits()
        max_event = max((c["max_event_time"] for c in commits if c.get("max_event_time")), default=None)
        out: dict[str, Any] = {
            "group": self.name,
            "version": self.version,
            "online": self.group.online and self.retired_at is None,
            "online_table": self.spec.name if self.group.online and self.retired_at is None else None,
            "online_retired_at": self.retired_at,
            "features": len(self.group.features),
            "commits": len(commits),
            "offline_rows": sum(c["rows"] for c in commits),
            "last_insert_at": commits[-1]["created_at"] if commits else None,
            "max_event_time": max_event,
            # inserts that did not finish: settled when the version is opened with its online store
            "pending_commits": len(self.offline.pending()),
        }
        if self.online_enabled:
            try:
                s = self.fs.online.table_stats(self.spec, ONLINE_TIME_COLUMN)
                out["online_rows"] = s["rows"]
                out["online_max_event_time"] = (
                    str(pd.Timestamp(s["max"], unit="us")) if s["max"] is not None else None
                )
            except TableNotFound:
                out["online_rows"] = None
        newest = out.get("online_max_event_time") or max_event
        if newest is not None:
            age = pd.Timestamp.now(tz="UTC").tz_localize(None) - pd.Timestamp(newest)
            out["freshness_s"] = round(age.total_seconds(), 1)
        return out


class FeatureStore:
    """Feature groups (offline Parquet + online tables) of one workdir, plus feature views."""

    def __init__(self, workdir: Workdir, online: OnlineStore | None = None, max_txn_rows: int | None = None):
        """`max_txn_rows`: the most rows one online transaction writes (`DatabaseConfig.max_txn_rows`)."""
        self.wd = workdir
        self.online = online
        self.max_txn_rows = int(DatabaseConfig.model_fields["max_txn_rows"].default if max_txn_rows is None
                                else max_txn_rows)
        if self.max_txn_rows < 1:
            raise ValueError(f"max_txn_rows must be >= 1, got {max_txn_rows!r}")

    # versions -------------------------------------------------------------------------------
    def group_dir(self, name: str, version: int) -> Path:
        return self.wd.offline_dir / check_name(name, "feature group name") / f"v{int(version)}"

    def versions(self, name: str) -> list[int]:
        """Versions of a group that have a definition (written by this feature store)."""
        base = self.wd.offline_dir / check_name(name, "feature group name")
        if not base.is_dir():
            return []
        return sorted(int(p.name[1:]) for p in base.glob("v*") if p.name[1:].isdigit() and (p / META_FILE).is_file())

    def next_version(self, name: str) -> int:
        base = self.wd.offline_dir / check_name(name, "feature group name")
        taken = [int(p.name[1:]) for p in base.glob("v*") if p.name[1:].isdigit()] if base.exists() else []
        return max(taken, default=0) + 1

    def list_feature_groups(self) -> dict[str, list[int]]:
        if not self.wd.offline_dir.is_dir():
            return {}
        out = {}
        for p in sorted(self.wd.offline_dir.iterdir()):
            if p.is_dir() and not p.name.startswith("_"):
                versions = self.versions(p.name)
                if versions:
                    out[p.name] = versions
        return out

    def create_feature_group(self, group: FeatureGroup, version: int | None = None) -> FeatureGroupVersion:
        """A new version of `group` (the next free number unless given); older versions stay.

        Raises:
            ValueError: `version` already exists.
        """
        if version is None:
            version = self.next_version(group.name)
            while self._registered_online(group, version):  # a table another workdir left in this database
                version += 1
        version = int(version)
        root = self.group_dir(group.name, version)
        if (root / META_FILE).exists():
            raise ValueError(f"feature group {group.name!r} v{version} already exists")
        root.mkdir(parents=True, exist_ok=True)
        fgv = FeatureGroupVersion(self, group, version)
        if fgv.online_enabled:
            register_online_table(self.online, group, version)
        atomic_write_text(root / META_FILE, json.dumps({
            "group": group.to_dict(),
            "version": version,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "online_table": fgv.spec.name if group.online else None,
        }, indent=1))
        return fgv

    def _discard(self, fgv: FeatureGroupVersion) -> None:
        """Remove a version `write` created and could not fill: its definition first (so that it
        is no version at once), then its folder and online table. The registry keeps its row, so
        the number is not given out again."""
        import shutil

        (fgv.root / META_FILE).unlink(missing_ok=True)
        shutil.rmtree(fgv.root, ignore_errors=True)
        if fgv.online_enabled:
            _TABLES.get(self.online, {}).pop(fgv.spec.name, None)
            try:
                self.online.drop_table(fgv.spec)
            except Exception:  # noqa: BLE001 - the store may be what failed; an empty table is harmless
                pass

    def _registered_online(self, group: FeatureGroup, version: int) -> bool:
        if not group.online or self.online is None:
            return False
        table = group.table_name(version)
        try:
            return bool(self.online.read_batch(REGISTRY, [table], ["table_name"]))
        except TableNotFound:
            return False

    def get_feature_group(self, name: str, version: int | None = None) -> FeatureGroupVersion:
        """A version of a group (the latest when None), with the definition it was created with.

        Raises:
            LookupError: no such group or version.
        """
        versions = self.versions(name)
        if not versions:
            raise LookupError(f"no feature group {name!r} in {self.wd.offline_dir}")
        version = versions[-1] if version is None else int(version)
        meta = self.group_dir(name, version) / META_FILE
        if not meta.is_file():
            raise LookupError(f"feature group {name!r} has no version {version} (versions: {versions})")
        definition = json.loads(meta.read_text())
        fgv = FeatureGroupVersion(self, FeatureGroup.from_dict(definition["group"]), version,
                                  retired_at=definition.get("online_retired_at"))
        if self.online is not None and fgv.offline.pending():  # an insert died: readers see its outcome
            fgv.recover()
        return fgv

    def get_or_create_feature_group(self, group: FeatureGroup, version: int) -> FeatureGroupVersion:
        try:
            fgv = self.get_feature_group(group.name, version)
        except LookupError:
            return self.create_feature_group(group, version)
        if fgv.group != group:
            raise SchemaMismatch(f"feature group {group.name!r} v{version} exists with another definition")
        return fgv

    # the pipeline's entry point ---------------------------------------------------------------
    def write(self, name: str, frame: pd.DataFrame, progress: bool = True, event_time: Any = None,
              validation: str = "always", groups: Mapping[str, FeatureGroup] | None = None) -> FeatureGroupRef:
        """Write `frame` as a new version of group `name` of `groups` (default: the H&M groups)
        (offline and, for online groups, online) and return its manifest reference.

        Frames without an event-time column get `event_time` (default: now, the time the
        features were computed). Validation "always" writes and prints failed rules.
        """
        groups = GROUPS if groups is None else groups
        if name not in groups:
            raise ValueError(f"unknown feature group {name!r}; one of {sorted(groups)}")
        group = groups[name]
        if group.event_time not in frame.columns and event_time is None:
            event_time = pd.Timestamp.now(tz="UTC")
        fgv = self.create_feature_group(group)
        try:
            result = fgv.insert(frame, validation=validation, event_time=event_time)
        except BaseException:
            self._discard(fgv)  # an empty new version would become the group's latest
            raise
        if progress:
            where = f", {result.online_rows} online in {fgv.spec.name}" if fgv.online_enabled else ""
            print(f"[feature store] {name} v{fgv.version}: {result.rows} rows offline{where}", flush=True)
            if not result.report.ok:
                for line in result.report.summary_lines():
                    print(f"[feature store] {line}", flush=True)
        return fgv.ref

    def retire_online(self, keep: int, protect: Collection[tuple[str, int]] = (), groups: Sequence[str] | None = None,
                      dry_run: bool = False) -> list[dict[str, Any]]:
        """Retire the online tables of all but the `keep` newest versions of each online group
        (`FeatureGroupVersion.retire_online`; the Parquet files stay), never a version in
        `protect` ((group, version) pairs: what a manifest serves). A version retired by a
        process that died before dropping its table has the table dropped now.

        Args:
            keep: newest versions per group left online (>= 1).
            groups: only these groups (default: all).
            dry_run: change nothing; return what would be retired.
        Returns:
            One dict per version retired (or that would be): group, version, online_table,
            online_rows (counted before the drop).
        """
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an integer >= 1 (the newest versions left online), got {keep!r}")
        if self.online is None:
            raise ValueError("retiring drops online tables: open the feature store with its online store")
        known = self.list_feature_groups()
        for name in groups or ():
            if name not in known:
                raise ValueError(f"no feature group {name!r} in {self.wd.offline_dir} (groups: {sorted(known)})")
        tables = set(self.online.list_tables())
        out = []
        for name, versions in known.items():
            if groups and name not in groups:
                continue
            for v in sorted(versions, reverse=True)[keep:]:
                fgv = self.get_feature_group(name, v)
                if not fgv.group.online or (name, v) in protect:
                    continue
                if fgv.retired_at is not None and fgv.spec.name not in tables:
                    continue
                out.append(self._retire(fgv, dry_run))
        return out

    def retire_version(self, name: str, version: int, protect: Collection[tuple[str, int]] = (),
                       dry_run: bool = False) -> dict[str, Any]:
        """Retire one version's online table (see `retire_online`).

        Raises:
            ValueError: the version is in `protect` (a manifest serves it) or has no online table.
            LookupError: no such group or version.
        """
        fgv = self.get_feature_group(name, version)
        if (name, fgv.version) in protect:
            raise ValueError(f"feature group {name!r} v{fgv.version} is what the manifest serves: it stays online "
                             "(write and serve a newer version first)")
        if not fgv.group.online:
            raise ValueError(f"feature group {name!r} is offline only: it has no online table to retire")
        if self.online is None:
            raise ValueError("retiring drops online tables: open the feature store with its online store")
        return self._retire(fgv, dry_run)

    def _retire(self, fgv: FeatureGroupVersion, dry_run: bool) -> dict[str, Any]:
        try:
            rows = self.online.table_stats(fgv.spec)["rows"]
        except TableNotFound:
            rows = 0
        if not dry_run:
            fgv.retire_online()
        return {"group": fgv.name, "version": fgv.version, "online_table": fgv.spec.name, "online_rows": rows}

    def read_offline(self, name: str, ref: FeatureGroupRef) -> pd.DataFrame:
        """All offline rows of the version a manifest reference names."""
        return self.get_feature_group(name, ref.version).read()

    def describe(self) -> list[dict[str, Any]]:
        """Every group version: row counts offline and online, freshness."""
        return [self.get_feature_group(name, v).stats()
                for name, versions in self.list_feature_groups().items() for v in versions]

    # feature views ----------------------------------------------------------------------------
    def create_feature_view(self, view):  # -> FeatureViewHandle (see feature_store.feature_view)
        from feature_store.feature_view import create_feature_view

        return create_feature_view(self, view)

    def get_feature_view(self, name: str, version: int | None = None):
        from feature_store.feature_view import get_feature_view

        return get_feature_view(self, name, version)


def normalised_keys(table: OnlineTable, keys: Sequence[Any]) -> list[Any]:
    return [normalise_key(table.spec, k) for k in keys]
