"""Model-dependent transformations: fitted on the training split, stored with the training
dataset, applied by the same function to training frames and to online feature vectors.

    standard_scaler   (x - mean) / std                      (null stays NaN; std 0 -> 1)
    min_max_scaler    (x - min) / (max - min)               (null stays NaN; range 0 -> 1)
    label_encoder     category -> 0..K-1 in sorted order    (null or unseen -> -1; 2 == 2.0)
    one_hot_encoder   category -> columns <f>__0..<f>__K-1  (null or unseen -> all 0)
    bucketizer        x -> i with boundaries[i-1] <= x < boundaries[i]; options["boundaries"]
                      (not fitted; null -> -1)

Inputs are columns (lists, numpy arrays or Series); outputs are numpy arrays, one per output
column. Fitted parameters are plain JSON.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from feature_store.schema import check_name

KINDS = ("standard_scaler", "min_max_scaler", "label_encoder", "one_hot_encoder", "bucketizer")


@dataclass(frozen=True)
class Transformation:
    """Transform view column `feature` with `kind` (see the module doc)."""

    feature: str
    kind: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_name(self.feature, "transformed feature")
        if self.kind not in KINDS:
            raise ValueError(f"transformation of {self.feature!r}: unknown kind {self.kind!r}; one of {KINDS}")
        if self.kind == "bucketizer":
            b = list(self.options.get("boundaries") or [])
            if not b or any(x >= y for x, y in zip(b, b[1:], strict=False)):
                raise ValueError(f"bucketizer of {self.feature!r} needs increasing options['boundaries']")
        object.__setattr__(self, "options", dict(self.options))

    def fit(self, values: Any) -> dict[str, Any]:
        """Parameters learnt from the training split's column."""
        if self.kind in ("standard_scaler", "min_max_scaler"):
            x = _numbers(values)
            x = x[~np.isnan(x)]
            if self.kind == "standard_scaler":
                mean = float(x.mean()) if len(x) else 0.0
                std = float(x.std()) if len(x) else 1.0
                return {"mean": mean, "std": std if std > 0 else 1.0}
            lo = float(x.min()) if len(x) else 0.0
            hi = float(x.max()) if len(x) else 1.0
            return {"min": lo, "max": hi}
        if self.kind in ("label_encoder", "one_hot_encoder"):
            cats = sorted({_category(v) for v in _objects(values) if not _null(v)})
            return {"categories": cats}
        return {"boundaries": list(self.options["boundaries"])}

    def output_columns(self, params: Mapping[str, Any]) -> list[str]:
        if self.kind == "one_hot_encoder":
            return [f"{self.feature}__{i}" for i in range(len(params["categories"]))]
        return [self.feature]

    def apply(self, values: Any, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Output column -> values, for a column of any length."""
        if self.kind == "standard_scaler":
            return {self.feature: (_numbers(values) - params["mean"]) / params["std"]}
        if self.kind == "min_max_scaler":
            span = params["max"] - params["min"]
            return {self.feature: (_numbers(values) - params["min"]) / (span if span > 0 else 1.0)}
        if self.kind == "bucketizer":
            x = _numbers(values)
            out = np.searchsorted(np.asarray(params["boundaries"], dtype=np.float64), x, side="right")
            return {self.feature: np.where(np.isnan(x), -1, out).astype(np.int64)}
        index = {c: i for i, c in enumerate(params["categories"])}
        codes = np.array([-1 if _null(v) else index.get(_category(v), -1) for v in _objects(values)],
                         dtype=np.int64)
        if self.kind == "label_encoder":
            return {self.feature: codes}
        onehot = np.zeros((len(codes), len(index)), dtype=np.float64)
        hit = codes >= 0
        onehot[np.flatnonzero(hit), codes[hit]] = 1.0
        return {name: onehot[:, i] for i, name in enumerate(self.output_columns(params))}

    def to_dict(self) -> dict[str, Any]:
        return {"feature": self.feature, "kind": self.kind, "options": dict(self.options)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Transformation:
        return cls(d["feature"], d["kind"], d.get("options") or {})


def fit_all(transformations: Sequence[Transformation], frame: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Fit each transformation on its column of the training split."""
    return {t.feature: t.fit(frame[t.feature]) for t in transformations}


def apply_all(
    transformations: Sequence[Transformation], params: Mapping[str, Mapping[str, Any]], columns: Mapping[str, Any]
) -> dict[str, Any]:
    """Columns with each transformed column replaced by its outputs (other columns unchanged)."""
    done = {t.feature: t for t in transformations}
    out: dict[str, Any] = {}
    for name, values in columns.items():
        t = done.get(name)
        if t is None:
            out[name] = values
        else:
            if name not in params:
                raise ValueError(f"no fitted parameters for the transformation of {name!r}")
            out.update(t.apply(values, params[name]))
    return out


def _null(v: Any) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v))


def _category(v: Any) -> str:
    """A category's text: 2, 2.0 and np.int64(2) are the same category "2"."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _objects(values: Any) -> list[Any]:
    if isinstance(values, pd.Series):
        return values.tolist()
    return list(values)


def _numbers(values: Any) -> np.ndarray:
    if isinstance(values, np.ndarray) and values.dtype.kind in "fiu":
        return values.astype(np.float64)
    return pd.to_numeric(pd.Series(_objects(values), dtype=object), errors="coerce").to_numpy(np.float64)
