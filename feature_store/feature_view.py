"""Feature views: features selected from several groups, joined on keys, with a label,
on-demand features and fitted transformations; training data offline, feature vectors online.

    view = FeatureView("ranking", features=(FeatureSelection("customers", ("age", "age_group")),
                                            FeatureSelection("articles", ("price", "sales_7d"))),
                       label_group="transactions", label="price", ...)
    fv = fs.create_feature_view(view)                  # pins the group versions; v1, v2, ...
    td = fv.train_validation_test_split(train_end="2020-09-01", validation_end="2020-09-15",
                                        start="2020-06-01", end="2020-09-22")
    x, y = td.features("train"), td.labels("train")   # transformations fitted on "train"
    vecs = fv.get_feature_vectors([{"customer_id": c, "article_id": a}, ...],
                                  request={"date": "2020-09-23"})

Training data is point-in-time correct (feature_store.pit): every feature value of a label row
is the latest one with event time <= the label's event time; equal times are visible; among
rows with the same key and event time the later insert wins. Splits are by the label's event
time: train [start, train_end), validation [train_end, validation_end), test [validation_end, end).

Training datasets are versioned (td1, td2, ... per view version) and immutable: the files are
written to a temporary folder, renamed into place and made read-only, never overwritten. Each
records the last commit of every group it read, so `recreate_training_data(n)` reads exactly the
same rows even after later inserts, and yields the same frames.

Online, `get_feature_vectors` reads each selected group ONCE per call (one `IN (...)` subquery
whatever the number of keys, all groups in one statement: one round trip; none for keys served
from the optional TTL cache), returns rows
in the order of the keys with a status per row ("complete", or "missing" with the groups that
lacked the key), computes on-demand features from the request with the same functions as
training and applies the transformations fitted on the training split.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from common.artifacts import atomic_write_text
from feature_store.offline import COMMIT_COLUMN, ROW_COLUMN, TIME_UNIT, to_event_times
from feature_store.on_demand import OnDemandFeature
from feature_store.online.base import normalise_key, storable_key
from feature_store.pit import point_in_time_join
from feature_store.schema import ONLINE_ROW_COLUMN, check_name
from feature_store.transformations import Transformation, apply_all, fit_all

if TYPE_CHECKING:
    from feature_store.store import FeatureGroupVersion, FeatureStore, OnlineTable

VIEW_FILE = "view.json"
TD_FILE = "td.json"
SPLITS = ("train", "validation", "test")
TIME_COLUMN = "event_time"  # the label's event time in training frames


@dataclass(frozen=True)
class FeatureSelection:
    """Features of one group, joined on the group's primary key.

    Attributes:
        group: the feature group.
        features: feature names (None: every feature but the key).
        version: the group version (None: the latest when the view is created).
        prefix: prepended to the output column names (to tell apart equal names of two groups).
        on: the label-group / request column holding this group's key (default: the key's name).
    """

    group: str
    features: tuple[str, ...] | None = None
    version: int | None = None
    prefix: str = ""
    on: str | None = None

    def __post_init__(self) -> None:
        check_name(self.group, "feature group name")
        if self.features is not None:
            object.__setattr__(self, "features", tuple(self.features))
        if self.prefix and not self.prefix.replace("_", "a").isalnum():
            raise ValueError(f"invalid prefix {self.prefix!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"group": self.group, "features": list(self.features) if self.features is not None else None,
                "version": self.version, "prefix": self.prefix, "on": self.on}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureSelection:
        f = d.get("features")
        return cls(d["group"], tuple(f) if f is not None else None, d.get("version"), d.get("prefix", ""), d.get("on"))


@dataclass(frozen=True)
class FeatureView:
    """A feature view definition (see the module doc).

    Attributes:
        name: the view's name.
        features: the selections, one per group.
        label_group: the group whose rows are the training examples (their event time is the
            label time); None for a serving-only view.
        label: the label column of the label group.
        label_features: label-group columns used as features (in serving they come from the
            request, e.g. the sales channel).
        on_demand: features computed from request parameters / view columns.
        request_from_label: request parameter -> label-group column that plays its part in
            training (the label group's event-time column may be named).
        transformations: fitted on the training split, applied to view columns.
    """

    name: str
    features: tuple[FeatureSelection, ...]
    label_group: str | None = None
    label_group_version: int | None = None
    label: str | None = None
    label_features: tuple[str, ...] = ()
    on_demand: tuple[OnDemandFeature, ...] = ()
    request_from_label: Mapping[str, str] = field(default_factory=dict)
    transformations: tuple[Transformation, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        check_name(self.name, "feature view name")
        for attr in ("features", "label_features", "on_demand", "transformations"):
            object.__setattr__(self, attr, tuple(getattr(self, attr)))
        object.__setattr__(self, "request_from_label", dict(self.request_from_label))
        if not self.features:
            raise ValueError(f"feature view {self.name!r} selects no features")
        if self.label is not None and self.label_group is None:
            raise ValueError(f"feature view {self.name!r}: a label needs a label_group")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "features": [s.to_dict() for s in self.features],
            "label_group": self.label_group,
            "label_group_version": self.label_group_version,
            "label": self.label,
            "label_features": list(self.label_features),
            "on_demand": [o.to_dict() for o in self.on_demand],
            "request_from_label": dict(self.request_from_label),
            "transformations": [t.to_dict() for t in self.transformations],
            "description": self.description,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureView:
        return cls(
            name=d["name"],
            features=tuple(FeatureSelection.from_dict(s) for s in d["features"]),
            label_group=d.get("label_group"),
            label_group_version=d.get("label_group_version"),
            label=d.get("label"),
            label_features=tuple(d.get("label_features") or ()),
            on_demand=tuple(OnDemandFeature.from_dict(o) for o in d.get("on_demand") or ()),
            request_from_label=d.get("request_from_label") or {},
            transformations=tuple(Transformation.from_dict(t) for t in d.get("transformations") or ()),
            description=d.get("description", ""),
        )


# ---------------------------------------------------------------------------------------------
# Online results and cache


@dataclass
class FeatureVectors:
    """Feature vectors of one call, in the order of the keys.

    Attributes:
        keys: the keys as given.
        status: per row, "complete" (every group had the key) or "missing".
        missing_groups: per row, the groups that lacked the key.
        columns: output column -> values in key order: numeric features as numpy arrays (NaN
            for nulls and missing keys; int64, or float64 when a value is missing), other
            features as lists (None for nulls and missing keys).
    """

    keys: list[Any]
    status: list[str]
    missing_groups: list[tuple[str, ...]]
    columns: dict[str, Any]

    def __len__(self) -> int:
        return len(self.keys)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per key (numeric values as Python numbers, NaN for nulls)."""
        names = list(self.columns)
        cols = [c.tolist() if isinstance(c, np.ndarray) else list(c) for c in (self.columns[n] for n in names)]
        return [dict(zip(names, vals, strict=True)) for vals in zip(*cols, strict=True)] if cols else [
            {} for _ in self.keys]

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({c: list(v) for c, v in self.columns.items()})

    def to_numpy(self, columns: Sequence[str] | None = None) -> np.ndarray:
        """float64 matrix [rows, columns] (None -> NaN)."""
        names = list(columns) if columns is not None else list(self.columns)
        out = np.empty((len(self.keys), len(names)), dtype=np.float64)
        for j, c in enumerate(names):
            col = self.columns[c]
            if isinstance(col, np.ndarray) and col.dtype.kind in "biuf":
                out[:, j] = col
            else:
                out[:, j] = pd.to_numeric(pd.Series(list(col), dtype=object), errors="coerce")
        return out


class TTLCache:
    """An in-process key -> row cache whose entries expire `ttl_s` seconds after they were read;
    bounded to `max_entries` (least recently stored dropped first). Thread-safe.

    `lookup` refreshes ahead: when some requested keys must be read anyway (missing or expired),
    the requested keys in the last `refresh_ahead` share of their life are read in the same
    statement, so the entries a stream of requests shares expire in fewer, larger batches: with
    per-entry expiry alone, nearly every ranking call of a busy replica found some article expired
    and paid a statement for it. Served at 150 req/s, the database's statements per request fell
    from 1.67 to 1.18 (serve_load.py, `db_statements_per_request`; docs/scaling.md F34). No row
    is kept longer than `ttl_s`.

    A row is held as given, its expiry time apart: no (expiry, row) pair per entry, which the
    garbage collector would walk in every full collection for as long as the entry lives. Rows
    made only of atomic values (numbers, strings, None, tuples of those) are then left out of
    collections once the collector has seen them once: with 100,000 article rows cached, a full
    collection took 3.5-4.5 ms against 70-81 ms (benchmarks/serve_load.py, "case": "gc_full_collect")."""

    def __init__(self, ttl_s: float, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic,
                 refresh_ahead: float = 0.5):
        if ttl_s <= 0 or max_entries < 1:
            raise ValueError("ttl_s must be > 0 and max_entries >= 1")
        if not 0 <= refresh_ahead <= 1:
            raise ValueError(f"refresh_ahead must be in [0, 1], not {refresh_ahead}")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self.refresh_ahead = refresh_ahead
        self._rows: OrderedDict[Any, Any] = OrderedDict()
        self._expires: dict[Any, float] = {}
        self._lock = threading.Lock()
        self.hits = self.misses = self.refreshed = 0

    def lookup(self, keys: Sequence[Any]) -> tuple[dict[Any, Any], list[Any]]:
        """(the fresh rows of `keys`, the distinct keys to read): the missing and expired ones,
        and when there are any, also the fresh ones due within `refresh_ahead` of their life
        (their cached rows are returned too: the caller's read replaces them)."""
        now = self.clock()
        due_by = now + self.ttl_s * self.refresh_ahead
        out: dict[Any, Any] = {}
        todo: list[Any] = []
        due: list[Any] = []
        with self._lock:
            for k in dict.fromkeys(keys):
                expires = self._expires.get(k, now)
                if expires <= now:
                    todo.append(k)
                    continue
                out[k] = self._rows[k]
                if expires <= due_by:
                    due.append(k)
            self.hits += len(out)
            self.misses += len(todo)
            if todo:
                self.refreshed += len(due)
        return out, (todo + due if todo else todo)

    def put_many(self, rows: Mapping[Any, Any]) -> None:
        expires = self.clock() + self.ttl_s
        with self._lock:
            for k, row in rows.items():
                self._rows[k] = row
                self._rows.move_to_end(k)
                self._expires[k] = expires
            while len(self._rows) > self.max_entries:
                self._expires.pop(self._rows.popitem(last=False)[0], None)

    def forget(self, keys: Iterable[Any]) -> None:
        """Drop these keys' entries (their rows changed): the next lookup reads them again."""
        with self._lock:
            for k in keys:
                self._rows.pop(k, None)
                self._expires.pop(k, None)

    def clear(self) -> None:
        with self._lock:
            self._rows.clear()
            self._expires.clear()


# ---------------------------------------------------------------------------------------------
# Training datasets


@dataclass
class TrainingDataset:
    """One immutable training dataset of a view version."""

    view: str
    view_version: int
    version: int
    meta: dict[str, Any]
    splits: dict[str, pd.DataFrame]
    transformations: tuple[Transformation, ...]

    @property
    def params(self) -> dict[str, dict[str, Any]]:
        return self.meta.get("transformation_params", {})

    @property
    def label(self) -> str | None:
        return self.meta.get("label")

    @property
    def feature_columns(self) -> list[str]:
        return list(self.meta["feature_columns"])

    def frame(self, split: str = "train") -> pd.DataFrame:
        """The raw split: entity keys, event time, features and label."""
        if split not in self.splits:
            raise KeyError(f"training dataset {self.view} v{self.view_version} td{self.version} has no split "
                           f"{split!r} (has {sorted(self.splits)})")
        return self.splits[split]

    def features(self, split: str = "train", transformed: bool = True) -> pd.DataFrame:
        """Feature columns of a split, transformed with the parameters fitted on "train"."""
        f = self.frame(split)
        cols = {c: f[c] for c in self.feature_columns}
        if transformed and self.transformations:
            cols = apply_all(self.transformations, self.params, cols)
        return pd.DataFrame({c: (v.to_numpy() if isinstance(v, pd.Series) else v) for c, v in cols.items()},
                            index=f.index)

    def labels(self, split: str = "train") -> pd.Series:
        if self.label is None:
            raise ValueError(f"feature view {self.view!r} has no label")
        return self.frame(split)[self.label]


# ---------------------------------------------------------------------------------------------


class FeatureViewHandle:
    """A stored version of a feature view, bound to a FeatureStore (offline and online)."""

    def __init__(self, fs: FeatureStore, view: FeatureView, version: int, meta: dict[str, Any]):
        self.fs = fs
        self.view = view
        self.version = int(version)
        self.meta = meta
        self.root = fs.wd.views_dir / view.name / f"v{self.version}"
        self._groups: dict[str, FeatureGroupVersion] = {}
        self._tables: list[tuple[FeatureSelection, OnlineTable, list[tuple[int, str]], set[int]]] | None = None
        self._caches: dict[str, TTLCache] = {}
        self._params_cache: dict[int, dict[str, Any]] = {}
        self._selection_cache: dict[FeatureSelection, list[tuple[str, str]]] = {}
        self._columns = self._resolve_columns()

    def __repr__(self) -> str:
        return f"FeatureViewHandle({self.view.name!r}, v{self.version})"

    # definition ------------------------------------------------------------------------------
    def group(self, name: str, version: int | None) -> FeatureGroupVersion:
        key = f"{name}@{version}"
        if key not in self._groups:
            self._groups[key] = self.fs.get_feature_group(name, version)
        return self._groups[key]

    def _selected(self, sel: FeatureSelection) -> list[tuple[str, str]]:
        """(feature column in the group, output column) of a selection."""
        got = self._selection_cache.get(sel)
        if got is None:
            g = self.group(sel.group, sel.version).group
            names = sel.features if sel.features is not None else [f.column for f in g.value_features]
            got = [(g.feature(n).column, f"{sel.prefix}{g.feature(n).column}") for n in names]
            self._selection_cache[sel] = got
        return got

    def join_column(self, sel: FeatureSelection) -> str:
        return sel.on or self.group(sel.group, sel.version).group.key

    def _resolve_columns(self) -> list[str]:
        out: list[str] = []
        for sel in self.view.features:
            out += [o for _, o in self._selected(sel)]
        out += list(self.view.label_features)
        out += [o.name for o in self.view.on_demand]
        seen: set[str] = set()
        for c in out:
            if c in seen:
                raise ValueError(f"feature view {self.view.name!r}: column {c!r} appears twice (use a prefix)")
            seen.add(c)
        for t in self.view.transformations:
            if t.feature not in seen:
                raise ValueError(f"feature view {self.view.name!r}: transformation of unknown column {t.feature!r}")
        return out

    @property
    def feature_columns(self) -> list[str]:
        """Output columns before transformations, in order."""
        return list(self._columns)

    @property
    def entity_columns(self) -> list[str]:
        return list(dict.fromkeys(self.join_column(s) for s in self.view.features))

    # training data -----------------------------------------------------------------------------
    def training_data(self, start: Any = None, end: Any = None, description: str = "") -> TrainingDataset:
        """A new training dataset of every label row with start <= event time < end (one split,
        "train"; transformations fitted on it)."""
        return self._create_td({"train": (start, end)}, start, end, description)

    def train_test_split(self, train_end: Any, start: Any = None, end: Any = None,
                         description: str = "") -> TrainingDataset:
        return self._create_td({"train": (start, train_end), "test": (train_end, end)}, start, end, description)

    def train_validation_test_split(self, train_end: Any, validation_end: Any, start: Any = None, end: Any = None,
                                    description: str = "") -> TrainingDataset:
        """Time-based splits by the label's event time; transformations fitted on "train"."""
        if to_event_times([train_end]).iloc[0] > to_event_times([validation_end]).iloc[0]:  # (either may have an offset)
            raise ValueError("train_end must not be after validation_end")
        splits = {"train": (start, train_end), "validation": (train_end, validation_end), "test": (validation_end, end)}
        return self._create_td(splits, start, end, description)

    def _watermarks(self) -> dict[str, int]:
        marks = {}
        for name, version in self._read_groups():
            fgv = self.group(name, version)
            marks[f"{name}@v{fgv.version}"] = max((c["commit"] for c in fgv.offline.commits()), default=0)
        return marks

    def _read_groups(self) -> list[tuple[str, int | None]]:
        v = self.view
        out = [(s.group, s.version) for s in v.features]
        if v.label_group is not None:
            out.append((v.label_group, v.label_group_version))
        return list(dict.fromkeys(out))

    def _build_frame(self, start: Any, end: Any, marks: Mapping[str, int]) -> pd.DataFrame:
        v = self.view
        if v.label_group is None:
            raise ValueError(f"feature view {v.name!r} has no label group: it serves vectors only")
        lg = self.group(v.label_group, v.label_group_version)
        spine = lg.read(start, end, max_commit=marks[f"{lg.name}@v{lg.version}"], internal=True)
        t = lg.group.event_time
        spine = spine.sort_values([t, COMMIT_COLUMN, ROW_COLUMN], kind="stable").reset_index(drop=True)
        out: dict[str, Any] = {}
        for c in self.entity_columns:
            if c not in spine.columns:
                raise ValueError(f"feature view {v.name!r}: label group {lg.name!r} has no key column {c!r}")
            out[c] = spine[c].to_numpy(dtype=object)
        out[TIME_COLUMN] = spine[t].astype(TIME_UNIT).to_numpy()
        for sel in v.features:
            fgv = self.group(sel.group, sel.version)
            pairs = self._selected(sel)
            right = fgv.read(end=end, max_commit=marks[f"{fgv.name}@v{fgv.version}"], internal=True)
            joined = point_in_time_join(spine, t, self.join_column(sel), right, fgv.group.key,
                                        fgv.group.event_time, dict(pairs))
            for _, o in pairs:
                out[o] = joined[o].to_numpy(dtype=object)
        for c in v.label_features:
            out[c] = spine[c].to_numpy(dtype=object)
        request = {p: (spine[t] if col == t else spine[col]).to_numpy() for p, col in v.request_from_label.items()}
        for o in v.on_demand:
            out[o.name] = o.compute({**request, **out})
        if v.label is not None:
            out[v.label] = spine[v.label].to_numpy()
        frame = pd.DataFrame(out)
        return frame.infer_objects()

    def _create_td(self, splits: Mapping[str, tuple[Any, Any]], start: Any, end: Any,
                   description: str) -> TrainingDataset:
        marks = self._watermarks()
        frame = self._build_frame(start, end, marks)
        parts = {name: _time_slice(frame, lo, hi) for name, (lo, hi) in splits.items()}
        params = fit_all(self.view.transformations, parts["train"]) if self.view.transformations else {}
        version = max(self.training_dataset_versions(), default=0) + 1
        meta = {
            "view": self.view.name,
            "view_version": self.version,
            "version": version,
            "start": _iso(start),
            "end": _iso(end),
            "splits": {name: [_iso(lo), _iso(hi)] for name, (lo, hi) in splits.items()},
            "rows": {name: len(p) for name, p in parts.items()},
            "commits": marks,
            "label": self.view.label,
            "feature_columns": self.feature_columns,
            "transformation_params": params,
            "point_in_time_rule": "feature event time <= label event time; same key and time: the later insert wins",
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "description": description,
        }
        _write_immutable(self.root / f"td{version}", parts, meta)
        return TrainingDataset(self.view.name, self.version, version, meta, parts, self.view.transformations)

    def training_dataset_versions(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(p.name[2:]) for p in self.root.glob("td*") if p.name[2:].isdigit() and (p / TD_FILE).is_file())

    def get_training_data(self, version: int | None = None) -> TrainingDataset:
        """A stored training dataset (the latest when None), read from its files."""
        versions = self.training_dataset_versions()
        if not versions:
            raise LookupError(f"feature view {self.view.name!r} v{self.version} has no training datasets yet")
        version = versions[-1] if version is None else int(version)
        d = self.root / f"td{version}"
        if not (d / TD_FILE).is_file():
            raise LookupError(f"feature view {self.view.name!r} v{self.version} has no training dataset {version}")
        meta = json.loads((d / TD_FILE).read_text())
        parts = {name: pd.read_parquet(d / f"{name}.parquet") for name in meta["splits"]}
        for p in parts.values():
            _restore_lists(p)
        return TrainingDataset(self.view.name, self.version, version, meta, parts, self.view.transformations)

    def recreate_training_data(self, version: int) -> TrainingDataset:
        """Rebuild a stored training dataset from the offline store, reading only the commits it
        read (later inserts, late-arriving rows included, are ignored). Not stored again."""
        meta = self.get_training_data(version).meta
        frame = self._build_frame(meta["start"], meta["end"], meta["commits"])
        parts = {name: _time_slice(frame, lo, hi) for name, (lo, hi) in meta["splits"].items()}
        return TrainingDataset(self.view.name, self.version, int(version), meta, parts, self.view.transformations)

    # online ------------------------------------------------------------------------------------
    def enable_cache(self, group: str, ttl_s: float, max_entries: int = 100_000) -> TTLCache:
        """Serve `group` from an in-process cache whose rows expire after `ttl_s` (for slowly
        changing groups such as articles)."""
        if group not in {s.group for s in self.view.features}:
            raise ValueError(f"feature view {self.view.name!r} does not select group {group!r}")
        self._caches[group] = TTLCache(ttl_s, max_entries)
        return self._caches[group]

    def _online_tables(self) -> list[tuple[FeatureSelection, OnlineTable, list[tuple[int, str]], set[int]]]:
        """Per selection: its online table, (codec column index, output column) pairs and the
        set of those indexes."""
        if self._tables is None:
            if self.fs.online is None:
                raise ValueError("this FeatureStore has no online store")
            tables = []
            for sel in self.view.features:
                fgv = self.group(sel.group, sel.version)
                if not fgv.group.online:
                    raise ValueError(f"feature group {sel.group!r} is offline only: it cannot serve vectors")
                table = fgv.online_table()  # a version retired from the online store says so
                picks = [(table.codec.names.index(f), out) for f, out in self._selected(sel)]
                tables.append((sel, table, picks, {j for j, _ in picks}))
            self._tables = tables
        return self._tables

    def transformation_params(self, training_dataset_version: int | None = None) -> dict[str, Any]:
        versions = self.training_dataset_versions()
        if not versions:
            raise LookupError(
                f"feature view {self.view.name!r} v{self.version} has transformations but no training dataset "
                "to take their fitted parameters from: create one first"
            )
        v = versions[-1] if training_dataset_version is None else int(training_dataset_version)
        if v not in self._params_cache:
            meta = json.loads((self.root / f"td{v}" / TD_FILE).read_text())
            self._params_cache[v] = meta["transformation_params"]
        return self._params_cache[v]

    def get_feature_vectors(
        self,
        keys: Sequence[Any],
        request: Mapping[str, Any] | None = None,
        transformed: bool | None = None,
        training_dataset_version: int | None = None,
    ) -> FeatureVectors:
        """Feature vectors for `keys`, in their order, with ONE statement for all feature groups.

        Args:
            keys: entity keys: dicts {join column: value}, or plain values when every selected
                group joins on the same column.
            request: request parameters (on-demand inputs, label features): a value for all rows
                or a sequence with one value per row.
            transformed: apply the view's transformations (default: when it has any), with the
                parameters of `training_dataset_version` (default: the latest).
        Returns:
            FeatureVectors; a key no group stores is a row with status "missing", not an error.
        """
        keys = list(keys)
        n = len(keys)
        request = dict(request or {})
        entity = self._entities(keys)
        columns: dict[str, Any] = {}
        missing: dict[int, list[str]] = {}
        tables = self._online_tables()
        group_keys = [entity[self.join_column(sel)] for sel, _, _, _ in tables]
        try:
            groups = self._read_online(tables, group_keys)
        except ValueError:
            # A key no row can have (a string over the key length, an integer outside int64) is a
            # missing row, not an error; checked only now, so that valid reads pay nothing for it.
            storable = [[k if k is None or storable_key(t.spec, k) else None for k in ks]
                        for (_, t, _, _), ks in zip(tables, group_keys, strict=True)]
            if storable == group_keys:
                raise
            groups = self._read_online(tables, storable)
        for (sel, _, picks, _), (absent, cols) in zip(tables, groups, strict=True):
            for j, out in picks:
                columns[out] = cols[j]
            for i in absent:
                missing.setdefault(i, []).append(sel.group)
        for c in self.view.label_features:
            columns[c] = _per_row(request.get(c), n)
        if self.view.on_demand:
            values = {**{p: _per_row(v, n) for p, v in request.items()}, **columns}
            for o in self.view.on_demand:
                try:
                    columns[o.name] = list(o.compute(values))
                except KeyError as e:
                    raise ValueError(f"on-demand feature {o.name!r} needs request parameter {e.args[0]!r}") from None
                values[o.name] = columns[o.name]
        if transformed is None:
            transformed = bool(self.view.transformations)
        if transformed and self.view.transformations:
            columns = apply_all(self.view.transformations, self.transformation_params(training_dataset_version),
                                columns)
        status: list[str] = ["complete"] * n
        missing_groups: list[tuple[str, ...]] = [()] * n
        for i, groups in missing.items():
            status[i] = "missing"
            missing_groups[i] = tuple(groups)
        return FeatureVectors(keys, status, missing_groups, columns)

    def _read_online(self, tables: list[Any], group_keys: list[list[Any]]) -> list[tuple[list[int], list[Any]]]:
        """Per selected group, (the positions of the keys it does not store, its columns)."""
        # the groups without a cache are read in ONE statement (one round trip for the view)
        uncached = [i for i, (sel, _, _, _) in enumerate(tables) if sel.group not in self._caches]
        bufs = dict(zip(uncached, self.fs.online.read_concat_many(
            [(tables[i][1].spec, [k for k in group_keys[i] if k is not None], ONLINE_ROW_COLUMN) for i in uncached]
        ), strict=True)) if uncached else {}
        return [self._group_columns(sel, table, group_keys[i], wanted, bufs.get(i))
                for i, (sel, table, _, wanted) in enumerate(tables)]

    def _entities(self, keys: list[Any]) -> dict[str, list[Any]]:
        cols = self.entity_columns
        if keys and isinstance(keys[0], Mapping):
            try:
                return {c: [k[c] for k in keys] for c in cols}
            except KeyError as e:
                raise ValueError(f"feature view {self.view.name!r}: a key lacks {e.args[0]!r} (needs {cols})") from None
        if len(cols) != 1:
            raise ValueError(f"feature view {self.view.name!r} joins on {cols}: pass keys as dicts")
        return {cols[0]: keys}

    def _group_columns(self, sel: FeatureSelection, table: OnlineTable, keys: list[Any],
                       wanted: set[int], buf: bytes | None) -> tuple[list[int], list[Any]]:
        """Per wanted feature of the group, values in the order of `keys` (numeric features as
        numpy arrays, NaN for nulls and missing keys); and the positions of the keys not found.
        `buf`: the group's rows for `keys` as read (None: through the group's cache)."""
        codec = table.codec
        cache = self._caches.get(sel.group)
        if cache is None:
            assert buf is not None, "an uncached group is read before"
            found, cols = codec.decode_columns(buf, wanted, arrays=True, order=keys, arranged=self.fs.online.concat_order)
            return ([r for r, k in enumerate(found) if k is None] if None in found else []), cols
        n = len(keys)
        keys = [None if k is None else normalise_key(table.spec, k) for k in keys]
        rows, todo = cache.lookup([k for k in keys if k is not None])
        if todo:
            found_keys, got = codec.decode_columns(self.fs.online.read_concat(table.spec, todo, ONLINE_ROW_COLUMN))
            fetched = dict(zip(found_keys, zip(*got, strict=True), strict=True)) if found_keys else {}
            cache.put_many(fetched)
            rows.update(fetched)
        found_keys = list(rows)
        miss = len(found_keys)
        pos = {k: i for i, k in enumerate(found_keys)}
        idx = [pos.get(k, miss) for k in keys]
        stored = list(zip(*rows.values(), strict=True)) if rows else [() for _ in codec.names]
        all_found = miss not in idx
        absent = [] if all_found else [r for r, i in enumerate(idx) if i == miss]
        get = itemgetter(*idx) if n > 1 else (lambda c: (c[idx[0]],) if n else ())
        out: list[Any] = [None] * len(codec.names)
        for j in wanted:
            values = list(get([*stored[j], None]))  # position `miss`: the value of a key that is not stored
            out[j] = _to_array(values, codec.fields[j].dtype) if codec.fields[j].dtype in _NUMERIC else values
        return absent, out


_NUMERIC = ("int64", "float64", "bool")


def _to_array(values: list[Any], dtype: str) -> np.ndarray:
    """A numeric column as decode_columns(arrays=True) returns it."""
    has_null = any(v is None for v in values)
    if dtype == "bool":
        return np.array(values, dtype=object if has_null else bool)
    if dtype == "int64" and not has_null:
        return np.array(values, dtype=np.int64)
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# storage of views and training datasets


def create_feature_view(fs: FeatureStore, view: FeatureView) -> FeatureViewHandle:
    """Store a new version of `view` with the group versions pinned (the latest where unset)."""
    pinned = FeatureView.from_dict({
        **view.to_dict(),
        "features": [{**s.to_dict(), "version": s.version or fs.get_feature_group(s.group).version}
                     for s in view.features],
        "label_group_version": (view.label_group_version or fs.get_feature_group(view.label_group).version)
        if view.label_group else None,
    })
    base = fs.wd.views_dir / view.name
    taken = [int(p.name[1:]) for p in base.glob("v*") if p.name[1:].isdigit()] if base.is_dir() else []
    version = max(taken, default=0) + 1
    meta = {"view": pinned.to_dict(), "version": version, "created_at": datetime.now(UTC).isoformat(timespec="seconds")}
    handle = FeatureViewHandle(fs, pinned, version, meta)  # validates the columns before anything is stored
    root = base / f"v{version}"
    root.mkdir(parents=True, exist_ok=False)
    atomic_write_text(root / VIEW_FILE, json.dumps(meta, indent=1))
    return handle


def get_feature_view(fs: FeatureStore, name: str, version: int | None = None) -> FeatureViewHandle:
    base = fs.wd.views_dir / check_name(name, "feature view name")
    versions = sorted(int(p.name[1:]) for p in base.glob("v*") if (p / VIEW_FILE).is_file()) if base.is_dir() else []
    if not versions:
        raise LookupError(f"no feature view {name!r} in {fs.wd.views_dir}")
    version = versions[-1] if version is None else int(version)
    path = base / f"v{version}" / VIEW_FILE
    if not path.is_file():
        raise LookupError(f"feature view {name!r} has no version {version} (versions: {versions})")
    meta = json.loads(path.read_text())
    return FeatureViewHandle(fs, FeatureView.from_dict(meta["view"]), version, meta)


def _write_immutable(final: Path, parts: Mapping[str, pd.DataFrame], meta: Mapping[str, Any]) -> None:
    if final.exists():
        raise FileExistsError(f"training dataset {final} already exists; training datasets are immutable")
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, frame in parts.items():
        frame.to_parquet(tmp / f"{name}.parquet", index=False)
    (tmp / TD_FILE).write_text(json.dumps(meta, indent=1, default=str))
    os.rename(tmp, final)
    for p in final.iterdir():
        p.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)


