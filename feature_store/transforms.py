"""Feature engineering: raw tables -> feature group frames, computed *as of* a time.

One function per feature group. Each takes the raw tables and a cut-off and uses only
transactions strictly before it, so the same code produces point-in-time correct training
features (as of a past cut-off) and the online features served now (as of the end of data).
The raw tables are H&M's or a dataset config's canonical ones (`feature_store.dataset`);
`roles` None means H&M, whose attributes, age groups, regions and index-group shares are
derived here; a dataset config's declared columns are carried as they are.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from feature_store.groups import (
    ARTICLE_INT_ATTRIBUTES,
    ARTICLE_NAME_ATTRIBUTES,
    INDEX_GROUPS,
    SALES_DAYS,
    recent_purchases,
    recent_type_days,
)
from feature_store.on_demand import age_group, postal_bucket

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


def before(transactions: pd.DataFrame, as_of: pd.Timestamp | None) -> pd.DataFrame:
    """Transactions strictly before `as_of` (all when None)."""
    if as_of is None:
        return transactions
    return transactions[transactions["t_dat"] < as_of]


def customer_features(customers: pd.DataFrame, regions: pd.DataFrame | None = None, roles: Any = None
                      ) -> pd.DataFrame:
    """The customers group: profile columns, age group, postal-code bucket and the region the
    postal code maps to (a dataset config: its declared customer columns)."""
    if roles is not None and not roles.is_hm:
        return customers[["customer_id", *roles.user_categorical, *roles.user_numeric]].reset_index(drop=True)
    out = customers[["customer_id", *CUSTOMER_COLUMNS]].copy()
    out["age_group"] = age_group(out["age"])
    out["postal_bucket"] = postal_bucket(out["postal_code"])
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
    roles: Any = None,
) -> pd.DataFrame:
    """The articles group as of the cut-off: every attribute, the sales aggregates and stock.

    Sales windows end at the cut-off (exclusive; the day after the last transaction when
    `as_of` is None): `daily_sales[i]` counts the sales of day `sales_day - i`, sales_7d and
    sales_30d sum its first 7 and 30 days, sales_trend is the last 7 days minus the 7 before.
    Attributes missing from `articles` are filled with None. Without stock / age / region
    tables (every dataset config) those columns are null: the business rules let them pass.
    """
    tx = before(transactions, as_of)
    end = tx["t_dat"].max().normalize() + pd.Timedelta(days=1) if as_of is None and len(tx) else as_of
    attrs = article_attributes(roles)
    out = articles[["article_id", *[c for c in attrs if c in articles.columns]]].copy()
    for c in attrs:
        if c not in out.columns:
            out[c] = None
    stats = tx.groupby("article_id").agg(price=("price", "mean"), sales_total=("price", "size"),
                                         first_seen=("t_dat", "min"))
    out = out.merge(stats, left_on="article_id", right_index=True, how="left")
    out["sales_total"] = out["sales_total"].fillna(0).astype("int64")
    out["first_seen"] = [None if pd.isna(t) else t.strftime("%Y-%m-%d") for t in out["first_seen"]]
    daily = _daily_sales(tx, out["article_id"], end)
    out["sales_day"] = None if end is None else (pd.Timestamp(end).normalize() - pd.Timedelta(days=1)).strftime("%Y-%m-%d")
    out["daily_sales"] = [row.tolist() for row in daily]
    out["sales_7d"] = daily[:, :7].sum(axis=1).astype("int64")
    out["sales_30d"] = daily.sum(axis=1).astype("int64")
    out["sales_trend"] = (daily[:, :7].sum(axis=1) - daily[:, 7:14].sum(axis=1)).astype("int64")
    return _with_extras(out, extras or {}).reset_index(drop=True)


ACTIVITY_COLUMNS = ["sales_7d", "first_seen", "sales_day"]
SNAPSHOT_DAYS = 7  # training rows see article activity as of the start of their week (see snapshot_times)


def snapshot_times(days: pd.Series, period: int = SNAPSHOT_DAYS) -> pd.Series:
    """The time each purchase's article activity is taken at: the start of its `period`-day block,
    blocks counted back from the day after the last one.

    A purchase then sees activity 0 to `period - 1` days old, as a week of recommendations served
    from features (and an index) computed at its start does: the last block is a held-out week's twin.
    """
    day = days.dt.normalize()
    end = day.max() + pd.Timedelta(days=1)
    blocks = np.ceil((end - day).dt.days.to_numpy() / period).astype(np.int64)
    return pd.Series(end - pd.to_timedelta(blocks * period, unit="D"), index=days.index)


def backfill_times(transactions: pd.DataFrame, weeks: int, period: int = SNAPSHOT_DAYS) -> list[pd.Timestamp]:
    """The as-of times of a snapshot backfill: the starts of the data's last `weeks` blocks of
    `snapshot_times`, oldest first."""
    if weeks < 0:
        raise ValueError(f"backfill weeks must be >= 0, got {weeks}")
    if not weeks or not len(transactions):
        return []
    end = transactions["t_dat"].max().normalize() + pd.Timedelta(days=1)
    return [end - pd.Timedelta(days=period * w) for w in range(weeks, 0, -1)]


def article_activity(transactions: pd.DataFrame, article_ids: pd.Series | np.ndarray,
                     as_of: pd.Series | np.ndarray) -> pd.DataFrame:
    """Per (article_ids[i], as_of[i]): `sales_7d`, `first_seen` and `sales_day` exactly as
    `article_features` computes them as of that time (transactions strictly before it).

    The point-in-time twin of the articles group's sales columns: one row per training example
    instead of one cut-off for the whole catalogue. Memory is linear in the transactions.
    """
    tx_day = transactions["t_dat"].dt.normalize().to_numpy("datetime64[D]").astype(np.int64)
    ids = pd.Index(pd.unique(transactions["article_id"]))
    tx_art = ids.get_indexer(transactions["article_id"])
    order = np.lexsort((tx_day, tx_art))
    span = int(tx_day.max() - tx_day.min() + 400) if len(tx_day) else 1  # > any day offset
    base = int(tx_day.min()) - 200 if len(tx_day) else 0
    keys = tx_art[order].astype(np.int64) * span + (tx_day[order] - base)
    q_art = ids.get_indexer(np.asarray(article_ids, dtype=object))
    q_day = pd.to_datetime(pd.Series(np.asarray(as_of))).dt.normalize().to_numpy("datetime64[D]").astype(np.int64)
    q_off = np.clip(q_day - base, 0, span - 1)
    q_key = np.maximum(q_art, 0).astype(np.int64) * span
    upto = np.searchsorted(keys, q_key + q_off, side="left")  # sales strictly before as_of
    week = np.searchsorted(keys, q_key + np.maximum(q_off - 7, 0), side="left")
    first = np.searchsorted(keys, q_key, side="left")
    known = (q_art >= 0) & (upto > first)
    first_day = keys[np.minimum(first, len(keys) - 1)] - q_key + base if len(keys) else q_day
    first_seen = np.asarray(pd.to_datetime(first_day, unit="D").strftime("%Y-%m-%d"), dtype=object)
    first_seen[~known] = None
    return pd.DataFrame({
        "sales_7d": np.where(q_art >= 0, upto - week, 0).astype("int64"),
        "first_seen": pd.Series(first_seen, dtype=object),
        "sales_day": pd.to_datetime(q_day - 1, unit="D").strftime("%Y-%m-%d"),
    })


def with_activity(articles: pd.DataFrame, transactions: pd.DataFrame, as_of: pd.Timestamp) -> pd.DataFrame:
    """`articles` with its ACTIVITY_COLUMNS recomputed as of `as_of` (e.g. a catalogue for validation)."""
    out = articles.copy()
    activity = article_activity(transactions, out["article_id"], np.full(len(out), pd.Timestamp(as_of)))
    for col in ACTIVITY_COLUMNS:
        out[col] = activity[col].to_numpy()
    return out


def _daily_sales(tx: pd.DataFrame, article_ids: pd.Series, end: pd.Timestamp | None) -> np.ndarray:
    """[n_articles, SALES_DAYS] sales counts, column i = the day `end - 1 - i` days."""
    out = np.zeros((len(article_ids), SALES_DAYS), dtype=np.int64)
    if end is None or not len(tx):
        return out
    last_day = pd.Timestamp(end).normalize() - pd.Timedelta(days=1)
    ago = (last_day - tx["t_dat"].dt.normalize()).dt.days.to_numpy()
    keep = (ago >= 0) & (ago < SALES_DAYS)
    pos = pd.Index(article_ids).get_indexer(tx["article_id"].to_numpy()[keep])
    found = pos >= 0
    np.add.at(out, (pos[found], ago[keep][found]), 1)
    return out


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
    out["in_stock"] = [None if pd.isna(v) else bool(v > 0) for v in out["stock"]]
    regions = extras.get("regions")
    if regions is not None:
        by_article = regions.groupby("article_id")["region"].agg(lambda s: sorted(set(s)))
        out["regions"] = out["article_id"].map(by_article)
        out["regions"] = out["regions"].apply(lambda v: v if isinstance(v, list) else [])
    else:
        out["regions"] = None
    return out


def article_attributes(roles: Any = None) -> list[str]:
    """The articles group's attribute columns: H&M's, or a dataset config's declared ones."""
    if roles is not None and not roles.is_hm:
        return list(dict.fromkeys([*roles.item_categorical, *roles.item_numeric, *roles.item_text]))
    return ["prod_name", *ARTICLE_INT_ATTRIBUTES, *ARTICLE_NAME_ATTRIBUTES, "detail_desc"]


