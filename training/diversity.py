"""Diversity re-ranking of the final list: plain functions over ranked positions.

`max_per_group`: walk the ranked list and take an item unless its group (product type) already
has `max_per` items in the list; skipped items fill the tail only when too few remain.
`mmr`: maximal marginal relevance on unit item vectors,
    argmax_i  lambda * relevance(i) - (1 - lambda) * max_{j chosen} cos(i, j),
with the ranker scores min-max scaled to [0, 1] as relevance.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.config import DiversityConfig


def max_per_group(order: Sequence[int], groups: Sequence[object], max_per: int, k: int) -> list[int]:
    """The first `k` positions of `order` with at most `max_per` per group (None is a group too)."""
    if max_per < 1:
        raise ValueError(f"max_per must be >= 1, got {max_per}")
    counts: dict[object, int] = {}
    chosen: list[int] = []
    overflow: list[int] = []
    for i in order:
        g = groups[i]
        if counts.get(g, 0) < max_per:
            counts[g] = counts.get(g, 0) + 1
            chosen.append(i)
            if len(chosen) == k:
                return chosen
        else:
            overflow.append(i)
    return chosen + overflow[: k - len(chosen)]


def mmr(order: Sequence[int], scores: np.ndarray, vectors: np.ndarray, k: int, lam: float) -> list[int]:
    """Greedy MMR over the positions in `order` (scores and vectors indexed by position).

    A candidate without a vector (a zero row) is never penalised for similarity.
    """
    order = list(order)
    if not order or k <= 0:
        return []
    s = np.asarray(scores, dtype=np.float64)[order]
    span = s.max() - s.min()
    rel = (s - s.min()) / span if span > 0 else np.ones_like(s)
    v = np.asarray(vectors, dtype=np.float32)[order]
    sims = v @ v.T
    chosen = [0]  # the best-scored item always leads
    max_sim = sims[0].copy()
    taken = np.zeros(len(order), dtype=bool)
    taken[0] = True
    while len(chosen) < min(k, len(order)):
        value = lam * rel - (1.0 - lam) * max_sim
        value[taken] = -np.inf
        j = int(np.argmax(value))
        chosen.append(j)
        taken[j] = True
        max_sim = np.maximum(max_sim, sims[j])
    return [order[j] for j in chosen]


def rerank(
    cfg: DiversityConfig,
    scores: np.ndarray,
    k: int,
    groups: Sequence[object] | None = None,
    vectors: np.ndarray | None = None,
) -> list[int]:
    """Positions of the final top `k`, best first, by the configured rule."""
    order = [int(i) for i in np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")]
    if cfg.rule == "none":
        return order[:k]
    if cfg.rule == "max_per_type":
        if groups is None:
            raise ValueError("diversity rule max_per_type needs the candidates' product types")
        return max_per_group(order, groups, cfg.max_per_type, k)
    if vectors is None:
        raise ValueError("diversity rule mmr needs the candidates' item vectors")
    return mmr(order, scores, vectors, k, cfg.mmr_lambda)
