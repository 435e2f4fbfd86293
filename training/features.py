"""Vocabularies and encoding for the two-tower model, shared by training, evaluation and serving.

One feature path: the same `encode_queries` / `encode_items` turn a training frame, an evaluation
frame or a single serving request into index arrays, so the model never sees two encodings.
Index 0 is reserved in every vocabulary for unknown or missing values: an id unseen at fit time
maps to row 0 instead of failing, and the trainer drops some ids to 0 so that row learns a
sensible "anonymous" embedding.

Encoded query dict: one int64 array per name in QUERY_CATEGORICALS, the jagged history as
`hist_values` (int64, flat, article indices, most recent first) + `hist_lengths` (int32), and
`dense` (float32, [n, N_QUERY_DENSE]: month sin/cos). Encoded item dict: one int64 array per name
in ITEM_CATEGORICALS.

Fixed-width form (training batches, Ray Data blocks): the same values as 2-D arrays, one row per
example: `q_cat` [n, len(QUERY_CATEGORICALS)] and `i_cat` [n, len(ITEM_CATEGORICALS)] (int64,
model order), `q_hist` [n, history_len] (int64, zero-padded after `q_hist_len` entries) and
`q_dense`. `fixed_width_queries` / `fixed_width_items` convert; `from_fixed_width` converts back.
"""
from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

VOCAB_FORMAT = 1

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
ITEM_COLUMNS = ["article_id", *ITEM_ATTRIBUTE_COLUMNS, "price"]

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
ITEM_CATEGORICALS = ["article_id", *ITEM_ATTRIBUTE_COLUMNS, "price_bucket"]
HIST_VALUES = "hist_values"
HIST_LENGTHS = "hist_lengths"
DENSE = "dense"
N_QUERY_DENSE = 2  # month sin, month cos
Q_CAT, Q_HIST, Q_HIST_LEN, Q_DENSE, I_CAT = "q_cat", "q_hist", "q_hist_len", "q_dense", "i_cat"

# Categoricals whose vocabulary is learned from the data (strings); the rest have fixed encodings.
_STRING_VOCABS = {
    "customer_id": "customers",
    "club_member_status": "customers",
    "fashion_news_frequency": "customers",
    "article_id": "articles",
    **{c: "articles" for c in ITEM_ATTRIBUTE_COLUMNS},
}
DEFAULT_AGE_EDGES = [20.0, 25.0, 30.0, 35.0, 40.0, 45.0, 50.0, 55.0, 60.0]
SALES_CHANNELS = [1, 2]
_FLAG_SIZE = 3  # FN / Active: 0 missing, 1 == 1.0, 2 any other value


@dataclass
class FeatureVocab:
    """Every lookup table the encoders need; JSON-serialisable so serving can load it without torch."""

    strings: dict[str, list[str]]
    age_edges: list[float] = field(default_factory=lambda: list(DEFAULT_AGE_EDGES))
    price_edges: list[float] = field(default_factory=list)
    sales_channels: list[int] = field(default_factory=lambda: list(SALES_CHANNELS))
    _index_cache: dict[str, pd.Index] = field(default_factory=dict, init=False, repr=False, compare=False)

    # -- fitting and persistence ------------------------------------------------------------
    @classmethod
    def fit(cls, articles: pd.DataFrame, customers: pd.DataFrame, n_price_buckets: int = 10) -> FeatureVocab:
        """Learn string vocabularies (sorted, so a refit on the same data gives the same ids) and price edges."""
        frames = {"articles": articles, "customers": customers}
        strings = {col: _sorted_unique(frames[src][col]) for col, src in _STRING_VOCABS.items()}
        return cls(strings=strings, price_edges=_quantile_edges(articles["price"], n_price_buckets))

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": VOCAB_FORMAT,
            "strings": self.strings,
            "age_edges": self.age_edges,
            "price_edges": self.price_edges,
            "sales_channels": self.sales_channels,
        }
        p.write_text(json.dumps(payload))
        return p

    @classmethod
    def load(cls, path: str | Path) -> FeatureVocab:
        raw: dict[str, Any] = json.loads(Path(path).read_text())
        if raw.get("format") != VOCAB_FORMAT:
            raise ValueError(f"{path}: unsupported vocab format {raw.get('format')!r}")
        return cls(
            strings={k: list(v) for k, v in raw["strings"].items()},
            age_edges=[float(x) for x in raw["age_edges"]],
            price_edges=[float(x) for x in raw["price_edges"]],
            sales_channels=[int(x) for x in raw["sales_channels"]],
        )

    # -- sizes ------------------------------------------------------------------------------
    def cardinality(self, feature: str) -> int:
        """Rows an embedding table for `feature` needs, including the unknown row 0."""
        if feature in self.strings:
            return len(self.strings[feature]) + 1
        fixed = {
            "age_bucket": len(self.age_edges) + 2,
            "price_bucket": len(self.price_edges) + 2,
            "sales_channel_id": len(self.sales_channels) + 1,
            "FN": _FLAG_SIZE,
            "Active": _FLAG_SIZE,
        }
        return fixed[feature]

    def query_cardinalities(self) -> dict[str, int]:
        return {f: self.cardinality(f) for f in QUERY_CATEGORICALS}

    def item_cardinalities(self) -> dict[str, int]:
        return {f: self.cardinality(f) for f in ITEM_CATEGORICALS}

    @property
    def n_articles(self) -> int:
        """Rows of the article-id table shared by item ids and purchase history."""
        return self.cardinality("article_id")

    # -- lookups ----------------------------------------------------------------------------
    def lookup(self, feature: str, values: pd.Series | Sequence[Any] | np.ndarray) -> np.ndarray:
        """Map strings to 1-based indices; unknown or missing values to 0."""
        index = self._index_cache.get(feature)
        if index is None:
            index = pd.Index(self.strings[feature], dtype=object)
            self._index_cache[feature] = index
        codes = index.get_indexer(_as_strings(values))
        return (codes + 1).astype(np.int64)


