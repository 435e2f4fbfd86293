"""The offline store of one feature-group version: Parquet files partitioned by event date.

    <offline_dir>/<group>/v<N>/
        _meta.json                              the group definition of this version
        _commits/000001.json                    one marker per insert: its files, rows, time range
        event_date=2020-09-01/part-c000001.parquet
        _staging/c000002/...                    an insert in progress (invisible)
        _staging/c000002/pending.json           ... complete, its online write under way

An insert is one commit: its rows are written to `_staging/` and recorded there as complete
(`prepare`), then (after the online write succeeded) moved into the date partitions, and the
commit marker is written last with an atomic rename. Readers here read only files named by a
marker, so a failed or interrupted insert is never seen. A process that dies after `prepare`
leaves a `pending` commit, which the feature store publishes or removes depending on whether its
online write committed (feature_store.store); files of a commit without a marker are removed by
the next insert (`vacuum`). The
folder stays a plain hive-partitioned Parquet dataset for pandas, pyarrow and Ray Data (which
skip `_`-prefixed paths and non-.parquet files).

Each row carries `_commit` (the insert's number) and `_row` (its position in the insert): among
rows of one key with the same event time, the later insert wins, and within one insert the later
row (the tie rule shared with the online upsert and the point-in-time join).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from common.artifacts import atomic_write_text
from feature_store.schema import FeatureGroup

COMMIT_COLUMN = "_commit"
ROW_COLUMN = "_row"
_ARROW_TYPES = {
    "int64": pa.int64(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "string": pa.string(),
    "list_string": pa.list_(pa.string()),
    "list_int64": pa.list_(pa.int64()),
    "list_float64": pa.list_(pa.float64()),
    "json": pa.string(),  # JSON text
}
TIME_UNIT = "datetime64[us]"


def parse_times(values: Any, errors: str = "raise") -> pd.Series:
    """Timestamps as UTC (naive input counts as UTC); strings of several formats are accepted."""
    values = pd.Series(values)
    try:
        return pd.to_datetime(values, utc=True, errors="raise")
    except (ValueError, TypeError):  # several formats ("2020-01-01", "2020-01-01 12:00") or bad values
        return pd.to_datetime(values, utc=True, errors=errors, format="mixed")


def to_event_times(values: Any) -> pd.Series:
    """Event times as naive UTC datetime64[us] (tz-aware values are converted to UTC)."""
    return parse_times(values).dt.tz_localize(None).astype(TIME_UNIT)


def to_event_time(value: Any) -> pd.Timestamp:
    """One event time, as `to_event_times` gives it. A datetime or an ISO 8601 string (what the
    API and the event logs carry) is converted without a pandas Series, which took 1.04 ms of CPU
    for one ISO string against 2 us this way (`python -m timeit`; docs/scaling.md F34): a serving
    replica parsed each purchase event's time five times, in a worker thread holding the GIL that
    its request loop needs. Other values take the Series path."""
    t = value if isinstance(value, datetime) else None
    if isinstance(value, str):
        try:
            t = datetime.fromisoformat(value)
        except ValueError:
            t = None
    if t is not None:
        if t.tzinfo is not None:
            t = t.astimezone(UTC).replace(tzinfo=None)
        return pd.Timestamp(t).as_unit("us")
    return to_event_times([value]).iloc[0]


def to_micros(times: pd.Series) -> np.ndarray:
    return times.astype(TIME_UNIT).to_numpy().astype("int64")


PENDING_FILE = "pending.json"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class StagedCommit:
    commit: int
    files: list[tuple[Path, Path]]  # (staged, final)
    meta: dict[str, Any]


class OfflineTable:
    """Parquet files of one feature-group version (see the module doc)."""

    def __init__(self, root: Path, group: FeatureGroup):
        self.root = Path(root)
        self.group = group
        self.schema = pa.schema(
            [pa.field(f.name, _ARROW_TYPES[f.dtype]) for f in group.features]
            + [pa.field(group.event_time, pa.timestamp("us")), pa.field(COMMIT_COLUMN, pa.int64()),
               pa.field(ROW_COLUMN, pa.int64())]
        )

    # layout --------------------------------------------------------------------------------
    @property
    def commits_dir(self) -> Path:
        return self.root / "_commits"

    @property
    def staging_dir(self) -> Path:
        return self.root / "_staging"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise inserts into this version (across processes)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "_lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def commits(self) -> list[dict[str, Any]]:
        if not self.commits_dir.is_dir():
            return []
        out = []
        for p in sorted(self.commits_dir.glob("*.json")):
            out.append(json.loads(p.read_text()))
        return sorted(out, key=lambda c: c["commit"])

    def next_commit(self) -> int:
        return max((c["commit"] for c in self.commits()), default=0) + 1

    # writing ---------------------------------------------------------------------------------
    def to_arrow(self, frame: pd.DataFrame, times: pd.Series, commit: int) -> pa.Table:
        """Rows of a validated frame (frame spelling) as a table of this version's schema."""
        cols: dict[str, Any] = {}
        for f in self.group.features:
            s = frame[f.column]
            if f.dtype == "json":
                cols[f.name] = [None if _null(v) else json.dumps(_plain(v), ensure_ascii=False) for v in s]
            elif f.dtype.startswith("list_"):
                cols[f.name] = [None if _null(v) else list(v.tolist() if hasattr(v, "tolist") else v) for v in s]
            else:
                cols[f.name] = s  # from_pandas: None, NaN and NaT become nulls
        table = pa.table({name: pa.array(values, type=self.schema.field(name).type, from_pandas=True)
                          for name, values in cols.items()})
        n = len(frame)
        table = table.append_column(self.schema.field(self.group.event_time),
                                    pa.array(times.to_numpy(), type=pa.timestamp("us")))
        table = table.append_column(self.schema.field(COMMIT_COLUMN), pa.array(np.full(n, commit, np.int64)))
        return table.append_column(self.schema.field(ROW_COLUMN), pa.array(np.arange(n, dtype=np.int64)))

    def stage(self, frame: pd.DataFrame, times: pd.Series, commit: int) -> StagedCommit:
        """Write the commit's files under `_staging/` (invisible to every reader)."""
        table = self.to_arrow(frame, times, commit)
        stage = self._stage_dir(commit)
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        # one file per event date: each day's rows in frame order, taken one day at a time (a
        # slice, no copy, when the frame is already in day order) rather than reordering the
        # whole table, whose copy would double the insert's peak memory
        day_numbers = times.to_numpy().astype("datetime64[D]").astype(np.int64)
        in_order = bool(np.all(day_numbers[1:] >= day_numbers[:-1]))
        order = np.arange(len(day_numbers)) if in_order else np.argsort(day_numbers, kind="stable")
        sorted_days = day_numbers[order]
        bounds = np.flatnonzero(np.r_[True, sorted_days[1:] != sorted_days[:-1], True]) if len(order) else []
        files: list[tuple[Path, Path]] = []
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            part = table.slice(int(lo), int(hi - lo)) if in_order else table.take(pa.array(order[lo:hi]))
            day = str(np.datetime64(int(sorted_days[lo]), "D"))
            rel = Path(f"event_date={day}") / f"part-c{commit:06d}.parquet"
            staged = stage / rel.parent.name / rel.name
            staged.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(part, staged)
            files.append((staged, self.root / rel))
        meta = {
            "commit": commit,
            "rows": len(frame),
            "files": [str(final.relative_to(self.root)) for _, final in files],
            "min_event_time": str(times.min()) if len(times) else None,
            "max_event_time": str(times.max()) if len(times) else None,
            "created_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
        return StagedCommit(commit, files, meta)

    def prepare(self, staged: StagedCommit, extra: dict[str, Any] | None = None) -> None:
        """Record a staged commit as complete (its files, its marker's content plus `extra`) before
        the online write, so that recovery can still publish it if this process dies after that
        write committed (`pending`)."""
        staged.meta.update(extra or {})
        for src, _ in staged.files:  # on disk before the record that lets recovery publish them
            _fsync(src)
        for folder in {src.parent for src, _ in staged.files}:
            _fsync(folder)
        moves = [[str(src.relative_to(self.root)), str(dst.relative_to(self.root))] for src, dst in staged.files]
        atomic_write_text(self._stage_dir(staged.commit) / PENDING_FILE,
                          json.dumps({**staged.meta, "moves": moves}, indent=1))

    def pending(self) -> list[StagedCommit]:
        """The commits `prepare` recorded that were neither published nor aborted: left by a
        process that died during an insert."""
        out = []
        for path in sorted(self.staging_dir.glob(f"c*/{PENDING_FILE}")) if self.staging_dir.is_dir() else []:
            meta = json.loads(path.read_text())
            files = [(self.root / src, self.root / dst) for src, dst in meta.pop("moves")]
            out.append(StagedCommit(int(meta["commit"]), files, meta))
        return out

    def _stage_dir(self, commit: int) -> Path:
        return self.staging_dir / f"c{commit:06d}"

    def publish(self, staged: StagedCommit, extra: dict[str, Any] | None = None) -> None:
        """Move the files into their partitions, then write the marker (the visibility point).
        A file already moved (by a publish that died half-way) is left where it is."""
        for src, dst in staged.files:
            if not src.exists() and dst.exists():
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
        self.commits_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.commits_dir / f"{staged.commit:06d}.json",
                          json.dumps({**staged.meta, **(extra or {})}, indent=1))
        self._unstage(staged)

    def abort(self, staged: StagedCommit) -> None:
        self._unstage(staged)

    def _unstage(self, staged: StagedCommit) -> None:
        """Remove a commit's staging folder, and `_staging/` itself once it is empty."""
        shutil.rmtree(self._stage_dir(staged.commit), ignore_errors=True)
        with contextlib.suppress(OSError):  # another commit is still staged there, or it is gone
            self.staging_dir.rmdir()

    def vacuum(self) -> list[Path]:
        """Remove staged files and published files of commits without a marker (crashed inserts;
        the feature store settles `pending` commits first)."""
        shutil.rmtree(self.staging_dir, ignore_errors=True)
        committed = {c["commit"] for c in self.commits()}
        removed = []
        for p in self.root.glob("event_date=*/part-c*.parquet"):
            try:
                commit = int(p.stem.split("-c", 1)[1])
            except (IndexError, ValueError):
                continue
            if commit not in committed:
                p.unlink(missing_ok=True)
                removed.append(p)
        return removed

    # reading ---------------------------------------------------------------------------------
    def files(self, start: Any = None, end: Any = None, max_commit: int | None = None) -> list[Path]:
        """Committed files whose event dates may hold times in [start, end)."""
        # the files are named by the UTC date of their rows: a bound with an offset is converted first
        lo = to_event_times([start]).iloc[0].strftime("%Y-%m-%d") if start is not None else None
        hi = to_event_times([end]).iloc[0].strftime("%Y-%m-%d") if end is not None else None
        out = []
        for c in self.commits():
            if max_commit is not None and c["commit"] > max_commit:
                continue
            for rel in c["files"]:
                day = rel.split("/", 1)[0].split("=", 1)[1]
                if (lo is None or day >= lo) and (hi is None or day <= hi):
                    out.append(self.root / rel)
        return out

    def read(
        self,
        start: Any = None,
        end: Any = None,
        max_commit: int | None = None,
        columns: Sequence[str] | None = None,
        internal: bool = False,
    ) -> pd.DataFrame:
        """Committed rows with start <= event time < end (frame spelling, json decoded, lists
        as lists), in commit and row order. `internal` keeps `_commit` and `_row`."""
        names = [self.group.feature(c).name for c in columns] if columns is not None else None
        read_cols = None if names is None else [*names, self.group.event_time, COMMIT_COLUMN, ROW_COLUMN]
        return self._frame(self._table(self.files(start, end, max_commit), read_cols), start, end, internal)

    def read_staged(self, staged: StagedCommit) -> pd.DataFrame:
        """The rows of a commit not yet published, in the order they were inserted (frame
        spelling, with `_commit` and `_row`): what recovery writes online again."""
        paths = [src if src.exists() else dst for src, dst in staged.files]  # a publish may have moved some
        return self._frame(self._table(paths, None), None, None, internal=True)

    def _table(self, paths: Sequence[Path], read_cols: list[str] | None) -> pa.Table:
        if paths:
            return pa.concat_tables([pq.read_table(p, columns=read_cols, schema=self.schema) for p in paths])
        return self.schema.empty_table() if read_cols is None else self.schema.empty_table().select(read_cols)

    def _frame(self, table: pa.Table, start: Any, end: Any, internal: bool) -> pd.DataFrame:
        frame = table.to_pandas()
        t = self.group.event_time
        frame[t] = frame[t].astype(TIME_UNIT)
        if start is not None or end is not None:
            keep = np.ones(len(frame), dtype=bool)
            if start is not None:
                keep &= (frame[t] >= to_event_times([start]).iloc[0]).to_numpy()
            if end is not None:
                keep &= (frame[t] < to_event_times([end]).iloc[0]).to_numpy()
            frame = frame[keep]
        frame = frame.sort_values([COMMIT_COLUMN, ROW_COLUMN], kind="stable").reset_index(drop=True)
        for f in self.group.features:
            if f.name not in frame.columns:
                continue
            if f.dtype == "json":
                frame[f.name] = [None if v is None else json.loads(v) for v in frame[f.name]]
            elif f.dtype.startswith("list_"):
                frame[f.name] = [None if v is None else v.tolist() for v in frame[f.name]]
        frame = frame.rename(columns={f.name: f.column for f in self.group.features if f.alias})
        if not internal:
            frame = frame.drop(columns=[COMMIT_COLUMN, ROW_COLUMN])
        return frame


def latest_per_key(frame: pd.DataFrame, key: str, event_time: str) -> pd.DataFrame:
    """The latest row of each key by event time; ties: the later commit, then the later row."""
    if frame.empty:
        return frame
    order = frame.sort_values([event_time, COMMIT_COLUMN, ROW_COLUMN], kind="stable")
    return order.drop_duplicates(subset=[key], keep="last").sort_index()


def _null(v: Any) -> bool:
    return v is None or v is pd.NA or v is pd.NaT or (isinstance(v, float) and v != v)


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return v
