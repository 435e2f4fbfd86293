"""One evaluation harness for every model: the same metrics code for baselines and models.

Metrics follow the H&M Kaggle protocol: MAP@12 over customers who bought something in the
test window (average precision divided by min(|actual|, k)), recall@k = hits / |actual|,
NDCG@10 with binary relevance, and catalogue coverage (share of the catalogue that appears
in anyone's top 12). Splits: time (the last days held out), random (a share of interactions
held out, as MovieLens papers do) or none (production: train on everything, no evaluation).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

DEFAULT_KS = (10, 12, 50, 100)
NDCG_K = 10
COVERAGE_K = 12


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


def ndcg_at_k(predicted: Sequence[str], actual: set[str], k: int = NDCG_K) -> float:
    """NDCG@k with binary relevance; duplicates in `predicted` count once."""
    if not actual:
        return 0.0
    seen: set[str] = set()
    dcg = 0.0
    for i, p in enumerate(predicted[:k]):
        if p in actual and p not in seen:
            dcg += 1.0 / np.log2(i + 2)
        seen.add(p)
    ideal = sum(1.0 / np.log2(i + 2) for i in range(min(len(actual), k)))
    return dcg / ideal


def evaluate_lists(
    predictions: Mapping[str, Sequence[str]],
    truth: Mapping[str, set[str]],
    ks: Iterable[int] = DEFAULT_KS,
    n_items: int | None = None,
) -> dict[str, float]:
    """MAP@12, recall@k, NDCG@10 (and coverage@12 given the catalogue size), averaged over
    every customer in `truth`; a customer with no list scores 0."""
    ks = list(ks)
    maps, ndcgs, recalls = [], [], {k: [] for k in ks}
    shown: set[str] = set()
    for cid, actual in truth.items():
        pred = list(predictions.get(cid, []))
        maps.append(average_precision_at_k(pred, actual, 12))
        ndcgs.append(ndcg_at_k(pred, actual, NDCG_K))
        shown.update(pred[:COVERAGE_K])
        for k in ks:
            recalls[k].append(recall_at_k(pred, actual, k))
    out = {"map@12": float(np.mean(maps)) if maps else 0.0}
    out.update({f"recall@{k}": float(np.mean(v)) if v else 0.0 for k, v in recalls.items()})
    out[f"ndcg@{NDCG_K}"] = float(np.mean(ndcgs)) if ndcgs else 0.0
    if n_items:
        out[f"coverage@{COVERAGE_K}"] = len(shown) / n_items
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


def random_split(transactions: pd.DataFrame, test_frac: float, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out a random share of interactions (the protocol of MovieLens-style papers)."""
    if not 0.0 < test_frac < 1.0:
        raise ValueError(f"eval.test_frac must be between 0 and 1, got {test_frac}")
    mask = np.random.default_rng(seed).random(len(transactions)) < test_frac
    return transactions[~mask], transactions[mask]


def _without_bought(ranked: list[str], customers: Iterable[str], purchased: Mapping[str, Iterable[str]],
                    k: int) -> dict[str, list[str]]:
    """One shared ranking, per customer minus what they already bought (the serving filter)."""
    out = {}
    for cid in customers:
        bought = set(purchased.get(cid, ()))
        out[cid] = [a for a in ranked[: k + len(bought)] if a not in bought][:k]
    return out


def popularity_lists(
    train: pd.DataFrame, customers: Iterable[str], purchased: Mapping[str, Iterable[str]], k: int, days: int = 7
) -> dict[str, list[str]]:
    """Most purchased articles of the last training week, minus what the customer already bought.

    The already-bought filter is the one serving applies, used for every model alike.
    """
    end = train["t_dat"].max()
    last = train[train["t_dat"] > end - pd.Timedelta(days=days)]
    ranked = list(last["article_id"].value_counts().index)
    week = set(ranked)
    ranked += [a for a in train["article_id"].value_counts().index if a not in week]
    return _without_bought(ranked, customers, purchased, k)


def global_popularity_lists(
    train: pd.DataFrame, customers: Iterable[str], purchased: Mapping[str, Iterable[str]], k: int
) -> dict[str, list[str]]:
    """Most purchased articles over the whole training period, minus the customer's purchases."""
    return _without_bought(list(train["article_id"].value_counts().index), customers, purchased, k)


def repeat_lists(train: pd.DataFrame, customers: Iterable[str], k: int) -> dict[str, list[str]]:
    """The customer's own purchases, most often then most recently bought first.

    The only list evaluated without the already-bought filter: repeating is its whole point.
    """
    tx = train[train["customer_id"].isin(set(customers))]
    stats = tx.groupby(["customer_id", "article_id"])["t_dat"].agg(["size", "max"]).reset_index()
    stats = stats.sort_values(["customer_id", "size", "max"], ascending=[True, False, False])
    lists = stats.groupby("customer_id")["article_id"].agg(lambda s: list(s)[:k]).to_dict()
    return {c: lists.get(c, []) for c in customers}


def ease_lists(
    train: pd.DataFrame, customers: list[str], k: int, lam: float = 100.0, max_items: int = 20_000
) -> dict[str, list[str]] | None:
    """EASE (Steck 2019): closed-form item-item weights B = I - P / diag(P), P = (X'X + lam I)^-1.

    Scores are the customer's purchase vector times B; bought articles are excluded, as in
    serving. None when the catalogue is too large for a dense item x item inverse.
    """
    items = pd.Index(train["article_id"].unique())
    if len(items) > max_items:
        return None
    users = pd.Index(train["customer_id"].unique())
    x = np.zeros((len(users), len(items)), dtype=np.float32)
    x[users.get_indexer(train["customer_id"]), items.get_indexer(train["article_id"])] = 1.0
    g = (x.T @ x).astype(np.float64)
    g[np.diag_indices_from(g)] += lam
    p = np.linalg.inv(g)
    b = -p / np.diag(p)
    b[np.diag_indices_from(b)] = 0.0
    rows = users.get_indexer(customers)
    known = rows >= 0
    out: dict[str, list[str]] = {c: [] for c in customers}
    if known.any():
        xu = x[rows[known]]
        scores = xu @ b.astype(np.float32)
        scores[xu > 0] = -np.inf
        idx, _ = top_k_exact_scores(scores, k)
        for c, r in zip(np.asarray(customers)[known], idx, strict=True):
            out[str(c)] = [items[j] for j in r]
    return out


def top_k_exact_scores(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k column indices and values per row of a score matrix, best first."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(scores, part, axis=1).argsort(axis=1)[:, ::-1]
    idx = np.take_along_axis(part, order, axis=1)
    return idx, np.take_along_axis(scores, idx, axis=1)


def top_k_exact(
    query_vecs: np.ndarray, item_vecs: np.ndarray, k: int, exclude: list[np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k per query row, optionally excluding item rows per query."""
    scores = query_vecs @ item_vecs.T
    if exclude is not None:
        for r, cols in enumerate(exclude):
            if len(cols):
                scores[r, cols] = -np.inf
    return top_k_exact_scores(scores, k)
