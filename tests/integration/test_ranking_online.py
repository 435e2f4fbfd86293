"""The ranker's one feature path against the real MariaDB online store.

Training builds feature vectors from the offline feature-group frames as of a cut-off; serving
builds them from the rows the online store returns. With the store holding the same as-of
state, both must give the same vector for every (customer, article, time).
"""
from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from common.artifacts import new_manifest
from common.config import FilterConfig, RankerConfig
from common.workdir import Workdir
from feature_store.online.mysql import MySQLOnlineStore
from feature_store.sources import generate, load_hm
from feature_store.store import FeatureStore, read_online
from feature_store.transforms import article_features, customer_features, customer_history
from ray_apps.schemas import Candidates
from ray_apps.stages.ranking import OnlineRanker
from training.ranker import RankingStage, rows_as_of

pytestmark = pytest.mark.integration


class _ByRank:
    """Stand-in model: keeps retrieval order (the vectors are what these tests are about)."""

    def predict(self, block, thread_count=1):
        return -np.arange(len(block), dtype=np.float64)


@pytest.fixture(scope="module")
def as_of_state(mariadb, tmp_path_factory):
    """Tiny data; the three serving groups as of a past cut-off, offline and in MariaDB."""
    root = tmp_path_factory.mktemp("ranking_online")
    generate(root / "data", seed=7, customers=150, articles=90, days=35)
    hm = load_hm(root / "data")
    as_of = hm.transactions["t_dat"].max() - pd.Timedelta(days=6)
    before = hm.transactions[hm.transactions["t_dat"] < as_of]
    customers_fg = customer_features(hm.customers, hm.extras.get("postal_regions"))
    store = MySQLOnlineStore.from_config(mariadb.cfg, mariadb.password)
    fs = FeatureStore(Workdir.at(root / "wd"), store)
    manifest = new_manifest("ranking-online")
    for name, frame in (("customers", customers_fg),
                        ("articles", article_features(hm.articles, before, as_of, hm.extras)),
                        ("customer_history", customer_history(before, hm.articles, as_of))):
        manifest.feature_groups[name] = fs.write(name, frame, progress=False)
    buyers = before["customer_id"].value_counts().index.tolist()
    never = sorted(set(customers_fg["customer_id"]) - set(buyers))
    cids = [*buyers[:6], *never[:2], "not-a-customer"]
    offline = rows_as_of(hm.articles, before, customers_fg, hm.extras, as_of, cids)
    try:
        yield store, manifest, offline, cids, sorted(hm.articles["article_id"]), as_of, before, hm.articles, fs
    finally:
        store.close()


def test_offline_and_online_feature_vectors_are_equal(as_of_state):
    store, manifest, offline, cids, article_ids, as_of, before, articles, _ = as_of_state
    refs = manifest.feature_groups
    stage = RankingStage(_ByRank(), RankerConfig(), FilterConfig(), n_rank=40)
    rng = np.random.default_rng(0)
    checked = 0
    days_col = list(stage.spec.numeric).index("days_since_type")
    bought_types = 0
    for cid in cids:
        cands = [*rng.choice(article_ids, 39, replace=False).tolist(), "0999999999"]  # one unknown article
        scores = np.sort(rng.random(len(cands)))[::-1]
        cust = read_online(store, refs["customers"], "customers", [cid]).get(cid)
        hist = read_online(store, refs["customer_history"], "customer_history", [cid]).get(cid)
        arts = read_online(store, refs["articles"], "articles", stage.article_keys(cands, hist),
                           stage.article_columns())
        on = stage.prepare(cust, hist, cands, scores, arts, channel=1, now=as_of.date())
        off = stage.prepare(offline.customers.get(cid), offline.history.get(cid), cands, scores, offline.articles,
                            channel=1, now=as_of.date())
        assert on.ids == off.ids and on.stats.removed == off.stats.removed
        np.testing.assert_array_equal(on.block.num, off.block.num)  # NaN == NaN here
        assert on.block.cat.tolist() == off.block.cat.tolist()
        expected = _days_since_type(before, articles, cid, on.ids, as_of)  # from the raw purchases
        np.testing.assert_array_equal(on.block.num[:, days_col], expected)
        bought_types += int(np.isfinite(expected).sum())
        checked += len(on.ids)
    assert checked > 100
    assert bought_types > 20  # candidates of a type the customer bought N > 0 days before the cut-off


