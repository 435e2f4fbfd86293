"""Vocabularies and encoding for the two-tower model, shared by training, evaluation and serving.

One feature path: the same `encode_queries` / `encode_items` turn a training frame, an evaluation
frame or a single serving request into index arrays, so the model never sees two encodings.
Index 0 is reserved in every vocabulary for unknown or missing values: an id unseen at fit time
maps to row 0 instead of failing, and the trainer drops some ids to 0 so that row learns a
sensible "anonymous" embedding.

The features are the vocab's `query_features` / `item_features`: H&M's (QUERY_CATEGORICALS,
ITEM_CATEGORICALS, the last two of which are the article's sales activity: ACTIVITY_FEATURES) or
those a dataset config declares (`dataset_features`).
Encoded query dict: one int64 array per query feature, the jagged history as
`hist_values` (int64, flat, article indices, most recent first) + `hist_lengths` (int32), and
`dense` (float32, [n, N_QUERY_DENSE]: month sin/cos). Encoded item dict: one int64 array per item
feature.

Fixed-width form (training batches, Ray Data blocks): the same values as 2-D arrays, one row per
example: `q_cat` [n, n query features] and `i_cat` [n, n item features] (int64, model order), `q_hist` [n, history_len] (int64, zero-padded after `q_hist_len` entries) and
`q_dense`. `fixed_width_queries` / `fixed_width_items` convert; `from_fixed_width` converts back.
"""
from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from feature_store.on_demand import days_on_sale

VOCAB_FORMAT = 2  # 2: the feature lists travel in the file (1: H&M, still read)

# Input columns, as delivered by the feature store (see the retrieval training frame contract).
QUERY_PROFILE_COLUMNS = ["customer_id", "age", "club_member_status", "fashion_news_frequency", "FN", "Active"]
QUERY_CONTEXT_COLUMNS = ["sales_channel_id", "month"]
HISTORY_COLUMN = "history"
ITEM_ATTRIBUTE_COLUMNS = [
    "product_type_name",
    "product_group_name",
    "colour_group_name",
    "index_group_name",
    "garment_group_name",
    "department_name",
    "graphical_appearance_name",
]
ITEM_COLUMNS = ["article_id", *ITEM_ATTRIBUTE_COLUMNS, "price", "sales_7d", "first_seen", "sales_day"]

# Encoded categorical feature names, in model order. Most equal their column; age and price are bucketed.
QUERY_CATEGORICALS = [
    "customer_id",
    "age_bucket",
    "club_member_status",
    "fashion_news_frequency",
    "FN",
    "Active",
    "sales_channel_id",
]
ITEM_CATEGORICALS = ["article_id", *ITEM_ATTRIBUTE_COLUMNS, "price_bucket", "sales_7d_bucket", "days_on_sale_bucket"]
HIST_VALUES = "hist_values"
HIST_LENGTHS = "hist_lengths"
DENSE = "dense"
N_QUERY_DENSE = 2  # month sin, month cos
Q_CAT, Q_HIST, Q_HIST_LEN, Q_DENSE, I_CAT = "q_cat", "q_hist", "q_hist_len", "q_dense", "i_cat"

