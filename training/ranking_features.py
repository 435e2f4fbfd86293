"""Ranker features: the one vectorisation path for training, evaluation, batch and serving.

Input is what the online store returns for one request: the customer's `customers` and
`customer_history` rows, one `articles` row per candidate (None when unknown), the retrieval
scores in retrieval order, the request context (sales channel, date) and the product types of
the customer's most recent purchases. Training builds the same rows from the offline feature
group frames (`offline_rows`: the exact conversion the online write uses), as of each cut-off,
so the vector of (customer, article, time) is computed by the same code from the same values.

Output: a `FeatureBlock` (float32 numeric matrix + string categorical matrix) in the column
order of a `RankerFeatures` spec (H&M: `NUMERIC_FEATURES` + `CATEGORICAL_FEATURES`; a dataset
config: the same interaction features plus its declared customer and item columns), fed to
CatBoost with native categoricals. The spec travels in the ranker file, so serving builds the
vectors the model was trained on.
"""
from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
    "days_since_type",  # days since the customer last bought this type (NaN if never)
    "repurchase",  # 1 when the customer bought this very article before (see `vectorise`)
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

# What H&M vectorisation reads from the customer groups (filters may read more); articles:
# `RankerFeatures.article_columns`.
CUSTOMER_COLUMNS = ("age", "club_member_status")
HISTORY_COLUMNS = ("purchased", "n_purchases", "mean_price", "type_counts", "index_group_counts", "last_purchase",
                   "type_last_day")


# Computed from the request, the retrieval scores and the aggregates (not a column of one row).
DERIVED = ("retrieval_score", "retrieval_rank", "score_gap", "sales_channel_id", "n_purchases", "mean_price",
           "days_since_last_purchase", "price_ratio", "log_sales_7d", "log_sales_total", "sales_trend",
           "sales_7d_share", "type_share", "index_group_share", "purchases_since_type", "days_since_type",
           "repurchase")


@dataclass(frozen=True)
class RankerFeatures:
    """The ranker's feature contract: names in column order, and where each non-derived one
    comes from (`sources`: name -> (group, column), group "customers" or "articles").
    `type_column`: the article attribute behind type_share / purchases_since_type /
    days_since_type and diversity."""

    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    sources: dict[str, tuple[str, str]] = field(default_factory=dict)
    type_column: str | None = "product_type_name"

    @property
    def names(self) -> list[str]:
        return [*self.numeric, *self.categorical]

    def columns_of(self, group: str) -> list[str]:
        return [col for g, col in self.sources.values() if g == group]

    def article_columns(self) -> list[str]:
        """What vectorisation reads from each candidate's articles row."""
        cols = ["price", "sales_7d", "sales_total", "sales_trend", *self.columns_of("articles")]
        if self.type_column:
            cols.append(self.type_column)
        if "index_group_share" in self.numeric:
            cols.append("index_group_name")
        return list(dict.fromkeys(cols))

    def to_dict(self) -> dict[str, Any]:
        return {"numeric": list(self.numeric), "categorical": list(self.categorical),
                "sources": {k: list(v) for k, v in self.sources.items()}, "type_column": self.type_column}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RankerFeatures:
        return cls(tuple(d["numeric"]), tuple(d["categorical"]),
                   {k: (v[0], v[1]) for k, v in d["sources"].items()}, d.get("type_column"))


HM_FEATURES = RankerFeatures(
    tuple(NUMERIC_FEATURES), tuple(CATEGORICAL_FEATURES),
    {"age": ("customers", "age"), "price": ("articles", "price"), "club_member_status": ("customers",
     "club_member_status"), **{c: ("articles", c) for c in CATEGORICAL_FEATURES[:-1]}},
)


def ranker_features(roles: Any) -> RankerFeatures:
    """The spec for a dataset's roles (`feature_store.dataset.Roles`; None or H&M: HM_FEATURES).
    Declared customer / item columns join the interaction features; a name both sides declare
    gets a `customer_` / `article_` prefix."""
    if roles is None or roles.is_hm:
        return HM_FEATURES
    num = ["retrieval_score", "retrieval_rank", "score_gap"]
    num += ["sales_channel_id"] if roles.has_channel else []
    num += ["n_purchases", "days_since_last_purchase", "log_sales_7d", "log_sales_total", "sales_trend",
            "sales_7d_share", "repurchase"]
    num += ["mean_price", "price", "price_ratio"] if roles.has_price else []
    num += ["type_share", "purchases_since_type", "days_since_type"] if roles.type_column else []
    both = set(roles.user_categorical + roles.user_numeric) & set(roles.item_categorical + roles.item_numeric)
    sources: dict[str, tuple[str, str]] = {"price": ("articles", "price")} if roles.has_price else {}

    def named(group: str, cols: tuple[str, ...]) -> list[str]:
        out = []
        for c in cols:
            name = f"{group[:-1]}_{c}" if c in both or c in DERIVED or c in sources else c
            sources[name] = (group, c)
            out.append(name)
        return out

    num += named("customers", roles.user_numeric) + named("articles", roles.item_numeric)
    cat = named("articles", roles.item_categorical) + named("customers", roles.user_categorical)
    return RankerFeatures(tuple(num), tuple(cat), sources, roles.type_column)


