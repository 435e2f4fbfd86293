"""Ranker features: the one vectorisation path for training, evaluation, batch and serving.

Input is what the online store returns for one request: the customer's `customers` and
`customer_history` rows, one `articles` row per candidate (None when unknown), the retrieval
scores in retrieval order, the request context (sales channel, date) and the product types of
the customer's most recent purchases. Training builds the same rows from the offline feature
group frames (`offline_rows`: the exact conversion the online write uses), as of each cut-off,
so the vector of (customer, article, time) is computed by the same code from the same values.

Output: a `FeatureBlock` (float32 numeric matrix + string categorical matrix) in the column
order `NUMERIC_FEATURES` + `CATEGORICAL_FEATURES`, fed to CatBoost with native categoricals.
"""
from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

Row = Mapping[str, Any]

NUMERIC_FEATURES = [
    "retrieval_score",  # cosine similarity of query and item vectors
    "retrieval_rank",  # position among the (filtered) candidates, 0 = best
    "score_gap",  # best candidate's score minus this one's
    "age",
    "sales_channel_id",  # request context
    "n_purchases",
    "mean_price",
    "days_since_last_purchase",  # as of the request date
    "price",
    "price_ratio",  # article price / the customer's mean price
    "log_sales_7d",
    "log_sales_total",
    "sales_trend",  # the article's sales of the last 7 days minus the 7 days before (articles group)
    "sales_7d_share",  # share of the article's sales that fell in the last 7 days
    "type_share",  # share of the customer's purchases in the article's product type
    "index_group_share",  # ... in the article's index group
    "purchases_since_type",  # purchases since the customer last bought this type (window if never)
    "repurchase",  # 1 when the customer bought this very article before
]
CATEGORICAL_FEATURES = [
    "product_type_name",
    "index_group_name",
    "garment_group_name",
    "colour_group_name",
    "club_member_status",
]
FEATURES = NUMERIC_FEATURES + CATEGORICAL_FEATURES
MISSING_CATEGORY = "NA"

# What vectorisation reads from each online feature group (filters may read more).
CUSTOMER_COLUMNS = ("age", "club_member_status")
HISTORY_COLUMNS = ("purchased", "n_purchases", "mean_price", "type_counts", "index_group_counts", "last_purchase")
ARTICLE_COLUMNS = ("price", "sales_7d", "sales_total", "sales_trend", "product_type_name", "index_group_name",
                   "garment_group_name", "colour_group_name")


@dataclass
class FeatureBlock:
    """Feature rows for candidates: numeric (float32, NaN = missing) and categorical (str)."""

    num: np.ndarray  # (n, len(NUMERIC_FEATURES)) float32
    cat: np.ndarray  # (n, len(CATEGORICAL_FEATURES)) object (str)

    def __len__(self) -> int:
        return self.num.shape[0]

    def to_frame(self) -> pd.DataFrame:
        """Named columns, for reports and tests."""
        out = pd.DataFrame(self.num.astype(np.float64), columns=NUMERIC_FEATURES)
        for j, c in enumerate(CATEGORICAL_FEATURES):
            out[c] = self.cat[:, j]
        return out

    def take(self, idx: Sequence[int] | np.ndarray) -> FeatureBlock:
        idx = np.asarray(idx, dtype=np.int64)
        return FeatureBlock(self.num[idx], self.cat[idx])

    @staticmethod
    def concat(blocks: Sequence[FeatureBlock]) -> FeatureBlock:
        if not blocks:
            return empty_block()
        return FeatureBlock(np.concatenate([b.num for b in blocks]), np.concatenate([b.cat for b in blocks]))


def empty_block(n: int = 0) -> FeatureBlock:
    return FeatureBlock(np.zeros((n, len(NUMERIC_FEATURES)), np.float32),
                        np.full((n, len(CATEGORICAL_FEATURES)), MISSING_CATEGORY, dtype=object))


def recent_types(history: Row | None, articles_by_id: Mapping[str, Row | None], window: int) -> list[str | None]:
    """Product types of the customer's `window` most recent purchases, most recent first."""
    purchased = (history or {}).get("purchased") or []
    return [(articles_by_id.get(a) or {}).get("product_type_name") for a in purchased[:window]]


def history_article_ids(history: Row | None, window: int) -> list[str]:
    """The purchases whose article rows `recent_types` needs (read with the candidates)."""
    return list(((history or {}).get("purchased") or [])[:window])


