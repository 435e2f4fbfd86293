"""On-demand features: functions of request parameters (or of stored features), computed by the
same code in training and serving.

Each function takes numpy-compatible inputs of one length (arrays, lists or pandas Series) and
returns a numpy array of that length: a training frame passes whole columns, serving passes the
request's values. Functions are registered by name in `ON_DEMAND_FUNCTIONS` so a feature view
stores which one it uses as plain text.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from feature_store.schema import check_name

AGE_GROUP_BINS = (18, 25, 35, 45, 55, 65)  # upper bounds (inclusive) of each group but the last
AGE_GROUPS = ("0-18", "19-25", "26-35", "36-45", "46-55", "56-65", "66+")
POSTAL_BUCKETS = 100


def age_group(age: Any) -> np.ndarray:
    """H&M age bins 0-18, 19-25, 26-35, 36-45, 46-55, 56-65, 66+ (None for a missing or negative age).

    A fractional age belongs to the group of its whole years (25.9 -> "19-25")."""
    a = pd.to_numeric(pd.Series(np.asarray(age, dtype=object).ravel()), errors="coerce").to_numpy(np.float64)
    years = np.floor(a)
    idx = np.searchsorted(np.array(AGE_GROUP_BINS, dtype=np.float64), years, side="left")
    out = np.array(AGE_GROUPS, dtype=object)[np.minimum(idx, len(AGE_GROUPS) - 1)]
    out[np.isnan(a) | (a < 0)] = None
    return out


def _months(date: Any) -> np.ndarray:
    d = pd.to_datetime(pd.Series(np.asarray(date, dtype=object).ravel()), errors="coerce")
    return d.dt.month.to_numpy(dtype=np.float64, na_value=np.nan)


def month_sin(date: Any) -> np.ndarray:
    """sin(2 pi (month - 1) / 12) of the date (NaN for a missing date)."""
    return np.sin(2 * np.pi * (_months(date) - 1) / 12)


def month_cos(date: Any) -> np.ndarray:
    """cos(2 pi (month - 1) / 12) of the date (NaN for a missing date)."""
    return np.cos(2 * np.pi * (_months(date) - 1) / 12)


def postal_bucket(code: Any, buckets: int = POSTAL_BUCKETS) -> np.ndarray:
    """A stable hash bucket (0..buckets-1) of a postal code (None when missing); stable across
    processes and machines, unlike Python's hash()."""
    values = np.asarray(code, dtype=object).ravel()
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA:
            out[i] = None
        else:
            out[i] = int.from_bytes(hashlib.blake2b(str(v).encode(), digest_size=8).digest(), "little") % buckets
    return out


def days_on_sale(first_seen: Any, sales_day: Any) -> np.ndarray:
    """Days from an article's first sale to the end of its sales window (`sales_day` + 1), from the
    articles group's dates (kept current by sales events): 0 when it has not sold yet, NaN when
    `sales_day` is unknown."""
    first = pd.to_datetime(pd.Series(np.asarray(first_seen, dtype=object).ravel()), errors="coerce")
    day = pd.to_datetime(pd.Series(np.asarray(sales_day, dtype=object).ravel()), errors="coerce")
    days = (day - first).dt.days.to_numpy(dtype=np.float64, na_value=np.nan) + 1.0
    days[first.isna().to_numpy() & day.notna().to_numpy()] = 0.0
    return days


ON_DEMAND_FUNCTIONS: dict[str, Callable[..., np.ndarray]] = {
    "days_on_sale": days_on_sale,
    "age_group": age_group,
    "month_sin": month_sin,
    "month_cos": month_cos,
    "postal_bucket": postal_bucket,
}


@dataclass(frozen=True)
class OnDemandFeature:
    """`name` = ON_DEMAND_FUNCTIONS[function](*inputs); each input names a request parameter or
    a feature of the view. In training, request parameters come from label-group columns (the
    view's `request_from_label`)."""

    name: str
    function: str
    inputs: tuple[str, ...]

    def __post_init__(self) -> None:
        check_name(self.name, "on-demand feature name")
        if self.function not in ON_DEMAND_FUNCTIONS:
            raise ValueError(
                f"on-demand feature {self.name!r}: unknown function {self.function!r}; "
                f"one of {sorted(ON_DEMAND_FUNCTIONS)}"
            )
        object.__setattr__(self, "inputs", tuple(self.inputs))

    def compute(self, values: Mapping[str, Any]) -> np.ndarray:
        return ON_DEMAND_FUNCTIONS[self.function](*(values[i] for i in self.inputs))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "function": self.function, "inputs": list(self.inputs)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OnDemandFeature:
        return cls(d["name"], d["function"], tuple(d["inputs"]))