@dataclass
class FeatureBlock:
    """Feature rows for candidates: numeric (float32, NaN = missing) and categorical (str)."""

    num: np.ndarray  # (n, len(spec.numeric)) float32
    cat: np.ndarray  # (n, len(spec.categorical)) object (str)

    def __len__(self) -> int:
        return self.num.shape[0]

    def to_frame(self, spec: RankerFeatures | None = None) -> pd.DataFrame:
        """Named columns, for reports and tests."""
        spec = spec or HM_FEATURES
        out = pd.DataFrame(self.num.astype(np.float64), columns=list(spec.numeric))
        for j, c in enumerate(spec.categorical):
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


def empty_block(n: int = 0, spec: RankerFeatures | None = None) -> FeatureBlock:
    spec = spec or HM_FEATURES
    return FeatureBlock(np.zeros((n, len(spec.numeric)), np.float32),
                        np.full((n, len(spec.categorical)), MISSING_CATEGORY, dtype=object))


def recent_types(history: Row | None, articles_by_id: Mapping[str, Row | None], window: int,
                 type_column: str | None = "product_type_name") -> list[str | None]:
    """Types (`type_column`) of the customer's `window` most recent purchases, most recent first."""
    purchased = (history or {}).get("purchased") or []
    if type_column is None:
        return [None] * len(purchased[:window])
    return [(articles_by_id.get(a) or {}).get(type_column) for a in purchased[:window]]


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
    spec: RankerFeatures | None = None,
) -> FeatureBlock:
    """Feature rows for one customer's candidates, given in retrieval order (best first).

    Args:
        customer, history: the customer's rows of the customers / customer_history groups.
        articles: one articles-group row per candidate (None when the article is unknown).
        scores: retrieval scores, best first; their order defines `retrieval_rank`.
        article_ids: the candidates' ids (for the repurchase flag).
        channel, now: request context (sales channel, the day the list is for).
        recent: types of the customer's most recent purchases (see `recent_types`).
        window: the look-back of `purchases_since_type` (its value when the type is not in `recent`).
        spec: the feature contract (default: H&M's).

    `days_since_type` is `now` minus the history's `type_last_day` of the candidate's type (NaN
    when the customer never bought it, or not among the types the row keeps). `repurchase` is
    informative only when bought articles can reach the ranker: under the default filter
    (`FilterConfig.bought_lookback` None) the already-bought rule removes every article in
    `purchased` first, so it is 0 for every ranked candidate; with a look-back of N purchases,
    articles bought before those N pass the filter and score 1. (The pipeline's training
    candidates exclude every purchase whatever the look-back, so a ranker it trains has seen
    only 0 there.)
    """
    spec = spec or HM_FEATURES
    n = len(articles)
    if not (n == len(article_ids) == len(scores)):
        raise ValueError(f"{n} article rows, {len(article_ids)} ids and {len(scores)} scores: lengths differ")
    cust = customer or {}
    cols = _article_columns(articles, spec)
    derived = _derived(history or {}, cols, n, np.asarray(scores, dtype=np.float64), article_ids, channel, now,
                       recent, window, spec)
    num = np.empty((n, len(spec.numeric)), dtype=np.float64)
    for j, name in enumerate(spec.numeric):
        if name in derived:
            num[:, j] = derived[name]
        else:
            group, col = spec.sources[name]
            num[:, j] = _num(cust.get(col)) if group == "customers" else _floats(cols[col])
    cat = np.empty((n, len(spec.categorical)), dtype=object)
    for j, name in enumerate(spec.categorical):
        group, col = spec.sources[name]
        cat[:, j] = _cat(cust.get(col)) if group == "customers" else _cats(cols[col])
    return FeatureBlock(num.astype(np.float32), cat)