def vectorise(
    customer: Row | None,
    history: Row | None,
    articles: Sequence[Row | None],
    scores: Sequence[float] | np.ndarray,
    *,
    article_ids: Sequence[str],
    channel: int,
    now: dt.date,
    recent: Sequence[str | None],
    window: int,
) -> FeatureBlock:
    """Feature rows for one customer's candidates, given in retrieval order (best first).

    Args:
        customer, history: the customer's rows of the customers / customer_history groups.
        articles: one articles-group row per candidate (None when the article is unknown).
        scores: retrieval scores, best first; their order defines `retrieval_rank`.
        article_ids: the candidates' ids (for the repurchase flag).
        channel, now: request context (sales channel, the day the list is for).
        recent: product types of the customer's most recent purchases (see `recent_types`).
        window: the look-back of `purchases_since_type` (its value when the type is not in `recent`).
    """
    n = len(articles)
    if not (n == len(article_ids) == len(scores)):
        raise ValueError(f"{n} article rows, {len(article_ids)} ids and {len(scores)} scores: lengths differ")
    cust = customer or {}
    hist = history or {}
    arts = [a or {} for a in articles]
    score = np.asarray(scores, dtype=np.float64)
    n_purchases = float(hist.get("n_purchases") or 0)
    mean_price = _num(hist.get("mean_price"))
    type_counts = hist.get("type_counts") or {}
    group_counts = hist.get("index_group_counts") or {}
    last = hist.get("last_purchase")
    days_since = float((now - dt.date.fromisoformat(last)).days) if last else math.nan
    bought = set(hist.get("purchased") or [])
    first_seen: dict[str, int] = {}
    for pos, t in enumerate(recent[:window]):
        if t is not None:
            first_seen.setdefault(t, pos)
    denom = n_purchases if n_purchases > 0 else 1.0

    price = np.array([_num(a.get("price")) for a in arts], dtype=np.float64)
    sales_7d = np.array([float(a.get("sales_7d") or 0) for a in arts])
    sales_total = np.array([float(a.get("sales_total") or 0) for a in arts])
    trend = np.array([_num(a.get("sales_trend")) for a in arts], dtype=np.float64)
    ptype = [a.get("product_type_name") for a in arts]
    igroup = [a.get("index_group_name") for a in arts]

    num = np.empty((n, len(NUMERIC_FEATURES)), dtype=np.float64)
    num[:, 0] = score
    num[:, 1] = np.arange(n)
    num[:, 2] = (score[0] - score) if n else score
    num[:, 3] = _num(cust.get("age"))
    num[:, 4] = float(channel)
    num[:, 5] = n_purchases
    num[:, 6] = mean_price
    num[:, 7] = days_since
    num[:, 8] = price
    num[:, 9] = price / mean_price if mean_price > 0 else math.nan
    num[:, 10] = np.log1p(sales_7d)
    num[:, 11] = np.log1p(sales_total)
    num[:, 12] = trend
    num[:, 13] = sales_7d / np.maximum(sales_total, 1.0)
    num[:, 14] = [type_counts.get(t, 0) / denom if t is not None else 0.0 for t in ptype]
    num[:, 15] = [group_counts.get(g, 0) / denom if g is not None else 0.0 for g in igroup]
    num[:, 16] = [first_seen.get(t, window) if t is not None else window for t in ptype]
    num[:, 17] = [1.0 if a in bought else 0.0 for a in article_ids]

    cat = np.empty((n, len(CATEGORICAL_FEATURES)), dtype=object)
    for j, col in enumerate(CATEGORICAL_FEATURES[:-1]):
        cat[:, j] = [_cat(a.get(col)) for a in arts]
    cat[:, -1] = _cat(cust.get("club_member_status"))
    return FeatureBlock(num.astype(np.float32), cat)


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


def _cat(v: Any) -> str:
    return MISSING_CATEGORY if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def offline_rows(group: str, frame: pd.DataFrame, keys: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Key -> row of an offline feature-group frame, converted exactly as the online write
    converts it (NaN -> None, numpy -> Python), so offline and online vectors are equal."""
    from feature_store.groups import GROUPS
    from feature_store.store import to_online_rows

    spec = GROUPS[group]
    if keys is not None:
        frame = frame[frame[spec.key].isin(set(keys))]
    return {r[spec.key]: r for r in to_online_rows(spec, frame)}
