"""One evaluation harness for every model: the same metrics code for baselines and models.

Metrics follow the H&M Kaggle protocol: MAP@12 over customers who bought something in the
test window (average precision divided by min(|actual|, k)), and recall@k = hits / |actual|.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

DEFAULT_KS = (12, 100)


def average_precision_at_k(predicted: Sequence[str], actual: set[str], k: int = 12) -> float:
    """AP@k as in the Kaggle metric; duplicates in `predicted` count once."""
    if not actual:
        return 0.0
    hits, score, seen = 0, 0.0, set()
    for i, p in enumerate(predicted[:k]):
        if p in actual and p not in seen:
            hits += 1
            score += hits / (i + 1)
        seen.add(p)
    return score / min(len(actual), k)


def recall_at_k(predicted: Sequence[str], actual: set[str], k: int) -> float:
    if not actual:
        return 0.0
    return len(set(predicted[:k]) & actual) / len(actual)


def evaluate_lists(
    predictions: Mapping[str, Sequence[str]], truth: Mapping[str, set[str]], ks: Iterable[int] = DEFAULT_KS
) -> dict[str, float]:
    """MAP@12 and recall@k averaged over every customer in `truth` (missing lists score 0)."""
    ks = list(ks)
    maps, recalls = [], {k: [] for k in ks}
    for cid, actual in truth.items():
        pred = list(predictions.get(cid, []))
        maps.append(average_precision_at_k(pred, actual, 12))
        for k in ks:
            recalls[k].append(recall_at_k(pred, actual, k))
    out = {"map@12": float(np.mean(maps)) if maps else 0.0}
    out.update({f"recall@{k}": float(np.mean(v)) if v else 0.0 for k, v in recalls.items()})
    return out


def time_split(transactions: pd.DataFrame, test_days: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.Timestamp]:
    """Train on all but the last `test_days` days; returns (train, test, cutoff)."""
    cutoff = transactions["t_dat"].max() - pd.Timedelta(days=test_days - 1)
    return transactions[transactions["t_dat"] < cutoff], transactions[transactions["t_dat"] >= cutoff], cutoff


def ground_truth(test: pd.DataFrame, max_customers: int, seed: int = 0) -> dict[str, set[str]]:
    """Articles each test customer bought in the window; a seeded sample when there are many."""
    truth = test.groupby("customer_id")["article_id"].agg(set)
    if len(truth) > max_customers:
        truth = truth.sample(n=max_customers, random_state=seed)
    return {str(c): set(a) for c, a in truth.items()}


def popularity_lists(
    train: pd.DataFrame, customers: Iterable[str], purchased: Mapping[str, Iterable[str]], k: int, days: int = 7
) -> dict[str, list[str]]:
    """Most purchased articles of the last training week, minus what the customer already bought.

    The already-bought filter is the one serving applies, used for every model alike.
    """
    end = train["t_dat"].max()
    last = train[train["t_dat"] > end - pd.Timedelta(days=days)]
    ranked = list(last["article_id"].value_counts().index)
    rest = [a for a in train["article_id"].value_counts().index if a not in set(ranked)]
    ranked += rest  # fill beyond the week's catalogue with overall popularity
    out = {}
    for cid in customers:
        bought = set(purchased.get(cid, ()))
        out[cid] = [a for a in ranked[: k + len(bought)] if a not in bought][:k]
    return out


def top_k_exact(
    query_vecs: np.ndarray, item_vecs: np.ndarray, k: int, exclude: list[np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k per query row, optionally excluding item rows per query."""
    scores = query_vecs @ item_vecs.T
    if exclude is not None:
        for r, cols in enumerate(exclude):
            if len(cols):
                scores[r, cols] = -np.inf
    k = min(k, item_vecs.shape[0])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(scores, part, axis=1).argsort(axis=1)[:, ::-1]
    idx = np.take_along_axis(part, order, axis=1)
    return idx, np.take_along_axis(scores, idx, axis=1)
