import numpy as np
import pandas as pd
import pytest

from common.config import RankerConfig
from ray_apps.schemas import Candidates, RecommendRequest
from ray_apps.stages.filters import drop_purchased
from training.index import TABLE_NAME, ItemIndex, to_index_rows
from training.ranker import fit_ranker, load_ranker, save_ranker, score
from training.ranking_features import RANKER_FEATURES, candidate_frame, ranking_features


def test_drop_purchased_keeps_order_and_scores():
    c = Candidates(article_ids=["a", "b", "c", "d"], scores=[0.9, 0.8, 0.7, 0.6])
    out = drop_purchased(c, ["b", "zzz"])
    assert out.article_ids == ["a", "c", "d"] and out.scores == [0.9, 0.7, 0.6]


def test_request_schema_rejects_bad_input():
    assert RecommendRequest(customer_id="x").k == 12
    for bad in ({"customer_id": "x", "k": 0}, {"customer_id": "x", "k": "3"}, {"customer_id": 1},
                {"customer_id": "x", "extra": 1}, {"customer_id": ""}):
        with pytest.raises(ValueError):
            RecommendRequest.model_validate(bad)


def _cands(n=20, seed=0):
    rng = np.random.default_rng(seed)
    ids = [f"a{i}" for i in range(n)]
    arts = [{"price": float(rng.random()), "sales_7d": int(rng.integers(50)), "sales_total": 100,
             "product_type_name": "Dress" if i % 2 else "Socks", "index_group_name": "Ladieswear"} for i in range(n)]
    return ids, arts, rng.random(n)


def test_candidate_frame_and_features_for_unknown_customer():
    ids, arts, scores = _cands()
    frame = candidate_frame(None, None, arts, ids, scores, 2)
    x = ranking_features(frame)
    assert list(x.columns) == RANKER_FEATURES and len(x) == len(ids)
    assert (x["type_affinity"] == 0).all() and x["retrieval_rank"].tolist() == list(range(len(ids)))


def test_type_affinity_reflects_history():
    ids, arts, scores = _cands()
    hist = {"n_purchases": 4, "mean_price": 0.5, "type_counts": {"Dress": 3, "Socks": 1}, "index_group_counts": {}}
    x = ranking_features(candidate_frame({"age": 30.0}, hist, arts, ids, scores, 1))
    assert x.loc[1, "type_affinity"] == pytest.approx(0.75) and x.loc[0, "type_affinity"] == pytest.approx(0.25)


def test_ranker_learns_type_affinity(tmp_path):
    """Positives are the candidates of the customer's favourite type: the ranker must find them."""
    rng = np.random.default_rng(0)
    frames, labels = [], []
    for c in range(200):
        ids, arts, scores = _cands(20, seed=c)
        fav = "Dress" if c % 2 else "Socks"
        hist = {"n_purchases": 10, "mean_price": 0.5, "type_counts": {fav: 9}, "index_group_counts": {}}
        f = candidate_frame({"age": 30.0}, hist, arts, ids, scores, 1).assign(customer_id=f"c{c}")
        frames.append(f)
        labels.append(((f["product_type_name"] == fav) & (rng.random(20) < 0.3)).astype(int).to_numpy())
    frame = pd.concat(frames, ignore_index=True)
    model = fit_ranker(frame, np.concatenate(labels), RankerConfig(iterations=30), progress=False)
    path = save_ranker(model, tmp_path / "r.cbm")
    ids, arts, scores = _cands(20, seed=999)
    hist = {"n_purchases": 10, "mean_price": 0.5, "type_counts": {"Dress": 9}, "index_group_counts": {}}
    test = candidate_frame({"age": 30.0}, hist, arts, ids, scores, 1)
    s = score(load_ranker(path), test)
    top = test.iloc[np.argsort(-s)[:5]]
    assert (top["product_type_name"] == "Dress").all()


def test_ranker_without_positives_is_a_clear_error():
    ids, arts, scores = _cands()
    frame = candidate_frame(None, None, arts, ids, scores, 1).assign(customer_id="c")
    with pytest.raises(ValueError, match="no positive labels"):
        fit_ranker(frame, np.zeros(len(frame), int), RankerConfig(iterations=5), progress=False)


def test_item_index_returns_exact_top_k_and_pinned_version(tmp_path):
    import lancedb

    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(300, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    frame = pd.DataFrame({"article_id": [f"{i:010d}" for i in range(300)], "prod_name": "p",
                          "product_type_name": "t", "index_group_name": "g", "garment_group_name": "g",
                          "colour_group_name": "c", "price": 0.01, "stock": [0, 1, None] * 100, "min_age": 0})
    db = lancedb.connect(str(tmp_path))
    v1 = db.create_table(TABLE_NAME, data=to_index_rows(frame, vecs), mode="overwrite").version
    index = ItemIndex(str(tmp_path), TABLE_NAME, v1)
    q = vecs[7]
    ids, sims = index.search(q, 10)
    exact = np.argsort(-(vecs @ q))[:10]
    assert ids == [f"{i:010d}" for i in exact]
    assert sims[0] == pytest.approx(1.0, abs=1e-5) and list(sims) == sorted(sims, reverse=True)
    ids_f, _ = index.search(q, 10, where="in_stock")
    assert all(int(a) % 3 != 0 for a in ids_f)          # stock 0 rows are out of stock
    # a new build (new version) does not change what a reader pinned to v1 sees
    db.create_table(TABLE_NAME, data=to_index_rows(frame.iloc[:50], vecs[:50]), mode="overwrite")
    assert ItemIndex(str(tmp_path), TABLE_NAME, v1).table.count_rows() == 300