def _time_slice(frame: pd.DataFrame, lo: Any, hi: Any) -> pd.DataFrame:
    keep = np.ones(len(frame), dtype=bool)
    t = frame[TIME_COLUMN]
    if lo is not None:
        keep &= (t >= to_event_times([lo]).iloc[0]).to_numpy()
    if hi is not None:
        keep &= (t < to_event_times([hi]).iloc[0]).to_numpy()
    return frame[keep].reset_index(drop=True)


def _iso(t: Any) -> str | None:
    return None if t is None else str(to_event_times([t]).iloc[0])


def _per_row(value: Any, n: int) -> list[Any]:
    if isinstance(value, list | tuple | np.ndarray | pd.Series):
        values = list(value)
        if len(values) != n:
            raise ValueError(f"a request parameter has {len(values)} values for {n} keys")
        return values
    return [value] * n


def _restore_lists(frame: pd.DataFrame) -> None:
    """Parquet returns list cells as numpy arrays: back to lists, as training built them."""
    for c in frame.columns:
        if frame[c].dtype == object:
            first = next((v for v in frame[c] if v is not None), None)
            if isinstance(first, np.ndarray):
                frame[c] = [v.tolist() if isinstance(v, np.ndarray) else v for v in frame[c]]


def get_feature_vectors(view: FeatureViewHandle, keys: Sequence[Any], request: Mapping[str, Any] | None = None,
                        **kwargs: Any) -> FeatureVectors:
    """`view.get_feature_vectors(keys, request, ...)` as a function (see the method)."""
    return view.get_feature_vectors(keys, request, **kwargs)