def customer_history(
    transactions: pd.DataFrame, articles: pd.DataFrame, as_of: pd.Timestamp | None, roles: Any = None
) -> pd.DataFrame:
    """The customer_history group: purchases (most recent first, the last MAX_PURCHASED) and
    aggregates: count, mean price, counts per product type and index group, the share of
    purchases in each H&M index group, the last purchase day overall and per product type
    (`type_last_day`, bounded by `recent_type_days`). A dataset config's history counts and
    dates purchases per value of its type column (`Roles.type_column`) and has no index groups."""
    if roles is not None and not roles.is_hm:
        return _generic_history(transactions, articles, as_of, roles.type_column)
    tx = before(transactions, as_of).merge(
        articles[["article_id", "product_type_name", "index_group_name"]], on="article_id", how="left"
    )
    tx = _with_day(tx.sort_values(["customer_id", "t_dat"], kind="stable"))
    rows = []
    for cid, g in tx.groupby("customer_id", sort=False):
        ids = recent_purchases(g["article_id"].tolist()[::-1])
        groups = dict(Counter(g["index_group_name"].dropna()))
        n = len(g)
        rows.append(
            {
                "customer_id": cid,
                "purchased": ids,
                "n_purchases": n,
                "mean_price": float(g["price"].mean()),
                "type_counts": dict(Counter(g["product_type_name"].dropna())),
                "index_group_counts": groups,
                **{share: groups.get(name, 0) / n for name, share in INDEX_GROUPS.items()},
                "last_purchase": g["t_dat"].iloc[-1].strftime("%Y-%m-%d"),
                "type_last_day": type_last_days(g["product_type_name"], g["_day"]),
            }
        )
    return pd.DataFrame(
        rows,
        columns=["customer_id", "purchased", "n_purchases", "mean_price", "type_counts",
                 "index_group_counts", *INDEX_GROUPS.values(), "last_purchase", "type_last_day"],
    )


