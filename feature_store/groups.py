"""The H&M feature groups: the one place that says what each group holds and how it is keyed.

    customers         profile: age, age group, club status, news frequency, FN, Active,
                      postal code and its bucket, region
    articles          every catalogue attribute (codes and names, prod_name, detail_desc), the
                      sales aggregates (mean price, total / 7-day / 30-day sales, trend, first
                      seen, the daily counts behind them) and stock and availability; one row
                      per article so ranking and filtering read one group
    customer_history  purchase aggregates: last-N articles, count, mean price, counts and shares
                      per product type and index group, last purchase day overall and per
                      product type
    transactions      purchase events (offline only): the spine of training datasets and the
                      log real-time events are appended to

The low-cardinality strings (the article attribute names, the customers' age group, club status,
news frequency and region) are dictionary-encoded online (feature_store.dictionary): a row holds
a 4-byte code per value. Columns are spelled as in the H&M files; `FN` and `Active` are stored as `fn` and `active`
(see feature_store.schema). Lists are bounded: `purchased` keeps the last MAX_PURCHASED
articles (and PURCHASED_BYTES of them, `recent_purchases`), `daily_sales` SALES_DAYS days, `type_last_day` the MAX_TYPE_DAYS most recently bought
types (`recent_type_days`).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from feature_store.on_demand import AGE_GROUPS, POSTAL_BUCKETS
from feature_store.schema import Expectation, Feature, FeatureGroup, allowed, in_range, not_null

MAX_PURCHASED = 500  # purchases kept per customer online (most recent first); enough for the filter
# ...and at most this many bytes of them: 500 H&M ids (10 characters and a separator) fit, 500 UUIDs
# (18.5 kB) would not fit the packed row's limit (codec.MAX_PACKED_BYTES) with the other features
PURCHASED_BYTES = 5_500
SALES_DAYS = 30  # daily sales counts kept per article (most recent first), for 7/30-day windows
MAX_TYPE_DAYS = 64  # product types whose last purchase day is kept per customer (the most recent ones)
TYPE_DAYS_BYTES = 4_096  # bound of type_last_day's JSON text
INDEX_GROUPS = {  # H&M index groups -> share feature
    "Ladieswear": "share_ladieswear",
    "Divided": "share_divided",
    "Menswear": "share_menswear",
    "Baby/Children": "share_baby_children",
    "Sport": "share_sport",
}
CLUB_MEMBER_STATUSES = ("ACTIVE", "PRE-CREATE", "LEFT CLUB")
FASHION_NEWS_FREQUENCIES = ("NONE", "None", "Regularly", "Monthly")

# Article attributes as in articles.csv (all but the id): integer codes and their names.
ARTICLE_INT_ATTRIBUTES = [
    "product_code", "product_type_no", "graphical_appearance_no", "colour_group_code",
    "perceived_colour_value_id", "perceived_colour_master_id", "department_no", "index_group_no",
    "section_no", "garment_group_no",
]
ARTICLE_NAME_ATTRIBUTES = [
    "product_type_name", "product_group_name", "graphical_appearance_name", "colour_group_name",
    "perceived_colour_value_name", "perceived_colour_master_name", "department_name", "index_code",
    "index_name", "index_group_name", "section_name", "garment_group_name",
]

CUSTOMERS = FeatureGroup(
    "customers",
    "customer_id",
    (
        Feature("customer_id", "string", limit=64),
        Feature("age", "float64"),
        Feature("age_group", "string", description="0-18, 19-25, 26-35, 36-45, 46-55, 56-65, 66+", dictionary=True),
        Feature("club_member_status", "string", dictionary=True),
        Feature("fashion_news_frequency", "string", dictionary=True),
        Feature("fn", "float64", alias="FN"),
        Feature("active", "float64", alias="Active"),
        Feature("postal_code", "string", limit=64),
        Feature("postal_bucket", "int64", description=f"stable hash of the postal code, 0..{POSTAL_BUCKETS - 1}"),
        Feature("region", "string", dictionary=True),
    ),
    description="Customer profile (static in the H&M data).",
    expectations=(
        in_range("age", 0, 120),
        allowed("age_group", AGE_GROUPS),
        allowed("club_member_status", CLUB_MEMBER_STATUSES),
        allowed("fashion_news_frequency", FASHION_NEWS_FREQUENCIES),
        allowed("fn", (0.0, 1.0)),
        allowed("active", (0.0, 1.0)),
        in_range("postal_bucket", 0, POSTAL_BUCKETS - 1),
    ),
)

ARTICLES = FeatureGroup(
    "articles",
    "article_id",
    (
        Feature("article_id", "string", limit=64),
        Feature("prod_name", "string"),
        *(Feature(c, "int64") for c in ARTICLE_INT_ATTRIBUTES),
        *(Feature(c, "string", dictionary=True) for c in ARTICLE_NAME_ATTRIBUTES),
        Feature("detail_desc", "string", limit=2000),
        Feature("price", "float64", description="mean sale price"),
        Feature("sales_total", "int64"),
        Feature("sales_7d", "int64", description="sales in the 7 days up to the group's time"),
        Feature("sales_30d", "int64"),
        Feature("sales_trend", "int64", description="sales of the last 7 days minus the 7 days before"),
        Feature("first_seen", "string", description="day of the first sale (YYYY-MM-DD)"),
        Feature("sales_day", "string", description="the day daily_sales[0] counts (YYYY-MM-DD)"),
        Feature("daily_sales", "list_int64", limit=SALES_DAYS, description="sales per day, most recent first"),
        Feature("stock", "float64"),
        Feature("in_stock", "bool", description="stock > 0; None when the stock is unknown"),
        Feature("min_age", "int64"),
        Feature("regions", "list_string", limit=16),
    ),
    description="Article attributes, sales aggregates, stock and availability.",
    expectations=(
        not_null("prod_name"),
        in_range("price", 0, None),
        in_range("sales_total", 0, None),
        in_range("sales_7d", 0, None),
        in_range("sales_30d", 0, None),
        in_range("min_age", 0, 120),
        in_range("stock", 0, None),
    ),
)

CUSTOMER_HISTORY = FeatureGroup(
    "customer_history",
    "customer_id",
    (
        Feature("customer_id", "string", limit=64),
        Feature("purchased", "list_string", limit=MAX_PURCHASED, description="articles bought, most recent first"),
        Feature("n_purchases", "int64"),
        Feature("mean_price", "float64"),
        Feature("type_counts", "json", limit=6_000, description="purchases per product type"),
        Feature("index_group_counts", "json", limit=2_048, description="purchases per index group"),
        *(Feature(share, "float64", description=f"share of purchases in {g}") for g, share in INDEX_GROUPS.items()),
        Feature("last_purchase", "string", description="day of the last purchase (YYYY-MM-DD)"),
        Feature("type_last_day", "json", limit=TYPE_DAYS_BYTES,
                description=f"product type -> day of its last purchase (YYYY-MM-DD), the {MAX_TYPE_DAYS} most "
                            "recently bought types"),
    ),
    description="Purchases (most recent first) and aggregates; read by the query encoder, filter and ranker.",
    expectations=(
        in_range("n_purchases", 0, None),
        in_range("mean_price", 0, None),
        *(in_range(share, 0, 1) for share in INDEX_GROUPS.values()),
    ),
)

TRANSACTIONS = FeatureGroup(
    "transactions",
    "customer_id",
    (
        Feature("customer_id", "string", limit=64),
        Feature("article_id", "string", limit=64),
        Feature("price", "float64"),
        Feature("sales_channel_id", "int64"),
        Feature("event_id", "string", limit=64, optional=True,
                description="set for real-time events (their idempotency key)"),
    ),
    event_time="t_dat",
    online=False,
    description="Purchase events, offline only: the spine of training datasets.",
    expectations=(
        not_null("article_id"),
        in_range("price", 0, None),
        allowed("sales_channel_id", (1, 2)),
    ),
)

def recent_type_days(days: Mapping[str, str], limit: int = MAX_TYPE_DAYS,
                     max_bytes: int = TYPE_DAYS_BYTES) -> dict[str, str]:
    """`days` ({type: last purchase day}) cut to the `limit` most recently bought types, most
    recent first (ties by name), and to `max_bytes` of JSON text, so the online row stays
    bounded; batch builds and real-time events cut the same way. A type cut off reads as
    never bought (it was the customer's least recent)."""
    out: dict[str, str] = {}
    size = 1  # "{" and "}" less the comma the last item does not have
    for t, day in sorted(days.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:limit]:
        size += len(json.dumps(t, ensure_ascii=False).encode("utf-8")) + len(day) + 4  # quotes, colon, comma
        if size > max_bytes:
            break
        out[t] = day
    return out


def recent_purchases(ids: list[str], limit: int = MAX_PURCHASED, max_bytes: int = PURCHASED_BYTES) -> list[str]:
    """`ids` (most recent first) cut to `limit` items and to `max_bytes` as stored (UTF-8 and a
    separator each), so a customer with many purchases of long ids still has a row online;
    batch builds and real-time events cut the same way."""
    ids = ids[:limit]
    joined = "".join(ids)  # the common case in C: ASCII ids that fit
    if joined.isascii() and len(joined) + len(ids) <= max_bytes:
        return ids
    size = 0
    for i, a in enumerate(ids):
        size += len(a.encode("utf-8")) + 1
        if size > max_bytes:
            return ids[:i]
    return ids


GROUPS: dict[str, FeatureGroup] = {g.name: g for g in (CUSTOMERS, ARTICLES, CUSTOMER_HISTORY, TRANSACTIONS)}

# The articles group's features every dataset has: sales aggregates and the filter columns.
_ARTICLE_COMMON = ("price", "sales_total", "sales_7d", "sales_30d", "sales_trend", "first_seen", "sales_day",
                   "daily_sales", "stock", "in_stock", "min_age", "regions")


def dataset_groups(roles: Any = None) -> dict[str, FeatureGroup]:
    """The four groups for a dataset's roles (`feature_store.dataset.Roles`; None or H&M: GROUPS).

    A dataset config's customers group holds its declared customer columns; its articles group
    the declared item columns (text up to 2,000 characters) plus the sales aggregates and the
    (null) filter columns; its history counts purchases per type and has no index groups. The
    declared categorical columns are dictionary-encoded online, like H&M's attribute names.
    """
    if roles is None or roles.is_hm:
        return GROUPS
    customers = FeatureGroup(
        "customers", "customer_id",
        (Feature("customer_id", "string", limit=64),
         *(Feature(c, "string", dictionary=True) for c in roles.user_categorical),
         *(Feature(c, "float64") for c in roles.user_numeric)),
        description="Customer attributes declared in the dataset config.",
    )
    declared = [*(Feature(c, "string", dictionary=True) for c in roles.item_categorical),
                *(Feature(c, "float64") for c in roles.item_numeric),
                *(Feature(c, "string", limit=2000) for c in roles.item_text)]
    articles = FeatureGroup(
        "articles", "article_id",
        (Feature("article_id", "string", limit=64), *declared,
         *(ARTICLES.feature(c) for c in _ARTICLE_COMMON)),
        description="Item attributes declared in the dataset config, sales aggregates, filter columns.",
        expectations=tuple(e for e in ARTICLES.expectations if e.feature in _ARTICLE_COMMON),
    )
    history = FeatureGroup(
        "customer_history", "customer_id",
        tuple(f for f in CUSTOMER_HISTORY.features
              if f.name not in INDEX_GROUPS.values() and f.name != "index_group_counts"),
        description="Purchases (most recent first) and aggregates.",
        expectations=(in_range("n_purchases", 0, None), in_range("mean_price", 0, None)),
    )
    transactions = FeatureGroup(
        "transactions", "customer_id", TRANSACTIONS.features, event_time="t_dat", online=False,
        description="Interactions, offline only: the spine of training datasets.",
        expectations=(not_null("article_id"), in_range("price", 0, None)),
    )
    return {g.name: g for g in (customers, articles, history, transactions)}

__all__ = ["GROUPS", "dataset_groups", "CUSTOMERS", "ARTICLES", "CUSTOMER_HISTORY", "TRANSACTIONS", "FeatureGroup", "Feature",
           "Expectation", "MAX_PURCHASED", "PURCHASED_BYTES", "recent_purchases", "SALES_DAYS", "INDEX_GROUPS", "MAX_TYPE_DAYS", "recent_type_days"]
