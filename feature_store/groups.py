"""Feature group definitions: the one place that says what each group holds and how it is keyed.

Online types are those of the online store's TableSpec (int64, float64, string, json).
"""
from __future__ import annotations

from dataclasses import dataclass

from feature_store.transforms import ARTICLE_CATEGORICALS


@dataclass(frozen=True)
class FeatureGroup:
    name: str
    key: str
    columns: dict[str, str]  # column -> online type, key included
    online: bool = True
    description: str = ""

    def table_name(self, version: int) -> str:
        return f"fg_{self.name}_v{version}"


CUSTOMERS = FeatureGroup(
    "customers",
    "customer_id",
    {
        "customer_id": "string",
        "age": "float64",
        "club_member_status": "string",
        "fashion_news_frequency": "string",
        "FN": "float64",
        "Active": "float64",
        "postal_code": "string",
        "region": "string",
    },
    description="Customer profile (static in the H&M data).",
)

ARTICLES = FeatureGroup(
    "articles",
    "article_id",
    {
        "article_id": "string",
        "prod_name": "string",
        **{c: "string" for c in ARTICLE_CATEGORICALS},
        "detail_desc": "string",
        "price": "float64",
        "sales_total": "int64",
        "sales_7d": "int64",
        "stock": "float64",
        "min_age": "int64",
        "regions": "json",
    },
    description="Article attributes, mean price and popularity as of the cut-off, stock and availability.",
)

CUSTOMER_HISTORY = FeatureGroup(
    "customer_history",
    "customer_id",
    {
        "customer_id": "string",
        "purchased": "json",
        "n_purchases": "int64",
        "mean_price": "float64",
        "type_counts": "json",
        "index_group_counts": "json",
        "last_purchase": "string",
    },
    description="Purchases (most recent first) and aggregates; read by the query encoder, filter and ranker.",
)

TRANSACTIONS = FeatureGroup(
    "transactions",
    "customer_id",
    {
        "t_dat": "string",
        "customer_id": "string",
        "article_id": "string",
        "price": "float64",
        "sales_channel_id": "int64",
    },
    online=False,
    description="Purchase events, offline only: the spine of training datasets.",
)

GROUPS: dict[str, FeatureGroup] = {g.name: g for g in (CUSTOMERS, ARTICLES, CUSTOMER_HISTORY, TRANSACTIONS)}