def _days_since_type(tx: pd.DataFrame, articles: pd.DataFrame, cid: str, ids: list[str],
                     as_of: pd.Timestamp) -> np.ndarray:
    """Days from the customer's last purchase of each article's product type to `as_of` (NaN: never)."""
    types = articles.set_index("article_id")["product_type_name"]
    mine = tx[tx["customer_id"] == cid]
    last = mine.assign(t=mine["article_id"].map(types)).groupby("t")["t_dat"].max()
    days = [(as_of.normalize() - last[types.get(a)].normalize()).days if types.get(a) in last.index else np.nan
            for a in ids]
    return np.asarray(days, dtype=np.float32)


def test_filter_and_rank_read_the_articles_group_once_per_request(as_of_state):
    store, manifest, offline, cids, article_ids, as_of, _, _, _ = as_of_state
    refs = manifest.feature_groups
    ranker = OnlineRanker(store, manifest, RankingStage(_ByRank(), RankerConfig(), FilterConfig(), n_rank=30))
    cid = cids[0]
    cust = read_online(store, refs["customers"], "customers", [cid]).get(cid)
    hist = read_online(store, refs["customer_history"], "customer_history", [cid]).get(cid)
    cands = Candidates(article_ids=article_ids[:60], scores=list(np.linspace(1, 0, 60)))
    ranker.rank(cands, cust, hist, channel=2, now=dt.date(2020, 9, 1), k=12)  # warm: registry lookup cached
    before = store.statement_count()
    out = ranker.rank(cands, cust, hist, channel=2, now=dt.date(2020, 9, 1), k=12)
    assert store.statement_count() - before == 1
    assert len(out.article_ids) == 12 and out.n_candidates == 60
    bought = set(hist["purchased"])
    assert not bought & set(out.article_ids)
    assert out.removed["already_bought"] == len(bought & set(cands.article_ids))


def test_query_encoder_reads_profile_and_history_in_one_statement(as_of_state):
    from ray_apps.stages.online import OnlineFeatures

    store, manifest, _, cids, _, _, _, _, _ = as_of_state
    refs = manifest.feature_groups
    features = OnlineFeatures(store, manifest)
    asked = [*cids[:5], "no-such-customer"]
    features.customers(asked[:1])  # warm: registry lookups cached
    before = store.statement_count()
    got = features.customers(asked)
    assert store.statement_count() - before == 1
    prof = read_online(store, refs["customers"], "customers", asked)
    hist = read_online(store, refs["customer_history"], "customer_history", asked)
    assert got == {c: (prof.get(c), hist.get(c)) for c in asked}
    assert got["no-such-customer"] == (None, None) and all(got[c][0] is not None for c in cids[:5])


class _RowWise:
    """Stand-in model scoring each row on its own features (as CatBoost does)."""

    def predict(self, block, thread_count=1):
        return np.nansum(block.num.astype(np.float64) * np.linspace(1.0, 0.1, block.num.shape[1]), axis=1)


def test_a_batch_of_requests_ranks_as_each_alone_with_one_read(as_of_state):
    """rank_many (what @serve.batch hands over): one articles query for every request, and each
    request gets exactly the list, scores and filter counts it gets when ranked alone."""
    from ray_apps.stages.ranking import RankRequest
    from training.filters import RequestFilters

    store, manifest, _, cids, article_ids, _, _, _, _ = as_of_state
    refs = manifest.feature_groups
    ranker = OnlineRanker(store, manifest, RankingStage(_RowWise(), RankerConfig(), FilterConfig(), n_rank=40))
    day = dt.date(2020, 9, 1)
    reqs = []
    for i, cid in enumerate(cids[:5]):
        cust = read_online(store, refs["customers"], "customers", [cid]).get(cid)
        hist = read_online(store, refs["customer_history"], "customer_history", [cid]).get(cid)
        ids = article_ids[i * 7: i * 7 + 50]
        flt = RequestFilters(max_price=0.03) if i == 2 else RequestFilters(index_groups=("Ladieswear",)) if i == 3 \
            else None
        reqs.append(RankRequest(Candidates(article_ids=ids, scores=list(np.linspace(1, 0, len(ids)))), cust, hist,
                                2, day, 5 + i, flt))
    alone = [ranker.rank_many([r])[0] for r in reqs]
    before = store.statement_count()
    together = ranker.rank_many(reqs)
    assert store.statement_count() - before == 1
    for (a, fa), (b, fb) in zip(alone, together, strict=True):
        assert b.article_ids == a.article_ids and b.scores == pytest.approx(a.scores)
        assert (b.removed, b.n_after_filter, b.n_ranked) == (a.removed, a.n_after_filter, a.n_ranked)
        assert fb == fa
    assert [len(r.article_ids) for r, _ in together] == [min(5 + i, r.n_after_filter) for i, (r, _) in
                                                         enumerate(together)]
    assert together[2][0].removed.get("max_price", 0) > 0


