"""Filtering and ranking of one request's candidates on online features.

One articles-group query per request (the candidates plus the customer's recent purchases,
only the columns the rules and features read) is shared by the business rules and the ranker;
the customer's rows are those the query encoder already read. The work itself is
`training.ranker.RankingStage`, the same code batch recommendations and evaluation run.
"""
from __future__ import annotations

import datetime as dt
from typing import Any

from common.artifacts import Manifest
from common.config import RayrecConfig
from common.workdir import Workdir
from feature_store.online.base import OnlineStore
from feature_store.store import read_online
from ray_apps.schemas import Candidates
from training.filters import RequestFilters
from training.ranker import Ranked, RankerModel, RankingStage
from training.ranking_features import FeatureBlock, RankerFeatures


def item_vectors(wd: Workdir, manifest: Manifest) -> dict[str, Any]:
    """Article id -> vector of the served index version (for the MMR diversity rule)."""
    from training.index import ItemIndex

    ref = manifest.index
    ids, vecs = ItemIndex(wd.from_ref(ref.uri), ref.table, ref.version).vectors()
    return dict(zip(ids, vecs, strict=True))


def ranking_stage(wd: Workdir, manifest: Manifest, cfg: RayrecConfig) -> RankingStage:
    """The run's ranker with the run's filter, diversity and candidate settings."""
    model = RankerModel.load(wd.resolve(manifest.models["ranker"]))
    vectors = item_vectors(wd, manifest) if cfg.ranker.diversity.rule == "mmr" else None
    return RankingStage(model, cfg.ranker, cfg.filters, cfg.serve.n_candidates, vectors)


class OnlineRanker:
    """Business rules + ranker + diversity for one request, reading articles online once."""

    def __init__(self, store: OnlineStore, manifest: Manifest, stage: RankingStage):
        self.store = store
        self.articles_ref = manifest.feature_groups["articles"]
        self.stage = stage

    def rank(
        self,
        cands: Candidates,
        customer: dict[str, Any] | None,
        history: dict[str, Any] | None,
        *,
        channel: int,
        now: dt.date,
        k: int,
        request: RequestFilters | None = None,
    ) -> Ranked:
        return self.rank_explained(cands, customer, history, channel=channel, now=now, k=k, request=request)[0]

    def rank_explained(
        self,
        cands: Candidates,
        customer: dict[str, Any] | None,
        history: dict[str, Any] | None,
        *,
        channel: int,
        now: dt.date,
        k: int,
        request: RequestFilters | None = None,
    ) -> tuple[Ranked, list[dict[str, Any]]]:
        """`rank`, plus the feature values of each returned article (for the prediction log)."""
        keys = self.stage.article_keys(cands.article_ids, history)
        articles = read_online(self.store, self.articles_ref, "articles", keys, self.stage.article_columns(request))
        prep = self.stage.prepare(customer, history, cands.article_ids, cands.scores, articles, channel=channel,
                                  now=now, request=request)
        ranked = self.stage.finish(prep, self.stage.model.predict(prep.block), k)
        pos = {a: i for i, a in enumerate(prep.ids)}
        return ranked, [feature_dict(prep.block, pos[a], self.stage.spec) for a in ranked.article_ids]


def feature_dict(block: FeatureBlock, i: int, spec: RankerFeatures) -> dict[str, Any]:
    """Row i of a feature block by feature name (NaN -> None): what the prediction log keeps."""
    num = block.num[i].tolist()
    out: dict[str, Any] = {n: (None if v != v else v) for n, v in zip(spec.numeric, num, strict=True)}
    out.update(zip(spec.categorical, block.cat[i].tolist(), strict=True))
    return out
