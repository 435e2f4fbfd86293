"""The point-in-time join: for each label row, the latest feature row of its key that is not
later than the label.

Rule: a feature row is visible to a label row when its event time is <= the label's event time
(equal times are visible: a feature computed at the instant of the label counts as known then).
Among rows of one key with the same event time, the one inserted last wins (higher commit, then
later row in the insert); an insert's arrival time plays no other role, so a late-arriving row
(inserted after newer rows, with an older event time) joins exactly the labels it precedes in
event time. A key without a visible row gets nulls; the label row is kept.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from feature_store.offline import COMMIT_COLUMN, ROW_COLUMN, TIME_UNIT


def point_in_time_join(
    spine: pd.DataFrame,
    spine_time: str,
    on: str,
    right: pd.DataFrame,
    right_key: str,
    right_time: str,
    columns: Mapping[str, str],
) -> pd.DataFrame:
    """Feature columns for each spine row, aligned with `spine` (same length and order).

    Args:
        spine: label rows; `spine[on]` holds the key, `spine[spine_time]` the label time.
        right: feature rows with `right_key`, `right_time` and the `_commit`/`_row` columns.
        columns: feature column of `right` -> output column name.
    """
    n = len(spine)
    left = pd.DataFrame({
        "_key": spine[on].to_numpy(dtype=object),
        "_t": spine[spine_time].astype(TIME_UNIT).to_numpy(),
        "_pos": np.arange(n),
    })
    if right.empty or n == 0:
        return pd.DataFrame({out: pd.Series([None] * n, dtype=object) for out in columns.values()})
    r = right[[right_key, right_time, COMMIT_COLUMN, ROW_COLUMN, *columns]].copy()
    r = r.sort_values([right_time, COMMIT_COLUMN, ROW_COLUMN], kind="stable")
    r = r.drop_duplicates(subset=[right_key, right_time], keep="last")
    r = pd.DataFrame({
        "_key": r[right_key].to_numpy(dtype=object),
        "_rt": r[right_time].astype(TIME_UNIT).to_numpy(),
        **{out: r[col].to_numpy(dtype=object) for col, out in columns.items()},
    })
    left = left.sort_values(["_t", "_pos"], kind="stable")
    # merge_asof cannot match a null key; such rows simply get no features
    has_key = left["_key"].notna().to_numpy()
    merged = pd.merge_asof(
        left[has_key], r, left_on="_t", right_on="_rt", by="_key", direction="backward", allow_exact_matches=True
    )
    out = pd.DataFrame({c: pd.Series([None] * n, dtype=object) for c in columns.values()})
    pos = merged["_pos"].to_numpy()
    for c in columns.values():
        values = merged[c].to_numpy(dtype=object).copy()
        values[pd.isna(merged["_rt"]).to_numpy()] = None
        col = out[c].to_numpy(dtype=object).copy()
        col[pos] = values
        out[c] = col
    return out