def test_article_cache_reads_only_what_it_lacks_and_forgets_changed_rows(as_of_state):
    """serve.article_cache_ttl_s: a repeated request reads nothing, new candidates are read
    alone, an unknown id is remembered as absent; a row changed by an event stays as cached
    until `forget` (what the replica applying the event calls), then is read again."""
    from feature_store.events import PurchaseEvent, apply_purchase_event
    from ray_apps.stages.ranking import RankRequest

    store, manifest, _, cids, article_ids, _, _, _, fs = as_of_state
    refs = manifest.feature_groups
    counts = []
    ranker = OnlineRanker(store, manifest, RankingStage(_RowWise(), RankerConfig(), FilterConfig(), n_rank=40),
                          cache_ttl_s=600, on_cache=lambda hits, misses: counts.append((hits, misses)))
    plain = OnlineRanker(store, manifest, RankingStage(_RowWise(), RankerConfig(), FilterConfig(), n_rank=40))
    cid = cids[1]
    cust = read_online(store, refs["customers"], "customers", [cid]).get(cid)
    hist = read_online(store, refs["customer_history"], "customer_history", [cid]).get(cid)
    day = dt.date(2020, 9, 1)
    ids = [*article_ids[40:70], "0999999999"]  # the last one is not stored

    def rank(r: OnlineRanker, ids: list[str]):
        cands = Candidates(article_ids=ids, scores=list(np.linspace(1, 0, len(ids))))
        before = store.statement_count()
        out = r.rank_many([RankRequest(cands, cust, hist, 2, day, 40)])[0]  # k: every survivor
        return out, store.statement_count() - before

    (first, feats), n = rank(ranker, ids)
    cached = set(ids) | set(ranker.stage.article_keys([], hist))  # the candidates and recent purchases
    assert n == 1 and counts[-1] == (0, len(cached))
    (again, feats_again), n = rank(ranker, ids)
    assert n == 0 and counts[-1][1] == 0  # every row, and the absence of 0999999999, from the cache
    assert (again.article_ids, again.scores, feats_again) == (first.article_ids, first.scores, feats)
    assert rank(plain, ids)[0][0].article_ids == first.article_ids  # the same answer as without a cache
    more = [*ids, *article_ids[70:75]]
    _, n = rank(ranker, more)
    assert n == 1 and counts[-1][1] == len(set(article_ids[70:75]) - cached) > 0  # only the new ones asked for

    top = first.article_ids[0]
    was = feats[0]["log_sales_7d"]
    res = apply_purchase_event(fs, refs, PurchaseEvent("cache-test-1", cids[2], top, 0.02, "2020-09-01T12:00:00"),
                               log=False)
    assert res.applied
    (stale, stale_feats), n = rank(ranker, ids)
    assert n == 0 and stale_feats == feats  # within the TTL: the row as cached
    ranker.forget([top])
    (fresh, fresh_feats), n = rank(ranker, ids)
    assert n == 1 and counts[-1][1] == 1  # only the forgotten row is read again
    now = fresh_feats[fresh.article_ids.index(top)]["log_sales_7d"]
    assert now != was  # the purchase moved the article's sales window and counts
    assert (fresh.article_ids, fresh_feats) == (lambda o: (o[0].article_ids, o[1]))(rank(plain, ids)[0])