GENERIC_HISTORY_COLUMNS = ["customer_id", "purchased", "n_purchases", "mean_price", "type_counts", "last_purchase",
                           "type_last_day"]


def _with_day(tx: pd.DataFrame) -> pd.DataFrame:
    """`tx` with its purchase day as a day number (`_day`), computed at once for all rows: text
    is formatted only for the days `type_last_days` keeps."""
    return tx.assign(_day=tx["t_dat"].to_numpy().astype("datetime64[D]").astype(np.int64))


def type_last_days(types: pd.Series, days: pd.Series) -> dict[str, str]:
    """{type: day of its last purchase (YYYY-MM-DD)} of one customer's purchases in time order
    (the later day wins), bounded by `recent_type_days`; purchases without a type are skipped."""
    last = {str(t): d for t, d in zip(types.tolist(), days.tolist(), strict=True) if not pd.isna(t)}
    return recent_type_days({t: str(np.datetime64(d, "D")) for t, d in last.items()})


def _generic_history(transactions: pd.DataFrame, articles: pd.DataFrame, as_of: pd.Timestamp | None,
                     type_column: str | None) -> pd.DataFrame:
    tx = before(transactions, as_of)
    if type_column:
        tx = tx.merge(articles[["article_id", type_column]], on="article_id", how="left")
    tx = _with_day(tx.sort_values(["customer_id", "t_dat"], kind="stable"))
    rows = []
    for cid, g in tx.groupby("customer_id", sort=False):
        rows.append({
            "customer_id": cid,
            "purchased": recent_purchases(g["article_id"].tolist()[::-1]),
            "n_purchases": len(g),
            "mean_price": float(g["price"].mean()) if g["price"].notna().any() else None,
            "type_counts": {str(k): v for k, v in Counter(g[type_column].dropna()).items()} if type_column else {},
            "last_purchase": g["t_dat"].iloc[-1].strftime("%Y-%m-%d"),
            "type_last_day": type_last_days(g[type_column], g["_day"]) if type_column else {},
        })
    return pd.DataFrame(rows, columns=GENERIC_HISTORY_COLUMNS)


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


SERVING_GROUPS = ("transactions", "customers", "articles", "customer_history")
STATIC_GROUPS = ("customers",)  # computed from the profiles alone: the same at every as-of time


def serving_frames(data: Any, names: Sequence[str] | None = None,
                   as_of: pd.Timestamp | None = None) -> dict[str, pd.DataFrame]:
    """The feature-group frames served as of `as_of` (None: the end of the data), computed
    from a loaded dataset (`feature_store.dataset.Dataset`, or anything with its articles,
    customers, transactions, extras and roles): what the pipeline and `rayrec features build`
    write. With `as_of`, only purchases strictly before it count (a snapshot's backfill)."""
    makers = {
        "transactions": lambda: before(data.transactions, as_of),
        "customers": lambda: customer_features(data.customers, data.extras.get("postal_regions"), data.roles),
        "articles": lambda: article_features(data.articles, data.transactions, as_of, data.extras, data.roles),
        "customer_history": lambda: customer_history(data.transactions, data.articles, as_of, data.roles),
    }
    unknown = [n for n in names or () if n not in makers]
    if unknown:
        raise ValueError(f"unknown feature group(s) {unknown}: choose from {list(makers)}")
    return {n: makers[n]() for n in (names or SERVING_GROUPS)}
