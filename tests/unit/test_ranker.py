"""Ranker features, training data, model and the filter -> rank -> diversify stage, at toy size.

The retrieval model is replaced by a stand-in (recent popularity), so these tests need neither
Ray nor the two-tower; the online store is the in-memory fake where one is needed.
"""
import datetime as dt

import numpy as np
import pandas as pd
import pytest

from common.config import FilterConfig, RankerConfig
from feature_store.sources import generate, load_hm
from feature_store.transforms import customer_features
from training import evaluate as ev
from training.filters import RequestFilters
from training.ranker import (
    FEATURE_FORMAT,
    RankerModel,
    RankingStage,
    TrainedRankers,
    build_classifier_data,
    build_ranking_data,
    evaluation_lists,
    fit_classifier,
    fit_ranker,
    load_ranker,
    rank_offline,
    ranking_report,
    rows_as_of,
    save_ranker,
    training_cutoffs,
)
from training.ranking_features import (
    CATEGORICAL_FEATURES,
    FEATURES,
    NUMERIC_FEATURES,
    FeatureBlock,
    recent_types,
    vectorise,
)

N_CAND = 40
CFG = RankerConfig(iterations=60, n_candidates=N_CAND, max_train_customers=400, n_cutoffs=2, train_negatives=30,
                   classifier_negatives=3, diversity={"rule": "none"})


def _col(block: FeatureBlock, name: str) -> np.ndarray:
    return block.num[:, NUMERIC_FEATURES.index(name)]


def test_vectorise_reads_history_context_and_candidates():
    arts = [{"price": 0.02, "sales_7d": 3, "sales_total": 6, "sales_trend": 2, "product_type_name": "Dress",
             "index_group_name": "L"},
            {"price": 0.04, "sales_7d": 0, "sales_total": 10, "sales_trend": -1, "product_type_name": "Socks",
             "index_group_name": "L"},
            None]
    hist = {"purchased": ["x", "a1", "y"], "n_purchases": 4, "mean_price": 0.02, "type_counts": {"Dress": 3},
            "index_group_counts": {"L": 4}, "last_purchase": "2020-09-10"}
    block = vectorise({"age": 30.0, "club_member_status": "ACTIVE"}, hist, arts, [0.9, 0.5, 0.1],
                      article_ids=["a0", "a1", "a2"], channel=1, now=dt.date(2020, 9, 20),
                      recent=["Socks", "Dress", None], window=5)
    assert block.num.dtype == np.float32 and block.num.shape == (3, len(NUMERIC_FEATURES))
    assert block.cat.shape == (3, len(CATEGORICAL_FEATURES)) and FEATURES[-1] == "club_member_status"
    assert _col(block, "retrieval_rank").tolist() == [0, 1, 2]
    assert _col(block, "score_gap") == pytest.approx([0.0, 0.4, 0.8])
    assert _col(block, "type_share") == pytest.approx([0.75, 0.0, 0.0])
    assert _col(block, "index_group_share") == pytest.approx([1.0, 1.0, 0.0])
    assert _col(block, "price_ratio")[:2] == pytest.approx([1.0, 2.0]) and np.isnan(_col(block, "price_ratio")[2])
    assert _col(block, "purchases_since_type").tolist() == [1, 0, 5]  # unknown type: the window
    assert _col(block, "repurchase").tolist() == [0, 1, 0]
    assert _col(block, "days_since_last_purchase").tolist() == [10, 10, 10]
    assert _col(block, "sales_7d_share") == pytest.approx([0.5, 0.0, 0.0])
    assert _col(block, "sales_trend")[:2].tolist() == [2, -1] and np.isnan(_col(block, "sales_trend")[2])
    assert block.cat[0].tolist() == ["Dress", "L", "NA", "NA", "ACTIVE"] and block.cat[2, 0] == "NA"
    with pytest.raises(ValueError, match="lengths differ"):
        vectorise(None, None, arts, [0.1], article_ids=["a"], channel=1, now=dt.date(2020, 1, 1), recent=[], window=3)


