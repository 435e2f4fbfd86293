"""Feature engineering: raw H&M tables -> feature group frames, computed *as of* a time.

One function per feature group. Each takes the raw tables and a cut-off and uses only
transactions strictly before it, so the same code produces point-in-time correct training
features (as of a past cut-off) and the online features served now (as of the end of data).
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd

ARTICLE_CATEGORICALS = [
    "product_type_name",
    "product_group_name",
    "colour_group_name",
    "index_group_name",
    "garment_group_name",
    "department_name",
    "graphical_appearance_name",
]
CUSTOMER_COLUMNS = ["age", "club_member_status", "fashion_news_frequency", "FN", "Active", "postal_code"]
MAX_PURCHASED = 500  # purchases kept per customer online (most recent first); enough for the filter


def before(transactions: pd.DataFrame, as_of: pd.Timestamp | None) -> pd.DataFrame:
    """Transactions strictly before `as_of` (all when None)."""
    if as_of is None:
        return transactions
    return transactions[transactions["t_dat"] < as_of]


def customer_features(customers: pd.DataFrame, regions: pd.DataFrame | None = None) -> pd.DataFrame:
    """The customers group: profile columns plus the region their postal code maps to."""
    out = customers[["customer_id", *CUSTOMER_COLUMNS]].copy()
    if regions is not None and len(regions):
        out = out.merge(regions[["postal_code", "region"]], on="postal_code", how="left")
    else:
        out["region"] = None
    return out.reset_index(drop=True)


def article_features(
    articles: pd.DataFrame,
    transactions: pd.DataFrame,
    as_of: pd.Timestamp | None,
    extras: dict[str, pd.DataFrame] | None = None,
) -> pd.DataFrame:
    """The articles group: attributes, mean sale price and popularity as of the cut-off."""
    tx = before(transactions, as_of)
    end = tx["t_dat"].max() + pd.Timedelta(days=1) if as_of is None and len(tx) else as_of
    out = articles[["article_id", "prod_name", *ARTICLE_CATEGORICALS, "detail_desc"]].copy()
    stats = tx.groupby("article_id").agg(price=("price", "mean"), sales_total=("price", "size"))
    last7 = tx[tx["t_dat"] >= end - pd.Timedelta(days=7)] if end is not None else tx.iloc[:0]
    stats["sales_7d"] = last7.groupby("article_id").size()
    out = out.merge(stats, left_on="article_id", right_index=True, how="left")
    out["sales_total"] = out["sales_total"].fillna(0).astype("int64")
    out["sales_7d"] = out["sales_7d"].fillna(0).astype("int64")
    return _with_extras(out, extras or {}).reset_index(drop=True)


def _with_extras(out: pd.DataFrame, extras: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Stock, age restriction and regional availability, for the filters."""
    stock = extras.get("stock")
    out["stock"] = (
        out["article_id"].map(stock.set_index("article_id")["stock"]) if stock is not None else np.nan
    )
    ages = extras.get("age_restriction")
    out["min_age"] = (
        out["article_id"].map(ages.set_index("article_id")["min_age"]).fillna(0).astype("int64")
        if ages is not None
        else 0
    )
    regions = extras.get("regions")
    if regions is not None:
        by_article = regions.groupby("article_id")["region"].agg(lambda s: sorted(set(s)))
        out["regions"] = out["article_id"].map(by_article)
        out["regions"] = out["regions"].apply(lambda v: v if isinstance(v, list) else [])
    else:
        out["regions"] = None
    return out


def customer_history(
    transactions: pd.DataFrame, articles: pd.DataFrame, as_of: pd.Timestamp | None
) -> pd.DataFrame:
    """The customer_history group: purchases (most recent first) and simple aggregates."""
    tx = before(transactions, as_of).merge(
        articles[["article_id", "product_type_name", "index_group_name"]], on="article_id", how="left"
    )
    tx = tx.sort_values(["customer_id", "t_dat"], kind="stable")
    rows = []
    for cid, g in tx.groupby("customer_id", sort=False):
        ids = g["article_id"].tolist()[::-1][:MAX_PURCHASED]
        rows.append(
            {
                "customer_id": cid,
                "purchased": ids,
                "n_purchases": len(g),
                "mean_price": float(g["price"].mean()),
                "type_counts": dict(Counter(g["product_type_name"].dropna())),
                "index_group_counts": dict(Counter(g["index_group_name"].dropna())),
                "last_purchase": g["t_dat"].iloc[-1].strftime("%Y-%m-%d"),
            }
        )
    return pd.DataFrame(
        rows,
        columns=["customer_id", "purchased", "n_purchases", "mean_price", "type_counts",
                 "index_group_counts", "last_purchase"],
    )


def histories_before(transactions: pd.DataFrame, history_len: int) -> pd.Series:
    """For every transaction, the customer's purchases on earlier days, most recent first.

    Same-day purchases (one basket) are excluded, so a row never sees its own basket:
    this is the point-in-time rule for the history feature. Returned in the input's order.
    """
    order = np.lexsort((transactions["t_dat"].to_numpy(), transactions["customer_id"].to_numpy()))
    tx = transactions.iloc[order]
    cust = tx["customer_id"].to_numpy()
    days = tx["t_dat"].to_numpy()
    arts = tx["article_id"].to_numpy()
    out: list[list[str]] = [[] for _ in range(len(tx))]
    starts = np.flatnonzero(np.r_[True, cust[1:] != cust[:-1]])
    ends = np.r_[starts[1:], len(tx)]
    for s, e in zip(starts, ends, strict=True):
        # index of the first purchase of each row's day within the customer's sequence
        first_of_day = s + np.searchsorted(days[s:e], days[s:e], side="left")
        for i in range(s, e):
            lo = max(s, first_of_day[i - s] - history_len)
            out[i] = arts[lo : first_of_day[i - s]][::-1].tolist()
    result = pd.Series(out, index=tx.index, dtype=object)
    return result.loc[transactions.index]