# -- encoders -------------------------------------------------------------------------------------
def encode_queries(vocab: FeatureVocab, frame: pd.DataFrame, history_len: int) -> dict[str, np.ndarray]:
    """Encode query rows (profile + request context + history). Missing context columns count as unknown."""
    n = len(frame)
    out: dict[str, np.ndarray] = {
        "customer_id": vocab.lookup("customer_id", frame["customer_id"]),
        "age_bucket": _bucketize(_col(frame, "age", n), vocab.age_edges),
        "club_member_status": vocab.lookup("club_member_status", _col(frame, "club_member_status", n)),
        "fashion_news_frequency": vocab.lookup("fashion_news_frequency", _col(frame, "fashion_news_frequency", n)),
        "FN": _flag(_col(frame, "FN", n)),
        "Active": _flag(_col(frame, "Active", n)),
        "sales_channel_id": _fixed_codes(_col(frame, "sales_channel_id", n), vocab.sales_channels),
        DENSE: _month_dense(_col(frame, "month", n)),
    }
    hist = frame[HISTORY_COLUMN] if HISTORY_COLUMN in frame.columns else pd.Series([[]] * n)
    out[HIST_VALUES], out[HIST_LENGTHS] = encode_history(vocab, hist, history_len)
    return out


def encode_items(vocab: FeatureVocab, frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Encode article rows (id + attributes + price bucket)."""
    n = len(frame)
    out = {"article_id": vocab.lookup("article_id", frame["article_id"])}
    for col in ITEM_ATTRIBUTE_COLUMNS:
        out[col] = vocab.lookup(col, _col(frame, col, n))
    out["price_bucket"] = _bucketize(_col(frame, "price", n), vocab.price_edges)
    return out


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


def fixed_width_queries(encoded: dict[str, np.ndarray], history_len: int) -> dict[str, np.ndarray]:
    """Encoded queries as fixed-width columns (history zero-padded to `history_len`)."""
    lengths = np.minimum(encoded[HIST_LENGTHS].astype(np.int64), history_len)
    return {
        Q_CAT: np.stack([encoded[f] for f in QUERY_CATEGORICALS], axis=1).astype(np.int64),
        Q_HIST: pad_history(encoded[HIST_VALUES], encoded[HIST_LENGTHS], history_len),
        Q_HIST_LEN: lengths.astype(np.int32),
        Q_DENSE: np.ascontiguousarray(encoded[DENSE], dtype=np.float32),
    }


def fixed_width_items(encoded: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {I_CAT: np.stack([encoded[f] for f in ITEM_CATEGORICALS], axis=1).astype(np.int64)}


def from_fixed_width(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Back to the jagged encoded dict(s) `QueryTower.inputs` / `ItemTower.inputs` take."""
    out: dict[str, np.ndarray] = {}
    if Q_CAT in columns:
        out.update({f: columns[Q_CAT][:, j] for j, f in enumerate(QUERY_CATEGORICALS)})
        lengths = columns[Q_HIST_LEN].astype(np.int32)
        out[HIST_VALUES] = columns[Q_HIST][np.arange(columns[Q_HIST].shape[1]) < lengths[:, None]]
        out[HIST_LENGTHS] = lengths
        out[DENSE] = columns[Q_DENSE]
    if I_CAT in columns:
        out.update({f: columns[I_CAT][:, j] for j, f in enumerate(ITEM_CATEGORICALS)})
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
def _col(frame: pd.DataFrame, col: str, n: int) -> pd.Series:
    """A column, or an all-missing one so callers can omit optional context (e.g. sales channel)."""
    return frame[col] if col in frame.columns else pd.Series([np.nan] * n, index=frame.index)


def _sorted_unique(values: pd.Series) -> list[str]:
    return sorted(set(_as_strings(values.dropna())))


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


def _bucketize(values: pd.Series, edges: list[float]) -> np.ndarray:
    """1 + bucket for known values, 0 for missing."""
    x = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    codes = np.searchsorted(np.asarray(edges, dtype=np.float64), x, side="right") + 1
    return np.where(np.isnan(x), 0, codes).astype(np.int64)


def _flag(values: pd.Series) -> np.ndarray:
    x = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    return np.where(np.isnan(x), 0, np.where(x == 1.0, 1, 2)).astype(np.int64)


def _fixed_codes(values: pd.Series, known: list[int]) -> np.ndarray:
    x = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    codes = np.zeros(len(x), dtype=np.int64)
    for i, v in enumerate(known, start=1):
        codes[x == v] = i
    return codes


def _month_dense(values: pd.Series) -> np.ndarray:
    """Month as a point on the unit circle, so December and January are neighbours; unknown -> (0, 0)."""
    m = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    angle = 2.0 * np.pi * (m - 1.0) / 12.0
    dense = np.stack([np.sin(angle), np.cos(angle)], axis=1)
    return np.nan_to_num(dense, nan=0.0).astype(np.float32)