def test_days_since_type_counts_days_from_the_last_purchase_of_the_candidates_type():
    arts = [{"product_type_name": "Dress"}, {"product_type_name": "Socks"}, {"product_type_name": "Hat"},
            {"product_type_name": None}, None]
    hist = {"purchased": ["x"], "n_purchases": 3, "last_purchase": "2020-09-18",
            "type_last_day": {"Dress": "2020-09-18", "Socks": "2020-08-21"}}
    block = vectorise(None, hist, arts, [0.5] * 5, article_ids=list("abcde"), channel=1, now=dt.date(2020, 9, 20),
                      recent=[], window=5)
    days = _col(block, "days_since_type")
    assert days[:2].tolist() == [2, 30]
    assert np.isnan(days[2:]).all()  # never bought that type, no type, unknown article
    old_row = {k: v for k, v in hist.items() if k != "type_last_day"}  # a group version without the column
    assert np.isnan(_col(vectorise(None, old_row, arts[:1], [0.5], article_ids=["a"], channel=1,
                                   now=dt.date(2020, 9, 20), recent=[], window=5), "days_since_type")).all()


def test_repurchase_is_zero_for_every_ranked_candidate_under_the_default_filter():
    arts = {a: {"price": 0.02, "product_type_name": "Top", "sales_7d": 1, "sales_total": 2} for a in "abcd"}
    hist = {"purchased": ["a", "b"], "n_purchases": 2}
    stage = RankingStage(_Constant([4, 3, 2, 1]), RankerConfig(diversity={"rule": "none"}), FilterConfig(), 4)
    prep = stage.prepare(None, hist, list("abcd"), [0.9, 0.8, 0.7, 0.6], arts, channel=1, now=dt.date(2020, 9, 1))
    repurchase = prep.block.num[:, list(stage.spec.numeric).index("repurchase")]
    assert prep.ids == ["c", "d"] and repurchase.tolist() == [0, 0]  # bought articles never reach the ranker
    lookback = RankingStage(_Constant([4, 3, 2, 1]), RankerConfig(diversity={"rule": "none"}),
                            FilterConfig(bought_lookback=1), 4)
    prep = lookback.prepare(None, hist, list("abcd"), [0.9, 0.8, 0.7, 0.6], arts, channel=1, now=dt.date(2020, 9, 1))
    repurchase = prep.block.num[:, list(lookback.spec.numeric).index("repurchase")]
    assert prep.ids == ["b", "c", "d"] and repurchase.tolist() == [1, 0, 0]  # bought before the last purchase