# How each encoded feature is computed from its column: "string" (learned vocabulary), "age" /
# "price" (the H&M fixed age edges / price quantiles), "bucket" (quantile edges of a declared numeric
# column), "flag" (0 missing, 1 == 1.0, 2 other), "channel" (the sales channel codes), "count" /
# "days" (fixed roughly logarithmic edges: COUNT_EDGES, DAY_EDGES).
# (feature name, input column, kind); the id comes first in each tower (the trainer relies on it).
FeatureSpec = tuple[str, str, str]
Frame = pd.DataFrame | Mapping[str, Sequence[Any]]  # rows as a DataFrame, or columns as lists
HM_QUERY_FEATURES: list[FeatureSpec] = [
    ("customer_id", "customer_id", "string"),
    ("age_bucket", "age", "age"),
    ("club_member_status", "club_member_status", "string"),
    ("fashion_news_frequency", "fashion_news_frequency", "string"),
    ("FN", "FN", "flag"),
    ("Active", "Active", "flag"),
    ("sales_channel_id", "sales_channel_id", "channel"),
]
HM_ITEM_FEATURES_V1: list[FeatureSpec] = [  # vocab format 1 (no feature lists in the file)
    ("article_id", "article_id", "string"),
    *((c, c, "string") for c in ITEM_ATTRIBUTE_COLUMNS),
    ("price_bucket", "price", "price"),
]
# The article's recent sales and time on sale, as of when the item is embedded: the popularity that
# drifts week to week (new articles take off, old ones fade) which the static id embedding averages
# away. Training rows carry them as of the start of their week (feature_store.views); the trainer then
# draws in-batch negatives from the same week only (training.two_tower.groups).
ACTIVITY_FEATURES: list[FeatureSpec] = [
    ("sales_7d_bucket", "sales_7d", "count"),
    ("days_on_sale_bucket", "days_on_sale", "days"),
]
HM_ITEM_FEATURES: list[FeatureSpec] = [*HM_ITEM_FEATURES_V1, *ACTIVITY_FEATURES]
_SOURCE = {"customer_id": "customers", "article_id": "articles"}
DEFAULT_AGE_EDGES = [20.0, 25.0, 30.0, 35.0, 40.0, 45.0, 50.0, 55.0, 60.0]
SALES_CHANNELS = [1, 2]
_FLAG_SIZE = 3  # FN / Active: 0 missing, 1 == 1.0, 2 any other value
N_NUMERIC_BUCKETS = 10
COUNT_EDGES = [float(2**k) for k in range(13)]  # 0 | 1 | 2-3 | 4-7 | ... | >= 4096
DAY_EDGES = [1.0, 3.0, 7.0, 14.0, 21.0, 28.0, 42.0, 56.0, 84.0, 112.0, 182.0, 365.0]  # 0: not sold yet


def dataset_features(roles: Any) -> tuple[list[FeatureSpec], list[FeatureSpec]]:
    """Query and item features for a dataset's declared roles (`feature_store.dataset.Roles`)."""
    if roles is None or roles.is_hm:
        return list(HM_QUERY_FEATURES), list(HM_ITEM_FEATURES)
    query: list[FeatureSpec] = [("customer_id", "customer_id", "string")]
    query += [(c, c, "string") for c in roles.user_categorical]
    query += [(f"{c}_bucket", c, "bucket") for c in roles.user_numeric]
    if roles.has_channel:
        query.append(("sales_channel_id", "sales_channel_id", "channel"))
    item: list[FeatureSpec] = [("article_id", "article_id", "string")]
    item += [(c, c, "string") for c in roles.item_categorical]
    item += [(f"{c}_bucket", c, "bucket") for c in roles.item_numeric]
    if roles.has_price:
        item.append(("price_bucket", "price", "price"))
    for specs in (query, item):
        names = [n for n, _, _ in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"feature names clash: {names}")
    return query, item


def query_columns(vocab: FeatureVocab) -> list[str]:
    """Profile and context columns the query features read (besides month and history)."""
    return list(dict.fromkeys(col for _, col, _ in vocab.query_features))


def item_columns(vocab_or_features: FeatureVocab | list[FeatureSpec]) -> list[str]:
    feats = vocab_or_features.item_features if isinstance(vocab_or_features, FeatureVocab) else vocab_or_features
    return list(dict.fromkeys(col for _, col, _ in feats))


