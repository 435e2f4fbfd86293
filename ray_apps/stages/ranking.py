"""Filtering and ranking of one request's candidates on online features.

One articles-group query per call (the candidates plus the customer's recent purchases,
only the columns the rules and features read) is shared by the business rules and the ranker,
and by every request of a batch (`rank_many`: what @serve.batch hands over);
the customer's rows are those the query encoder already read. With `cache_ttl_s` > 0 the
article rows read are kept in process for that long (`serve.article_cache_ttl_s`), and only
the keys not cached are read: a request's candidates overlap heavily with the previous ones',
so most of its articles query and its decoding is saved, at the price of stock and sales
aggregates up to `cache_ttl_s` old (`forget` drops the rows this process's events changed). The work itself is
`training.ranker.RankingStage`, the same code batch recommendations and evaluation run.
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from common.artifacts import Manifest
from common.config import RayrecConfig
from common.workdir import Workdir
from feature_store.feature_view import TTLCache
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


@dataclass
class RankRequest:
    """One request's candidates and context, as the ranking stage takes them."""

    cands: Candidates
    customer: dict[str, Any] | None
    history: dict[str, Any] | None
    channel: int
    now: dt.date
    k: int
    request: RequestFilters | None = None


class OnlineRanker:
    """Business rules + ranker + diversity, reading articles online once per call."""

    def __init__(self, store: OnlineStore, manifest: Manifest, stage: RankingStage, cache_ttl_s: float = 0.0,
                 cache_entries: int = 100_000, on_cache: Callable[[int, int], None] | None = None):
        """`cache_ttl_s` > 0: keep article rows (and the absence of unknown ids) that long, at most
        `cache_entries` of them; `on_cache(hits, misses)` is told each call's counts."""
        self.store = store
        self.articles_ref = manifest.feature_groups["articles"]
        self.stage = stage
        self.cache_ttl_s = cache_ttl_s
        self._cache_entries = cache_entries
        self._caches: dict[tuple[str, ...], TTLCache] = {}  # one per column list the rules ask for
        self._on_cache = on_cache

    def articles(self, keys: list[str], columns: list[str]) -> dict[str, dict[str, Any]]:
        """Article rows of `keys` (absent: not stored): from the cache where fresh, the rest in
        ONE query. A key the store lacks is cached as absent too, so it is not asked again."""
        if self.cache_ttl_s <= 0:
            return read_online(self.store, self.articles_ref, "articles", keys, columns)
        cache = self._caches.get(tuple(columns))
        if cache is None:
            cache = self._caches.setdefault(tuple(columns), TTLCache(self.cache_ttl_s, self._cache_entries))
        rows, todo = cache.lookup(keys)
        missed = sum(1 for k in todo if k not in rows)  # the rest are refreshed ahead
        if todo:
            got = read_online(self.store, self.articles_ref, "articles", todo, columns)
            fetched = {k: atomic_row(got.get(k)) for k in todo}
            cache.put_many(fetched)
            rows.update(fetched)
        if self._on_cache is not None:
            self._on_cache(len(keys) - missed, missed)
        return {k: r for k, r in rows.items() if r is not None}

    def forget(self, keys: Sequence[str]) -> None:
        """Drop cached rows of these articles (their stock or sales just changed here)."""
        for cache in list(self._caches.values()):
            cache.forget(keys)

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
        return self.rank_many([RankRequest(cands, customer, history, channel, now, k, request)])[0][0]

    def rank_many(self, requests: Sequence[RankRequest]) -> list[tuple[Ranked, list[dict[str, Any]]]]:
        """Rank several requests with ONE articles query (the union of their candidates and
        recent purchases) and ONE model call on their stacked feature rows; each gets what
        ranking it alone gives (rows are scored independently), plus the feature values of
        each returned article (for the prediction log)."""
        stage = self.stage
        keys = list(dict.fromkeys(a for r in requests for a in stage.article_keys(r.cands.article_ids, r.history)))
        columns = list(dict.fromkeys(c for r in requests for c in stage.article_columns(r.request)))
        articles = self.articles(keys, columns)
        preps = [stage.prepare(r.customer, r.history, r.cands.article_ids, r.cands.scores, articles,
                               channel=r.channel, now=r.now, request=r.request) for r in requests]
        scores = stage.model.predict(FeatureBlock.concat([p.block for p in preps]))
        out, start = [], 0
        for r, prep in zip(requests, preps, strict=True):
            ranked = stage.finish(prep, scores[start:start + len(prep.block)], r.k)
            start += len(prep.block)
            pos = {a: i for i, a in enumerate(prep.ids)}
            out.append((ranked, [feature_dict(prep.block, pos[a], stage.spec) for a in ranked.article_ids]))
        return out


def atomic_row(row: dict[str, Any] | None) -> dict[str, Any] | None:
    """The row with its list values (an article's regions) as tuples: a row of atomic values is
    one the garbage collector stops tracking, so the cached rows add nothing to the replica's
    full collections (see TTLCache). The rules only test membership in them."""
    if row is None:
        return None
    return {c: tuple(v) if type(v) is list else v for c, v in row.items()}


def feature_dict(block: FeatureBlock, i: int, spec: RankerFeatures) -> dict[str, Any]:
    """Row i of a feature block by feature name (NaN -> None): what the prediction log keeps."""
    num = block.num[i].tolist()
    out: dict[str, Any] = {n: (None if v != v else v) for n, v in zip(spec.numeric, num, strict=True)}
    out.update(zip(spec.categorical, block.cat[i].tolist(), strict=True))
    return out
