"""The feature store: offline Parquet plus an online table per feature group version.

A write creates a new version: the Parquet folder is written under a temp name and renamed,
the online rows go to a new table, and only the manifest (written last by the pipeline) makes
the version visible. A failed write therefore never replaces data a reader is using.
"""
from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common.artifacts import FeatureGroupRef
from common.workdir import Workdir
from feature_store.groups import GROUPS, FeatureGroup
from feature_store.online.base import OnlineStore, TableSpec

ONLINE_CHUNK = 2000


def table_spec(group: FeatureGroup, version: int) -> TableSpec:
    return TableSpec(name=group.table_name(version), key=group.key, columns=dict(group.columns))


class FeatureStore:
    """Writes feature groups offline and online; reads them back by manifest reference."""

    def __init__(self, workdir: Workdir, online: OnlineStore | None = None):
        self.wd = workdir
        self.online = online

    def next_version(self, name: str) -> int:
        base = self.wd.offline_dir / name
        versions = [int(p.name[1:]) for p in base.glob("v*") if p.name[1:].isdigit()] if base.exists() else []
        return max(versions, default=0) + 1

    def write(self, name: str, frame: pd.DataFrame, progress: bool = True) -> FeatureGroupRef:
        """Write a new version of group `name` offline and, for online groups, online."""
        group = GROUPS[name]
        missing = [c for c in group.columns if c not in frame.columns]
        if missing:
            raise ValueError(f"feature group {name!r}: frame lacks columns {missing}")
        frame = frame[list(group.columns)]
        version = self.next_version(name)
        path = self._write_offline(group, frame, version)
        ref = FeatureGroupRef(version=version, offline_path=self.wd.relative(path), primary_key=[group.key])
        if group.online and self.online is not None:
            spec = table_spec(group, version)
            self.online.ensure_table(spec)
            rows = to_online_rows(group, frame)
            for i in range(0, len(rows), ONLINE_CHUNK):
                self.online.write_batch(spec, rows[i : i + ONLINE_CHUNK])
            if progress:
                print(f"[feature store] {name} v{version}: {len(rows)} rows online in {spec.name}", flush=True)
            ref.online_table = spec.name
        return ref

    def _write_offline(self, group: FeatureGroup, frame: pd.DataFrame, version: int) -> Path:
        final = self.wd.offline_dir / group.name / f"v{version}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        to_offline(group, frame).to_parquet(tmp / "part-0.parquet", index=False)
        tmp.rename(final)
        return final

    def read_offline(self, name: str, ref: FeatureGroupRef) -> pd.DataFrame:
        frame = pd.read_parquet(self.wd.resolve(ref.offline_path))
        return from_offline(GROUPS[name], frame)


def to_offline(group: FeatureGroup, frame: pd.DataFrame) -> pd.DataFrame:
    """JSON-typed columns are stored as JSON text so Parquet never has to infer a schema."""
    out = frame.copy()
    for col, typ in group.columns.items():
        if typ == "json":
            out[col] = out[col].map(lambda v: None if v is None else json.dumps(_plain(v)))
    return out


def from_offline(group: FeatureGroup, frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    for col, typ in group.columns.items():
        if typ == "json" and col in out:
            out[col] = out[col].map(lambda v: None if v is None else json.loads(v))
    return out


def to_online_rows(group: FeatureGroup, frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as plain Python values: NaN -> None, numpy scalars -> int/float."""
    cols = list(group.columns)
    rows = []
    for rec in frame[cols].itertuples(index=False, name=None):
        rows.append({c: _plain(v) for c, v in zip(cols, rec, strict=True)})
    return rows


def _plain(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, float | np.floating):
        return None if math.isnan(v) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if v is pd.NA or v is pd.NaT:
        return None
    return v


def read_online(store: OnlineStore, ref: FeatureGroupRef, name: str, keys: Sequence[Any],
                columns: Sequence[str] | None = None) -> dict[Any, dict[str, Any]]:
    """One batched read of a group for many keys, by manifest reference."""
    if ref.online_table is None:
        raise ValueError(f"feature group {name!r} v{ref.version} has no online table")
    return store.read_batch(table_spec(GROUPS[name], ref.version), list(keys), columns)