@dataclass
class FeatureVocab:
    """Every lookup table the encoders need; JSON-serialisable so serving can load it without torch.

    `query_features` / `item_features` are the towers' features in model order (H&M's by default;
    a dataset config's declared roles otherwise), so a run's vocab.json says what its towers read.
    """

    strings: dict[str, list[str]]
    age_edges: list[float] = field(default_factory=lambda: list(DEFAULT_AGE_EDGES))
    price_edges: list[float] = field(default_factory=list)
    sales_channels: list[int] = field(default_factory=lambda: list(SALES_CHANNELS))
    query_features: list[FeatureSpec] = field(default_factory=lambda: list(HM_QUERY_FEATURES))
    item_features: list[FeatureSpec] = field(default_factory=lambda: list(HM_ITEM_FEATURES))
    numeric_edges: dict[str, list[float]] = field(default_factory=dict)
    _index_cache: dict[str, pd.Index] = field(default_factory=dict, init=False, repr=False, compare=False)
    _dict_cache: dict[str, dict[str, int]] = field(default_factory=dict, init=False, repr=False, compare=False)

    # -- fitting and persistence ------------------------------------------------------------
    @classmethod
    def fit(cls, articles: pd.DataFrame, customers: pd.DataFrame, n_price_buckets: int = 10,
            roles: Any = None, channels: Sequence[int] | None = None) -> FeatureVocab:
        """Learn string vocabularies (sorted, so a refit on the same data gives the same ids), price
        edges and the edges of declared numeric columns; `roles` None: the H&M features.
        `channels`: the sales-channel codes (default H&M's 1 and 2)."""
        query, item = dataset_features(roles)
        frames = {"articles": articles, "customers": customers}
        strings, edges = {}, {}
        for specs, src in ((query, "customers"), (item, "articles")):
            for name, col, kind in specs:
                if kind == "string":
                    strings[name] = _sorted_unique(frames[_SOURCE.get(col, src)][col])
                elif kind == "bucket":
                    edges[name] = _quantile_edges(frames[src][col], N_NUMERIC_BUCKETS)
        channels = sorted({int(c) for c in channels}) if channels is not None else list(SALES_CHANNELS)
        price = articles["price"] if "price" in articles.columns else pd.Series([], dtype=float)
        return cls(strings=strings, price_edges=_quantile_edges(price, n_price_buckets), sales_channels=channels,
                   query_features=query, item_features=item, numeric_edges=edges)

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": VOCAB_FORMAT,
            "strings": self.strings,
            "age_edges": self.age_edges,
            "price_edges": self.price_edges,
            "sales_channels": self.sales_channels,
            "query_features": [list(f) for f in self.query_features],
            "item_features": [list(f) for f in self.item_features],
            "numeric_edges": self.numeric_edges,
        }
        p.write_text(json.dumps(payload))
        return p

    @classmethod
    def load(cls, path: str | Path) -> FeatureVocab:
        raw: dict[str, Any] = json.loads(Path(path).read_text())
        if raw.get("format") not in (1, VOCAB_FORMAT):
            raise ValueError(f"{path}: unsupported vocab format {raw.get('format')!r}")
        return cls(
            strings={k: list(v) for k, v in raw["strings"].items()},
            age_edges=[float(x) for x in raw["age_edges"]],
            price_edges=[float(x) for x in raw["price_edges"]],
            sales_channels=[int(x) for x in raw["sales_channels"]],
            query_features=[tuple(f) for f in raw.get("query_features", HM_QUERY_FEATURES)],  # type: ignore[misc]
            item_features=[tuple(f) for f in raw.get("item_features", HM_ITEM_FEATURES_V1)],  # type: ignore[misc]
            numeric_edges={k: [float(x) for x in v] for k, v in raw.get("numeric_edges", {}).items()},
        )

    # -- sizes ------------------------------------------------------------------------------
    def cardinality(self, feature: str) -> int:
        """Rows an embedding table for `feature` needs, including the unknown row 0."""
        if feature in self.strings:
            return len(self.strings[feature]) + 1
        kind = {n: k for n, _, k in (*self.query_features, *self.item_features)}.get(feature)
        sizes = {
            "age": len(self.age_edges) + 2,
            "price": len(self.price_edges) + 2,
            "channel": len(self.sales_channels) + 1,
            "flag": _FLAG_SIZE,
            "bucket": len(self.numeric_edges.get(feature, [])) + 2,
            "count": len(COUNT_EDGES) + 2,
            "days": len(DAY_EDGES) + 2,
        }
        if kind is None:  # the H&M names, for vocabs built by hand
            kind = {"age_bucket": "age", "price_bucket": "price", "sales_channel_id": "channel", "FN": "flag",
                    "Active": "flag", "sales_7d_bucket": "count", "days_on_sale_bucket": "days"}[feature]
        return sizes[kind]

    @property
    def query_names(self) -> list[str]:
        return [n for n, _, _ in self.query_features]

    @property
    def item_names(self) -> list[str]:
        return [n for n, _, _ in self.item_features]

    def query_cardinalities(self) -> dict[str, int]:
        return {f: self.cardinality(f) for f in self.query_names}

    def item_cardinalities(self) -> dict[str, int]:
        return {f: self.cardinality(f) for f in self.item_names}

    @property
    def reads_activity(self) -> bool:
        """Whether the item tower reads time-dependent activity (ACTIVITY_FEATURES)."""
        return any(f in self.item_features for f in ACTIVITY_FEATURES)

    @property
    def n_articles(self) -> int:
        """Rows of the article-id table shared by item ids and purchase history."""
        return self.cardinality("article_id")

    # -- lookups ----------------------------------------------------------------------------
    def lookup(self, feature: str, values: pd.Series | Sequence[Any] | np.ndarray) -> np.ndarray:
        """Map strings to 1-based indices; unknown or missing values to 0."""
        if len(values) <= _SMALL:  # serving: a request's few values; a dict beats pandas' setup cost
            return self._lookup_small(feature, values)
        index = self._index_cache.get(feature)
        if index is None:
            index = pd.Index(self.strings[feature], dtype=object)
            self._index_cache[feature] = index
        codes = index.get_indexer(_as_strings(values))
        return (codes + 1).astype(np.int64)

    def _lookup_small(self, feature: str, values: pd.Series | Sequence[Any] | np.ndarray) -> np.ndarray:
        codes = self._dict_cache.get(feature)
        if codes is None:
            codes = self._dict_cache[feature] = {v: i for i, v in enumerate(self.strings[feature], start=1)}
        seq = values.tolist() if isinstance(values, pd.Series | np.ndarray) else list(values)
        return np.array([0 if _missing(v) else codes.get(str(v), 0) for v in seq], dtype=np.int64)

    def encode_feature(self, spec: FeatureSpec, frame: Frame) -> np.ndarray:
        """One feature's int64 codes for the rows of `frame` (a missing column: all unknown)."""
        name, col, kind = spec
        values = _col(frame, col, frame_rows(frame))
        if kind == "string":
            return self.lookup(name, values)
        if kind == "age":
            return _bucketize(values, self.age_edges)
        if kind == "price":
            return _bucketize(values, self.price_edges)
        if kind == "bucket":
            return _bucketize(values, self.numeric_edges.get(name, []))
        if kind == "count":
            return _bucketize(values, COUNT_EDGES)
        if kind == "days":
            return _bucketize(values, DAY_EDGES)
        if kind == "flag":
            return _flag(values)
        if kind == "channel":
            return _fixed_codes(values, self.sales_channels)
        raise ValueError(f"unknown feature kind {kind!r} of {name!r}")


