"""Ranker features: one function turns (customer, candidate article, retrieval score) rows into
the model's input, used by ranker training and by the serving ranker alike.

Input columns come straight from the feature groups (customers, customer_history, articles)
plus the retrieval stage's score and rank, so nothing is recomputed differently online.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

RANKER_FEATURES = [
    "retrieval_score",
    "retrieval_rank",
    "age",
    "is_active_member",
    "fn",
    "sales_channel_id",
    "n_purchases",
    "mean_price",
    "price",
    "price_ratio",
    "log_sales_7d",
    "log_sales_total",
    "type_affinity",
    "index_group_affinity",
]


def ranking_features(frame: pd.DataFrame) -> pd.DataFrame:
    """Numeric feature matrix (columns RANKER_FEATURES) for candidate rows."""
    n = frame["n_purchases"].fillna(0).astype("float64")
    mean_price = frame["mean_price"].astype("float64")
    price = frame["price"].astype("float64")
    out = pd.DataFrame(
        {
            "retrieval_score": frame["retrieval_score"].astype("float64"),
            "retrieval_rank": frame["retrieval_rank"].astype("float64"),
            "age": frame["age"].astype("float64"),
            "is_active_member": (frame["club_member_status"] == "ACTIVE").astype("float64"),
            "fn": frame["FN"].fillna(0).astype("float64"),
            "sales_channel_id": frame["sales_channel_id"].astype("float64"),
            "n_purchases": n,
            "mean_price": mean_price,
            "price": price,
            "price_ratio": price / mean_price,
            "log_sales_7d": np.log1p(frame["sales_7d"].fillna(0).astype("float64")),
            "log_sales_total": np.log1p(frame["sales_total"].fillna(0).astype("float64")),
            "type_affinity": _share(frame["type_counts"], frame["product_type_name"], n),
            "index_group_affinity": _share(frame["index_group_counts"], frame["index_group_name"], n),
        }
    )
    return out[RANKER_FEATURES]


def _share(counts: pd.Series, keys: pd.Series, n: pd.Series) -> pd.Series:
    """Fraction of the customer's purchases in the candidate's category (0 with no history)."""
    hits = [
        (c.get(k, 0) if isinstance(c, Mapping) else 0) for c, k in zip(counts.tolist(), keys.tolist(), strict=True)
    ]
    return pd.Series(hits, index=counts.index, dtype="float64") / n.where(n > 0, 1.0)


def candidate_frame(
    customer: Mapping[str, Any] | None,
    history: Mapping[str, Any] | None,
    articles: Sequence[Mapping[str, Any] | None],
    article_ids: Sequence[str],
    scores: Sequence[float],
    sales_channel_id: int,
) -> pd.DataFrame:
    """Candidate rows for one request, from online feature rows (serving path)."""
    cust = customer or {}
    hist = history or {}
    rows = []
    for rank, (aid, art, score) in enumerate(zip(article_ids, articles, scores, strict=True)):
        art = art or {}
        rows.append(
            {
                "article_id": aid,
                "retrieval_score": float(score),
                "retrieval_rank": rank,
                "age": cust.get("age"),
                "club_member_status": cust.get("club_member_status"),
                "FN": cust.get("FN"),
                "sales_channel_id": sales_channel_id,
                "n_purchases": hist.get("n_purchases", 0),
                "mean_price": hist.get("mean_price"),
                "type_counts": hist.get("type_counts") or {},
                "index_group_counts": hist.get("index_group_counts") or {},
                "price": art.get("price"),
                "sales_7d": art.get("sales_7d", 0),
                "sales_total": art.get("sales_total", 0),
                "product_type_name": art.get("product_type_name"),
                "index_group_name": art.get("index_group_name"),
            }
        )
    frame = pd.DataFrame(rows)
    for col in ("age", "FN", "mean_price", "price"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    return frame
