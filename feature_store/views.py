"""Feature views: the training data that models read, joined point-in-time correctly.

The retrieval view is one row per purchase: the customer's profile, the request context of
that purchase (month, sales channel), the customer's history *before that day*, the
article's attributes and its sales activity as of the start of the purchase's week
(`features_as_of`, see `transforms.snapshot_times`). The same columns are what serving
assembles from the online store and the index build reads from the articles group, so the
two-tower encoder sees one feature path in training and in serving.
"""
from __future__ import annotations

from typing import Any

import pandas as pd

from feature_store.feature_view import FeatureSelection, FeatureView
from feature_store.on_demand import OnDemandFeature
from feature_store.transformations import Transformation
from feature_store.transforms import (
    ACTIVITY_COLUMNS,
    ARTICLE_CATEGORICALS,
    article_activity,
    histories_before,
    snapshot_times,
)

RETRIEVAL_VIEW_VERSION = 2  # 2: + the article's activity as of the row's week (features_as_of)
AS_OF_COLUMN = "features_as_of"
QUERY_COLUMNS = ["customer_id", "age", "club_member_status", "fashion_news_frequency", "FN", "Active",
                 "sales_channel_id", "month", "history"]
ITEM_COLUMNS = ["article_id", *ARTICLE_CATEGORICALS, "price"]


def view_columns(roles: Any = None) -> tuple[list[str], list[str]]:
    """(query columns, item columns) of the retrieval view: H&M's, or a dataset config's roles."""
    if roles is None or roles.is_hm:
        return QUERY_COLUMNS, ITEM_COLUMNS
    query = ["customer_id", *roles.user_categorical, *roles.user_numeric, "sales_channel_id", "month", "history"]
    item = ["article_id", *roles.item_categorical, *roles.item_numeric, "price"]
    return query, item


def retrieval_frame(
    transactions: pd.DataFrame, customers_fg: pd.DataFrame, articles_fg: pd.DataFrame, history_len: int,
    roles: Any = None,
) -> pd.DataFrame:
    """Purchases joined with customer, context, point-in-time history, article attributes and the
    article's activity (ACTIVITY_COLUMNS) as of the row's `features_as_of`."""
    query_cols, item_cols = view_columns(roles)
    spine = transactions[["t_dat", "customer_id", "article_id", "sales_channel_id"]].copy()
    spine["month"] = spine["t_dat"].dt.month.astype("int64")
    spine["history"] = histories_before(spine, history_len)
    spine[AS_OF_COLUMN] = snapshot_times(spine["t_dat"])
    activity = article_activity(transactions, spine["article_id"], spine[AS_OF_COLUMN])
    for col in ACTIVITY_COLUMNS:
        spine[col] = activity[col].to_numpy()
    out = spine.merge(customers_fg, on="customer_id", how="left", validate="many_to_one")
    out = out.merge(articles_fg[item_cols], on="article_id", how="left", validate="many_to_one")
    return out[["t_dat", *query_cols, *item_cols, AS_OF_COLUMN, *ACTIVITY_COLUMNS]].reset_index(drop=True)


def query_frame(
    customer_ids: list[str],
    customers_fg: pd.DataFrame,
    purchased: dict[str, list[str]],
    month: int,
    channel: dict[str, int] | int,
    history_len: int,
    roles: Any = None,
) -> pd.DataFrame:
    """Query rows for customers at one moment (evaluation): same columns as the view's query side."""
    base = pd.DataFrame({"customer_id": customer_ids})
    out = base.merge(customers_fg, on="customer_id", how="left")
    out["history"] = [list(purchased.get(c, []))[:history_len] for c in customer_ids]
    out["month"] = month
    out["sales_channel_id"] = (
        [channel.get(c, 1) for c in customer_ids] if isinstance(channel, dict) else channel
    )
    return out[view_columns(roles)[0]]


def query_row(customer: dict | None, customer_id: str, history: list[str], month: int, channel: int) -> dict:
    """One query row at serving time, from the online customer features and request context
    (every profile column the customer row has: the vocab picks the ones its towers read)."""
    row = {c: None for c in QUERY_COLUMNS}
    if customer:
        row.update({k: v for k, v in customer.items() if k != "customer_id"})
    row.update(customer_id=customer_id, history=list(history), month=int(month), sales_channel_id=int(channel))
    return row


# ---------------------------------------------------------------------------------------------
# The H&M purchases feature view (feature_store.feature_view): one training row per purchase,
# customer profile and purchase aggregates as of the purchase, the article's attributes and
# sales, the request context (sales channel, month sin/cos of the date), with transformations
# fitted on the training split. Serving passes {"customer_id", "article_id"} keys and the
# request {"date": ..., "sales_channel_id": ...}.


PURCHASES_VIEW = FeatureView(
    "purchases",
    features=(
        FeatureSelection("customers", ("age", "age_group", "club_member_status", "fashion_news_frequency",
                                       "FN", "Active", "postal_bucket")),
        FeatureSelection("customer_history", ("n_purchases", "mean_price", "share_ladieswear", "share_divided",
                                              "share_menswear", "share_baby_children", "share_sport")),
        FeatureSelection("articles", ("product_type_name", "product_group_name", "colour_group_name",
                                      "index_group_name", "garment_group_name", "price", "sales_7d",
                                      "sales_30d", "sales_trend", "in_stock"), prefix="article_"),
    ),
    label_group="transactions",
    label_features=("sales_channel_id",),
    on_demand=(OnDemandFeature("month_sin", "month_sin", ("date",)),
               OnDemandFeature("month_cos", "month_cos", ("date",))),
    request_from_label={"date": "t_dat"},
    transformations=(
        Transformation("age", "standard_scaler"),
        Transformation("age_group", "one_hot_encoder"),
        Transformation("club_member_status", "label_encoder"),
        Transformation("article_product_type_name", "label_encoder"),
        Transformation("article_index_group_name", "one_hot_encoder"),
        Transformation("article_price", "min_max_scaler"),
        Transformation("n_purchases", "bucketizer", {"boundaries": [1, 2, 5, 10, 20, 50]}),
    ),
    description="One row per purchase; the customer's and the article's features as of the purchase.",
)