# -- encoders -------------------------------------------------------------------------------------
def encode_queries(vocab: FeatureVocab, frame: Frame, history_len: int) -> dict[str, np.ndarray]:
    """Encode query rows (profile + request context + history). Missing context columns count as unknown.

    `frame`: a DataFrame, or for a request's few rows the same columns as lists (`as_columns`),
    which skips pandas' set-up cost on the serving path; both give the same codes."""
    n = frame_rows(frame)
    out: dict[str, np.ndarray] = {name: vocab.encode_feature((name, col, kind), frame)
                                  for name, col, kind in vocab.query_features}
    out[DENSE] = _month_dense(_col(frame, "month", n))
    hist = _col(frame, HISTORY_COLUMN, n) if _has(frame, HISTORY_COLUMN) else [[]] * n
    out[HIST_VALUES], out[HIST_LENGTHS] = encode_history(vocab, hist, history_len)
    return out


def encode_items(vocab: FeatureVocab, frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Encode article rows (id + attributes + buckets)."""
    return {name: vocab.encode_feature((name, col, kind), frame) for name, col, kind in vocab.item_features}


def encode_history(
    vocab: FeatureVocab, histories: pd.Series | Sequence[Any], history_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Flatten per-row article lists (most recent first, truncated) into jagged values + lengths."""
    truncated = [_as_list(h)[:history_len] for h in histories]
    lengths = np.fromiter((len(h) for h in truncated), dtype=np.int32, count=len(truncated))
    flat = list(itertools.chain.from_iterable(truncated))
    values = vocab.lookup("article_id", flat) if flat else np.zeros(0, dtype=np.int64)
    return values, lengths


def n_rows(encoded: dict[str, np.ndarray]) -> int:
    """Rows in an encoded dict (every dense/categorical array has one entry per row)."""
    key = HIST_LENGTHS if HIST_LENGTHS in encoded else next(iter(encoded))
    return len(encoded[key])


def take_rows(encoded: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    """Select rows of an encoded dict, gathering the jagged history without a Python loop."""
    out = {k: v[idx] for k, v in encoded.items() if k != HIST_VALUES}
    if HIST_VALUES in encoded:
        lengths = encoded[HIST_LENGTHS].astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
        sel_len = lengths[idx]
        total = int(sel_len.sum())
        # position of each output value = its row's start + its rank inside the row
        row_start_out = np.cumsum(sel_len) - sel_len
        gather = np.repeat(starts[idx] - row_start_out, sel_len) + np.arange(total)
        out[HIST_VALUES] = encoded[HIST_VALUES][gather]
    return out


def categorical_names(encoded: dict[str, np.ndarray]) -> list[str]:
    """The one-id-per-row features of an encoded dict, in model (insertion) order."""
    return [k for k in encoded if k not in (HIST_VALUES, HIST_LENGTHS, DENSE)]


def fixed_width_queries(encoded: dict[str, np.ndarray], history_len: int) -> dict[str, np.ndarray]:
    """Encoded queries as fixed-width columns (history zero-padded to `history_len`)."""
    lengths = np.minimum(encoded[HIST_LENGTHS].astype(np.int64), history_len)
    return {
        Q_CAT: np.stack([encoded[f] for f in categorical_names(encoded)], axis=1).astype(np.int64),
        Q_HIST: pad_history(encoded[HIST_VALUES], encoded[HIST_LENGTHS], history_len),
        Q_HIST_LEN: lengths.astype(np.int32),
        Q_DENSE: np.ascontiguousarray(encoded[DENSE], dtype=np.float32),
    }


def fixed_width_items(encoded: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {I_CAT: np.stack([encoded[f] for f in categorical_names(encoded)], axis=1).astype(np.int64)}


def from_fixed_width(columns: dict[str, np.ndarray], query_names: Sequence[str] = QUERY_CATEGORICALS,
                     item_names: Sequence[str] = ITEM_CATEGORICALS) -> dict[str, np.ndarray]:
    """Back to the jagged encoded dict(s) `QueryTower.inputs` / `ItemTower.inputs` take."""
    out: dict[str, np.ndarray] = {}
    if Q_CAT in columns:
        out.update({f: columns[Q_CAT][:, j] for j, f in enumerate(query_names)})
        lengths = columns[Q_HIST_LEN].astype(np.int32)
        out[HIST_VALUES] = columns[Q_HIST][np.arange(columns[Q_HIST].shape[1]) < lengths[:, None]]
        out[HIST_LENGTHS] = lengths
        out[DENSE] = columns[Q_DENSE]
    if I_CAT in columns:
        out.update({f: columns[I_CAT][:, j] for j, f in enumerate(item_names)})
    return out


def pad_history(values: np.ndarray, lengths: np.ndarray, history_len: int) -> np.ndarray:
    """Jagged history (flat values + lengths) -> [n, history_len] int64, zero-padded, truncated."""
    lengths = lengths.astype(np.int64)
    n = len(lengths)
    starts = np.cumsum(lengths) - lengths
    pos = np.arange(int(lengths.sum())) - np.repeat(starts, lengths)
    rows = np.repeat(np.arange(n), lengths)
    keep = pos < history_len
    out = np.zeros((n, history_len), dtype=np.int64)
    out[rows[keep], pos[keep]] = values[keep]
    return out


# -- helpers --------------------------------------------------------------------------------------
def _col(frame: Frame, col: str, n: int) -> pd.Series | list[Any]:
    """A column, one derived from the articles group's columns (days_on_sale), or an all-missing one
    so callers can omit optional context (e.g. sales channel)."""
    if not isinstance(frame, pd.DataFrame):
        return list(frame[col]) if col in frame else [None] * n
    if col in frame.columns:
        return frame[col]
    if col == "days_on_sale" and "first_seen" in frame.columns:
        return pd.Series(days_on_sale(frame["first_seen"], _col(frame, "sales_day", n)), index=frame.index)
    return pd.Series([np.nan] * n, index=frame.index)


def _has(frame: Frame, col: str) -> bool:
    return col in (frame.columns if isinstance(frame, pd.DataFrame) else frame)


def frame_rows(frame: Frame) -> int:
    """Rows of a DataFrame or of a column mapping (`as_columns`)."""
    if isinstance(frame, pd.DataFrame):
        return len(frame)
    return len(next(iter(frame.values()))) if frame else 0


def as_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Row dicts (same keys) as a column mapping that `encode_queries` takes in place of a DataFrame."""
    return {k: [r.get(k) for r in rows] for k in (rows[0] if rows else {})}


def _numbers(values: pd.Series | Sequence[Any]) -> np.ndarray:
    """float64, NaN for missing or non-numeric values (pandas' to_numeric(errors="coerce"))."""
    if isinstance(values, list | tuple):  # a request's few values: no pandas set-up
        return np.array([_to_float(v) for v in values], dtype=np.float64)
    return pd.to_numeric(pd.Series(values) if isinstance(values, np.ndarray) else values,
                         errors="coerce").to_numpy(dtype=np.float64)


def _to_float(v: Any) -> float:
    if v is None or v is pd.NA or isinstance(v, bool):
        return float(v) if isinstance(v, bool) else math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _sorted_unique(values: pd.Series) -> list[str]:
    return sorted(set(_as_strings(values.dropna())))


_SMALL = 64


def _missing(v: Any) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and v != v)


def _as_strings(values: pd.Series | Sequence[Any] | np.ndarray) -> np.ndarray:
    """Object array of str, with missing values kept as None (never the string 'nan')."""
    s = values if isinstance(values, pd.Series) else pd.Series(values, dtype=object)
    mask = s.notna().to_numpy()
    arr = np.full(len(s), None, dtype=object)
    arr[mask] = s[mask].astype(str).to_numpy(dtype=object)
    return arr


def _as_list(h: Any) -> list[Any]:
    if isinstance(h, list):
        return h
    if isinstance(h, np.ndarray | tuple):
        return list(h)
    return []  # None / NaN: no history


def _quantile_edges(prices: pd.Series, n_buckets: int) -> list[float]:
    p = pd.to_numeric(prices, errors="coerce").dropna().to_numpy(dtype=np.float64)
    if len(p) == 0 or n_buckets < 2:
        return []
    edges = np.quantile(p, np.linspace(0.0, 1.0, n_buckets + 1)[1:-1])
    return [float(x) for x in np.unique(edges)]


def _bucketize(values: pd.Series | Sequence[Any], edges: list[float]) -> np.ndarray:
    """1 + bucket for known values, 0 for missing."""
    x = _numbers(values)
    codes = np.searchsorted(np.asarray(edges, dtype=np.float64), x, side="right") + 1
    return np.where(np.isnan(x), 0, codes).astype(np.int64)


def _flag(values: pd.Series | Sequence[Any]) -> np.ndarray:
    x = _numbers(values)
    return np.where(np.isnan(x), 0, np.where(x == 1.0, 1, 2)).astype(np.int64)


def _fixed_codes(values: pd.Series | Sequence[Any], known: list[int]) -> np.ndarray:
    x = _numbers(values)
    codes = np.zeros(len(x), dtype=np.int64)
    for i, v in enumerate(known, start=1):
        codes[x == v] = i
    return codes


def _month_dense(values: pd.Series | Sequence[Any]) -> np.ndarray:
    """Month as a point on the unit circle, so December and January are neighbours; unknown -> (0, 0)."""
    m = _numbers(values)
    angle = 2.0 * np.pi * (m - 1.0) / 12.0
    dense = np.stack([np.sin(angle), np.cos(angle)], axis=1)
    return np.nan_to_num(dense, nan=0.0).astype(np.float32)
