"""Ranking: score filtered candidates with the CatBoost ranker on online features."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ray_apps.schemas import Candidates, ScoredItem
from training.ranker import load_ranker, score
from training.ranking_features import candidate_frame


class Ranker:
    def __init__(self, model_path: Path):
        self.model = load_ranker(model_path)

    def rank(self, cands: Candidates, customer: dict[str, Any] | None, history: dict[str, Any] | None,
             articles: dict[str, dict[str, Any]], channel: int, k: int) -> list[ScoredItem]:
        if not cands.article_ids:
            return []
        frame = candidate_frame(customer, history, [articles.get(a) for a in cands.article_ids],
                                cands.article_ids, cands.scores, channel)
        s = score(self.model, frame)
        order = np.argsort(-s, kind="stable")[:k]
        return [ScoredItem(article_id=cands.article_ids[i], score=float(s[i])) for i in order]