def _article_columns(articles: Sequence[Row | None], spec: RankerFeatures) -> dict[str, list[Any]]:
    """Each article column the features read, as one list over the candidates (None where the
    row or the value is missing): one pass over the rows, then every feature works on columns."""
    names = list(dict.fromkeys([*spec.article_columns(), "index_group_name"]))  # _derived reads it always
    if not articles:
        return {c: [] for c in names}
    empty: Row = {}
    values = zip(*[list(map((a or empty).get, names)) for a in articles], strict=True)
    return dict(zip(names, (list(v) for v in values), strict=True))


def _derived(hist: Row, cols: Mapping[str, list[Any]], n: int, score: np.ndarray, article_ids: Sequence[str],
             channel: int, now: dt.date, recent: Sequence[str | None], window: int,
             spec: RankerFeatures) -> dict[str, Any]:
    """The interaction features (DERIVED) of each candidate, from the article columns."""
    n_purchases = float(hist.get("n_purchases") or 0)
    mean_price = _num(hist.get("mean_price"))
    type_counts = hist.get("type_counts") or {}
    group_counts = hist.get("index_group_counts") or {}
    last = hist.get("last_purchase")
    type_days = hist.get("type_last_day") or {}
    bought = set(hist.get("purchased") or [])
    first_seen: dict[str, int] = {}
    for pos, t in enumerate(recent[:window]):
        if t is not None:
            first_seen.setdefault(t, pos)
    denom = n_purchases if n_purchases > 0 else 1.0
    price = _floats(cols["price"])
    sales_7d = _floats([v or 0 for v in cols["sales_7d"]])
    sales_total = _floats([v or 0 for v in cols["sales_total"]])
    ptype = cols[spec.type_column] if spec.type_column else [None] * n
    days_of_type = {t: _days_since(now, type_days.get(str(t))) for t in set(ptype) if t is not None}
    return {
        "retrieval_score": score,
        "retrieval_rank": np.arange(n),
        "score_gap": (score[0] - score) if n else score,
        "sales_channel_id": float(channel),
        "n_purchases": n_purchases,
        "mean_price": mean_price,
        "days_since_last_purchase": _days_since(now, last),
        "price_ratio": price / mean_price if mean_price > 0 else math.nan,
        "log_sales_7d": np.log1p(sales_7d),
        "log_sales_total": np.log1p(sales_total),
        "sales_trend": _floats(cols["sales_trend"]),
        "sales_7d_share": sales_7d / np.maximum(sales_total, 1.0),
        "type_share": [type_counts.get(t, 0) / denom if t is not None else 0.0 for t in ptype],
        "index_group_share": [group_counts.get(g, 0) / denom if g is not None else 0.0
                              for g in cols["index_group_name"]],
        "purchases_since_type": [first_seen.get(t, window) if t is not None else window for t in ptype],
        "days_since_type": [days_of_type[t] if t is not None else math.nan for t in ptype],
        "repurchase": [1.0 if a in bought else 0.0 for a in article_ids],
    }


def _floats(values: Sequence[Any]) -> np.ndarray:
    """`_num` over a column: None -> NaN (numpy's own conversion of None to a float)."""
    return np.array(values, dtype=np.float64)


def _cats(values: Sequence[Any]) -> list[str]:
    """`_cat` over a column, without a call per value."""
    return [v if type(v) is str else MISSING_CATEGORY if v is None or (isinstance(v, float) and v != v) else str(v)
            for v in values]


def _days_since(now: dt.date, day: str | None) -> float:
    """Days from `day` (YYYY-MM-DD) to `now`; NaN when there is no day."""
    return float((now - dt.date.fromisoformat(day)).days) if day else math.nan


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


def _cat(v: Any) -> str:
    return MISSING_CATEGORY if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def offline_rows(group: str, frame: pd.DataFrame, keys: Sequence[str] | None = None,
                 roles: Any = None) -> dict[str, dict[str, Any]]:
    """Key -> row of an offline feature-group frame, converted exactly as the online write
    converts it (NaN -> None, numpy -> Python), so offline and online vectors are equal.
    `roles`: the dataset's (None: H&M), which decides the group's definition."""
    from feature_store.groups import dataset_groups
    from feature_store.store import to_online_rows

    spec = dataset_groups(roles)[group]
    if keys is not None:
        frame = frame[frame[spec.key].isin(set(keys))]
    return {r[spec.key]: r for r in to_online_rows(spec, frame)}
