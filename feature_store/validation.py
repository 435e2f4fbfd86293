"""Validation of a frame against a feature group before it is inserted.

Checked on every insert: each feature's type (and the bound of strings, lists and json), the
primary key and the event time present and not null, and the group's expectations (not_null,
range, allowed values, max_length). The report names, per failed rule, the feature, the rule,
the number of failing rows and a few examples (row position and value).

Policies:
- "strict": any failure rejects the whole batch (`ValidationFailed`); nothing is written anywhere.
- "always": the batch is written and the report returned. Values that cannot be stored in their
  type are written as null; rows without a key or an event time, or whose key the online table
  cannot hold (too long, or ending with a space), cannot be stored and are dropped (both counted
  in the report).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from feature_store.offline import parse_times
from feature_store.online.base import MAX_KEY_CHARS, encode_json
from feature_store.schema import Expectation, Feature, FeatureGroup

POLICIES = ("strict", "always")
MAX_EXAMPLES = 5


@dataclass
class RuleFailure:
    feature: str
    rule: str
    failing_rows: int
    examples: list[dict[str, Any]]

    def line(self) -> str:
        ex = ", ".join(f"row {e['row']}: {e['value']!r}" for e in self.examples)
        return f"{self.feature}: {self.rule}: {self.failing_rows} failing rows (e.g. {ex})"


@dataclass
class ValidationReport:
    group: str
    rows: int
    policy: str
    failures: list[RuleFailure] = field(default_factory=list)
    dropped_rows: int = 0  # rows without a storable key or an event time (policy "always")
    nulled_values: int = 0  # values of the wrong type written as null (policy "always")

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary_lines(self) -> list[str]:
        if self.ok:
            return [f"{self.group}: {self.rows} rows passed validation"]
        head = f"{self.group}: {len(self.failures)} rules failed on {self.rows} rows (policy {self.policy})"
        tail = []
        if self.dropped_rows:
            tail.append(f"{self.dropped_rows} rows dropped (no storable key or no event time)")
        if self.nulled_values:
            tail.append(f"{self.nulled_values} values of the wrong type written as null")
        return [head, *(f"  {f.line()}" for f in self.failures), *(f"  {t}" for t in tail)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "rows": self.rows,
            "policy": self.policy,
            "ok": self.ok,
            "dropped_rows": self.dropped_rows,
            "nulled_values": self.nulled_values,
            "failures": [
                {"feature": f.feature, "rule": f.rule, "failing_rows": f.failing_rows,
                 "examples": [{"row": e["row"], "value": _jsonable(e["value"])} for e in f.examples]}
                for f in self.failures
            ],
        }


class ValidationFailed(ValueError):
    """A strict insert was rejected: nothing was written. `report` says why."""

    def __init__(self, report: ValidationReport):
        self.report = report
        super().__init__("validation failed, nothing written:\n" + "\n".join(report.summary_lines()))


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"unknown validation policy {policy!r}; expected one of {POLICIES}")
    return policy


def validate(group: FeatureGroup, frame: pd.DataFrame, policy: str = "strict") -> tuple[ValidationReport, pd.DataFrame]:
    """Check `frame` (columns in frame spelling, plus the event-time column) against `group`.

    Returns:
        The report and the frame to write: for "always", with wrong-typed values set to None
        and rows without key or event time dropped; for "strict", the frame unchanged.
    Raises:
        ValueError: a column of the group is missing from the frame (nothing can be checked).
    """
    check_policy(policy)
    missing = [c for c in [*group.columns, group.event_time] if c not in frame.columns]
    if missing:
        raise ValueError(f"feature group {group.name!r}: frame lacks columns {missing}")
    frame = frame.reset_index(drop=True)
    report = ValidationReport(group.name, len(frame), policy)
    bad_type: dict[str, np.ndarray] = {}
    for f in group.features:
        mask = type_failures(f, frame[f.column])
        if mask.any():
            _add(report, f.column, f"type {f.dtype}" + (f" (limit {f.limit})" if f.limit else ""), frame[f.column], mask)
            bad_type[f.column] = mask
    drop = np.zeros(len(frame), dtype=bool)
    key = frame[group.key]
    key_null = _isna(key)
    if key_null.any():
        _add(report, group.key, "not_null (primary key)", key, key_null)
        drop |= key_null
    key_bad_type = bad_type.get(group.key, np.zeros(len(frame), dtype=bool))
    drop |= key_bad_type  # a key that is not of its type cannot be stored either
    if group.online and group.key_feature.dtype == "string":
        unstorable = online_key_failures(key) & ~key_null & ~key_bad_type
        if unstorable.any():
            _add(report, group.key, f"online key (at most {MAX_KEY_CHARS} characters, no trailing space)",
                 key, unstorable)
            drop |= unstorable
    try:
        times = parse_times(frame[group.event_time], errors="coerce")
    except (TypeError, ValueError):
        times = pd.Series([pd.NaT] * len(frame))
    time_bad = times.isna().to_numpy()
    if time_bad.any():
        _add(report, group.event_time, "not_null timestamp (event time)", frame[group.event_time], time_bad)
        drop |= time_bad
    for e in group.expectations:
        col = group.feature(e.feature).column
        mask = expectation_failures(e, frame[col])
        if col in bad_type:
            mask = mask & ~bad_type[col]  # (not in place: pandas may hand out a read-only mask)
        if mask.any():
            _add(report, col, e.describe(), frame[col], mask)
    if policy == "strict" or report.ok:
        return report, frame
    out = frame.copy()
    for col, mask in bad_type.items():
        report.nulled_values += int((mask & ~drop).sum())
        out[col] = out[col].astype(object).where(~mask, None)
    report.dropped_rows = int(drop.sum())
    return report, out[~drop].reset_index(drop=True)


def _add(report: ValidationReport, feature: str, rule: str, values: pd.Series, mask: np.ndarray) -> None:
    rows = np.flatnonzero(mask)
    examples = [{"row": int(i), "value": values.iloc[i]} for i in rows[:MAX_EXAMPLES]]
    report.failures.append(RuleFailure(feature, rule, int(len(rows)), examples))


def _isna(s: pd.Series) -> np.ndarray:
    return s.isna().to_numpy()  # None, NaN, NaT and pd.NA alike (lists and dicts are values)


def _is_null(v: Any) -> bool:
    return v is None or v is pd.NA or v is pd.NaT or (isinstance(v, float) and math.isnan(v))


def type_failures(f: Feature, s: pd.Series) -> np.ndarray:
    """Rows whose non-null value does not fit the feature's type or bound."""
    n = len(s)
    nulls = _isna(s)
    if nulls.all():
        return np.zeros(n, dtype=bool)
    if f.dtype in ("int64", "float64", "bool"):
        if f.dtype == "bool":
            if pd.api.types.is_bool_dtype(s.dtype):
                return np.zeros(n, dtype=bool)
            ok = [isinstance(v, bool | np.bool_) for v in s]
            return ~np.array(ok, dtype=bool) & ~nulls
        if pd.api.types.is_bool_dtype(s.dtype):
            return ~nulls
        if pd.api.types.is_unsigned_integer_dtype(s.dtype):  # uint64 holds values int64 cannot
            return (s.to_numpy(dtype=np.uint64, na_value=0) >= np.uint64(2**63)) & ~nulls
        if pd.api.types.is_integer_dtype(s.dtype):
            return np.zeros(n, dtype=bool)
        if pd.api.types.is_float_dtype(s.dtype):
            v = s.to_numpy(dtype=np.float64, na_value=np.nan)
            with np.errstate(invalid="ignore"):
                bad = np.isinf(v)
                if f.dtype == "int64":
                    bad |= (np.floor(v) != v) | (np.abs(v) >= 2.0**63)
            return bad & ~nulls
        return np.array([not nl and not _fits_number(f.dtype, v) for v, nl in zip(s, nulls, strict=True)], dtype=bool)
    if f.dtype == "string":
        if pd.api.types.infer_dtype(s, skipna=True) in ("string", "empty"):
            lengths = s.str.len().to_numpy(dtype=np.float64, na_value=0)
            bad = (lengths > (f.limit or math.inf)) & ~nulls
            if not _encodable("".join(s[~nulls])):  # one check for all; row by row only when one fails
                bad |= np.array([not nl and not _encodable(v) for v, nl in zip(s, nulls, strict=True)], dtype=bool)
            return bad
        return np.array([not nl and not (isinstance(v, str) and len(v) <= (f.limit or math.inf) and _encodable(v))
                         for v, nl in zip(s, nulls, strict=True)], dtype=bool)
    if f.dtype.startswith("list_"):
        return np.array([not nl and not _fits_list(f, v) for v, nl in zip(s, nulls, strict=True)], dtype=bool)
    # json
    return np.array([not nl and not _fits_json(f, v) for v, nl in zip(s, nulls, strict=True)], dtype=bool)