def test_vectorise_for_an_unknown_customer_has_no_history_signal():
    arts = [{"price": 0.02, "product_type_name": "Dress"}] * 2
    block = vectorise(None, None, arts, [0.3, 0.2], article_ids=["a", "b"], channel=2, now=dt.date(2020, 1, 1),
                      recent=[], window=4)
    assert (_col(block, "type_share") == 0).all() and (_col(block, "n_purchases") == 0).all()
    assert np.isnan(_col(block, "days_since_type")).all()
    assert np.isnan(_col(block, "age")).all() and np.isnan(_col(block, "days_since_last_purchase")).all()
    assert recent_types(None, {}, 3) == []
    assert recent_types({"purchased": ["a", "z"]}, {"a": {"product_type_name": "T"}}, 3) == ["T", None]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Generated data plus a popularity stand-in for retrieval (same list for everyone)."""
    d = tmp_path_factory.mktemp("tiny")
    generate(d, seed=5, customers=400, articles=150, days=42)
    hm = load_hm(d)
    tx = hm.transactions
    customers_fg = customer_features(hm.customers, hm.extras.get("postal_regions"))
    train, test, cutoff = ev.time_split(tx, 7)

    def popularity(cids, hist, as_of):
        recent = tx[(tx["t_dat"] < as_of) & (tx["t_dat"] >= as_of - pd.Timedelta(days=28))]
        counts = recent["article_id"].value_counts()
        bought = dict(zip(hist["customer_id"], hist["purchased"], strict=True))
        cands, scores = [], []
        for c in cids:
            seen = set(bought.get(c, []))
            top = [a for a in counts.index if a not in seen][:N_CAND]
            cands.append(top)
            scores.append(counts.loc[top].to_numpy(np.float64) / counts.iloc[0])
        return cands, scores

    def score_all(cids, hist, as_of):
        ids = sorted(hm.articles["article_id"])
        counts = tx[tx["t_dat"] < as_of]["article_id"].value_counts().reindex(ids).fillna(0).to_numpy()
        bought = dict(zip(hist["customer_id"], hist["purchased"], strict=True))
        return np.tile(counts / counts.max(), (len(cids), 1)), ids, [set(bought.get(c, [])) for c in cids]

    channel = {c: 1 for c in customers_fg["customer_id"]}
    return hm, customers_fg, train, test, cutoff, popularity, score_all, channel


def test_ranking_data_has_groups_per_customer_and_cutoff(tiny):
    hm, customers_fg, train, _, _, popularity, _, channel = tiny
    data = build_ranking_data(hm.articles, train, customers_fg, hm.extras, popularity, CFG, channel, progress=False)
    cuts = training_cutoffs(train, 2, 7)
    assert cuts[0] - cuts[1] == pd.Timedelta(days=7) and cuts[0] == train["t_dat"].max() - pd.Timedelta(days=6)
    assert [c["as_of"] for c in data.stats["cutoffs"]] == [str(c.date()) for c in cuts]
    assert len(data.labels) == len(data.block) == len(data.group) == data.stats["rows"]
    groups = pd.Series(data.labels).groupby(data.group)
    assert (groups.max() == 1).all()  # every kept group has a positive
    assert (groups.size() <= groups.sum() + CFG.train_negatives).all()  # positives + at most N negatives
    assert np.all(np.diff(data.group) >= 0)  # contiguous groups, as CatBoost wants


def test_training_rows_date_types_from_the_purchases_before_the_cutoff(tiny):
    hm, customers_fg, train, _, _, _, _, _ = tiny
    cut = training_cutoffs(train, 2, 7)[1]
    before = train[train["t_dat"] < cut]
    cid = before["customer_id"].value_counts().index[0]
    state = rows_as_of(hm.articles, before, customers_fg, hm.extras, cut, [cid])
    ids = sorted(hm.articles["article_id"])
    block = vectorise(None, state.history[cid], [state.articles[a] for a in ids], np.zeros(len(ids)), article_ids=ids,
                      channel=1, now=cut.date(), recent=[], window=5)
    types = hm.articles.set_index("article_id")["product_type_name"]
    mine = train[train["customer_id"] == cid]
    last = mine.assign(t=mine["article_id"].map(types)).query("t_dat < @cut").groupby("t")["t_dat"].max()
    expected = [(cut - last[types[a]]).days if types[a] in last.index else np.nan for a in ids]
    np.testing.assert_array_equal(_col(block, "days_since_type"), np.asarray(expected, np.float32))
    assert np.nanmin(expected) >= 1 and np.isfinite(expected).any() and np.isnan(expected).any()


def test_ranker_beats_random_order_and_survives_save_load(tiny, tmp_path):
    hm, customers_fg, train, test, cutoff, popularity, score_all, channel = tiny
    data = build_ranking_data(hm.articles, train, customers_fg, hm.extras, popularity, CFG, channel, progress=False)
    model = fit_ranker(data, CFG, progress=False)
    path = save_ranker(TrainedRankers(model), tmp_path / "ranker.cbm")
    loaded = load_ranker(path)
    assert loaded.kind == "ranker" and loaded.info["groups"] == data.stats["groups"]

    truth = ev.ground_truth(test, 1000)
    cids = sorted(truth)
    state = rows_as_of(hm.articles, train, customers_fg, hm.extras, cutoff, cids)
    cands, scores = popularity(cids, state.history_frame, cutoff)
    stage = RankingStage(loaded, CFG, FilterConfig(drop_sold_out=False, drop_age_restricted=False,
                                                   drop_other_regions=False), N_CAND)
    ranked = rank_offline(stage, state, cids, cands, scores, channel, 12)
    rng = np.random.default_rng(0)
    map_ranked = ev.evaluate_lists(ranked, truth, ks=[12])["map@12"]
    map_random = np.mean([ev.evaluate_lists({c: list(rng.permutation(x)) for c, x in zip(cids, cands, strict=True)},
                                            truth, ks=[12])["map@12"] for _ in range(5)])
    assert map_ranked > 1.5 * map_random, (map_ranked, map_random)
    # the batched offline path and the per-request path give the same list
    c0 = cids[0]
    one = stage.run(state.customers.get(c0), state.history.get(c0), cands[0], scores[0], state.articles,
                    channel=1, now=cutoff.date(), k=12)
    assert one.article_ids == ranked[c0] and len(one.scores) == 12

    clf = fit_classifier(build_classifier_data(hm.articles, train, customers_fg, hm.extras, score_all, CFG, channel),
                         CFG, progress=False)
    lists = evaluation_lists(TrainedRankers(model, clf), CFG, FilterConfig(), state, cids, cands, scores, channel)
    assert set(lists) == {"ranked", "ranked_classifier", "retrieval_filtered", "served"}
    lists["retrieval"] = dict(zip(cids, cands, strict=True))
    rep = ranking_report(lists, truth, TrainedRankers(model, clf))
    assert set(rep["metrics"]["ranked"]) == {"map@12", "ndcg@12"}
    assert "ranked_vs_retrieval_map@12" in rep and "classifier_vs_retrieval_map@12" in rep
    assert set(rep["importance"]) == set(FEATURES)
    # scoring runs on a copy without the training parameters: the same raw scores as the full model
    from catboost import CatBoost, FeaturesData, Pool

    block = stage.prepare(state.customers.get(c0), state.history.get(c0), cands[0], scores[0], state.articles,
                          channel=1, now=cutoff.date()).block
    for m in (loaded, clf):
        full = CatBoost.predict(m.model, Pool(FeaturesData(num_feature_data=block.num, cat_feature_data=block.cat)),
                                prediction_type="RawFormulaVal")
        assert len(block) > 1 and np.array_equal(m.predict(block), np.asarray(full))
        # predict builds its Pool from column-major copies: catboost marks the arrays it keeps
        # read-only, and the caller's block must stay writable (and score the same again)
        assert block.num.flags.writeable and block.cat.flags.writeable
        assert np.array_equal(m.predict(block), np.asarray(full))
        assert "params" in m.model.get_metadata() and "params" not in m._scoring_model().get_metadata()


def test_a_model_of_another_feature_format_is_refused(tiny, tmp_path):
    hm, customers_fg, train, _, _, popularity, _, channel = tiny
    cfg = CFG.model_copy(update={"iterations": 5})
    model = fit_ranker(build_ranking_data(hm.articles, train, customers_fg, hm.extras, popularity, cfg, channel,
                                          progress=False), cfg, progress=False)
    model.model.get_metadata()["rayrec"] = '{"kind": "ranker", "feature_format": 1, "features": []}'
    model.model.save_model(str(tmp_path / "old.cbm"))
    with pytest.raises(ValueError, match=f"feature format 1.*format {FEATURE_FORMAT}: retrain"):
        RankerModel.load(tmp_path / "old.cbm")
    with pytest.raises(FileNotFoundError, match="no ranker model"):
        RankerModel.load(tmp_path / "missing.cbm")


def test_ranker_without_positives_is_a_clear_error(tiny):
    hm, customers_fg, train, _, _, _, _, channel = tiny

    def never_hits(cids, hist, as_of):
        return [["nope"] * 3 for _ in cids], [np.array([0.3, 0.2, 0.1]) for _ in cids]

    with pytest.raises(ValueError, match="no positive labels"):
        build_ranking_data(hm.articles, train, customers_fg, hm.extras, never_hits, CFG, channel, progress=False)


class _Constant:
    """A stand-in model that scores by a fixed per-article preference."""

    kind = "ranker"

    def __init__(self, prefer):
        self.prefer = prefer

    def predict(self, block, thread_count=1):
        return np.asarray(self.prefer[: len(block)], dtype=np.float64)


def test_stage_never_shows_a_minor_an_adult_article_even_when_the_model_loves_it():
    arts = {f"a{i}": {"price": 0.02, "stock": 0.0 if i == 3 else 4.0, "min_age": 18 if i < 2 else 0,
                      "regions": ["north"], "product_type_name": "Bra" if i < 4 else "Top", "index_group_name": "L",
                      "sales_7d": 1, "sales_total": 2} for i in range(8)}
    ids = list(arts)
    cfg = RankerConfig(diversity={"rule": "max_per_type", "max_per_type": 1})
    stage = RankingStage(_Constant([9, 8, 7, 6, 5, 4, 3, 2]), cfg, FilterConfig(), n_rank=5)
    assert stage.article_keys(ids[:2], {"purchased": ["a7", "a0"]}) == ["a0", "a1", "a7"]
    assert {"stock", "min_age", "regions", "price", "product_type_name"} <= set(stage.article_columns())
    assert "index_group_name" in stage.article_columns(RequestFilters(index_groups=("L",)))
    out = stage.run({"age": 17.0, "region": "north"}, {"purchased": ["a7"]}, ids, [0.9 - i / 10 for i in range(8)],
                    arts, channel=2, now=dt.date(2020, 9, 1), k=3)
    assert out.removed == {"already_bought": 1, "sold_out": 1, "age_restricted": 2, "not_in_region": 0}
    assert out.n_candidates == 8 and out.n_after_filter == 4 and out.n_ranked == 4
    # the model's order among survivors a2 a4 a5 a6, at most one Bra: a2 (Bra), a4, a5 (Tops)
    assert out.article_ids == ["a2", "a4", "a5"]
    # every scored survivor with its score, for the prediction log (the shown ones among them)
    assert [a for a, _ in out.candidates] == ["a2", "a4", "a5", "a6"]
    assert all(dict(out.candidates)[a] == pytest.approx(s, abs=1e-5) for a, s in zip(out.article_ids, out.scores,
                                                                                   strict=True))
    adult = stage.run({"age": 30.0, "region": "north"}, None, ids, [0.5] * 8, arts, channel=2,
                      now=dt.date(2020, 9, 1), k=3, request=RequestFilters(max_price=0.01))
    assert adult.article_ids == [] and adult.removed["max_price"] == 7
    with pytest.raises(ValueError, match="needs item vectors"):
        RankingStage(_Constant([]), RankerConfig(diversity={"rule": "mmr"}), FilterConfig(), 5)


def test_rows_as_of_computes_the_history_of_the_customers_asked_for_only(tiny):
    """Their rows equal those of the whole group's computation; nobody else's are made."""
    from feature_store.transforms import customer_history

    hm, customers_fg, train, _test, cutoff, *_ = tiny
    full = customer_history(train, hm.articles, cutoff)
    cids = sorted(full["customer_id"])[::40] + ["not-a-customer"]
    state = rows_as_of(hm.articles, train, customers_fg, hm.extras, cutoff, cids)
    mine = state.history_frame.sort_values("customer_id").reset_index(drop=True)
    assert mine["customer_id"].tolist() == cids[:-1]
    pd.testing.assert_frame_equal(mine, full[full["customer_id"].isin(cids)].sort_values("customer_id")
                                  .reset_index(drop=True))
    assert set(state.history) == set(cids[:-1])
