"""Feature views: the training data that models read, joined point-in-time correctly.

The retrieval view is one row per purchase: the customer's profile, the request context of
that purchase (month, sales channel), the customer's history *before that day* and the
article's attributes. The same columns are what serving assembles from the online store,
so the two-tower encoder sees one feature path in training and in serving.
"""
from __future__ import annotations

import pandas as pd

from feature_store.transforms import ARTICLE_CATEGORICALS, histories_before

RETRIEVAL_VIEW_VERSION = 1
QUERY_COLUMNS = ["customer_id", "age", "club_member_status", "fashion_news_frequency", "FN", "Active",
                 "sales_channel_id", "month", "history"]
ITEM_COLUMNS = ["article_id", *ARTICLE_CATEGORICALS, "price"]


def retrieval_frame(
    transactions: pd.DataFrame, customers_fg: pd.DataFrame, articles_fg: pd.DataFrame, history_len: int
) -> pd.DataFrame:
    """Purchases joined with customer, context, point-in-time history and article features."""
    spine = transactions[["t_dat", "customer_id", "article_id", "sales_channel_id"]].copy()
    spine["month"] = spine["t_dat"].dt.month.astype("int64")
    spine["history"] = histories_before(spine, history_len)
    out = spine.merge(customers_fg, on="customer_id", how="left", validate="many_to_one")
    out = out.merge(articles_fg[ITEM_COLUMNS], on="article_id", how="left", validate="many_to_one")
    return out[["t_dat", *QUERY_COLUMNS, *[c for c in ITEM_COLUMNS]]].reset_index(drop=True)


def query_frame(
    customer_ids: list[str],
    customers_fg: pd.DataFrame,
    purchased: dict[str, list[str]],
    month: int,
    channel: dict[str, int] | int,
    history_len: int,
) -> pd.DataFrame:
    """Query rows for customers at one moment (evaluation): same columns as the view's query side."""
    base = pd.DataFrame({"customer_id": customer_ids})
    out = base.merge(customers_fg, on="customer_id", how="left")
    out["history"] = [list(purchased.get(c, []))[:history_len] for c in customer_ids]
    out["month"] = month
    out["sales_channel_id"] = (
        [channel.get(c, 1) for c in customer_ids] if isinstance(channel, dict) else channel
    )
    return out[QUERY_COLUMNS]


def query_row(customer: dict | None, customer_id: str, history: list[str], month: int, channel: int) -> dict:
    """One query row at serving time, from the online customer features and request context."""
    row = {c: None for c in QUERY_COLUMNS}
    if customer:
        row.update({k: customer.get(k) for k in ("age", "club_member_status", "fashion_news_frequency", "FN", "Active")})
    row.update(customer_id=customer_id, history=list(history), month=int(month), sales_channel_id=int(channel))
    return row