def online_key_failures(keys: pd.Series) -> np.ndarray:
    """String keys an online table cannot hold apart from others: longer than its key column,
    or ending with a space, which MySQL-protocol servers compare as the key without it."""
    try:
        text = keys.str
    except AttributeError:  # no strings at all (the type check reports those)
        return np.zeros(len(keys), dtype=bool)
    too_long = (text.len() > MAX_KEY_CHARS).to_numpy(dtype=bool, na_value=False)
    return too_long | text.endswith(" ", na=False).to_numpy(dtype=bool, na_value=False)


def _encodable(v: str) -> bool:
    """Whether `v` is valid Unicode (no lone surrogate), which UTF-8 files and tables need."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _fits_number(dtype: str, v: Any) -> bool:
    if isinstance(v, bool | np.bool_) or not isinstance(v, numbers.Real):
        return False
    if dtype == "int64" and isinstance(v, numbers.Integral):  # exactly: float() rounds 2**63 - 1 up
        return -(2**63) <= int(v) < 2**63
    x = float(v)
    if math.isinf(x):
        return False
    return dtype == "float64" or (x.is_integer() and abs(x) < 2.0**63)


def _fits_list(f: Feature, v: Any) -> bool:
    tolist = getattr(v, "tolist", None)
    if callable(tolist) and not isinstance(v, str):
        v = tolist()
    if not isinstance(v, list | tuple) or (f.limit is not None and len(v) > f.limit):
        return False
    if f.dtype == "list_string":
        return all(isinstance(x, str) and len(x) <= 255 and _encodable(x) for x in v)
    return all(not _is_null(x) and _fits_number("int64" if f.dtype == "list_int64" else "float64", x) for x in v)


def _fits_json(f: Feature, v: Any) -> bool:
    try:
        text = encode_json(v)
    except (TypeError, ValueError):
        return False
    return f.limit is None or len(text.encode("utf-8")) <= f.limit


def expectation_failures(e: Expectation, s: pd.Series) -> np.ndarray:
    nulls = _isna(s)
    if e.rule == "not_null":
        return nulls
    if e.rule == "range":
        v = pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        bad = np.zeros(len(s), dtype=bool)
        with np.errstate(invalid="ignore"):
            if e.min is not None:
                bad |= v < e.min
            if e.max is not None:
                bad |= v > e.max
        return bad & ~nulls
    if e.rule == "allowed":
        allowed_values = set(e.values or ())
        try:
            return ~s.isin(list(allowed_values)).to_numpy() & ~nulls
        except TypeError:  # unhashable values (lists): one by one
            return np.array([not nl and _unhashable_or_not_in(v, allowed_values)
                             for v, nl in zip(s, nulls, strict=True)], dtype=bool)
    # max_length
    def length(v: Any) -> int:
        try:
            return len(v)
        except TypeError:
            return 0

    return np.array([not nl and length(v) > (e.max or 0) for v, nl in zip(s, nulls, strict=True)], dtype=bool)


def _unhashable_or_not_in(v: Any, values: set[Any]) -> bool:
    try:
        return v not in values
    except TypeError:
        return True


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, str | int | float | bool) or v is None:
        return v
    if isinstance(v, list | tuple | np.ndarray):
        return [_jsonable(x) for x in list(v)]
    return repr(v)


def failing_features(report: ValidationReport) -> Sequence[str]:
    return sorted({f.feature for f in report.failures})
