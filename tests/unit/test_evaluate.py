import numpy as np
import pandas as pd
import pytest

from training import evaluate as ev


def test_average_precision_matches_kaggle_definition():
    # hits at ranks 1 and 3 of 12, two relevant items: (1/1 + 2/3) / 2
    assert ev.average_precision_at_k(["a", "x", "b"], {"a", "b"}) == pytest.approx((1 + 2 / 3) / 2)
    # denominator is min(|actual|, k)
    assert ev.average_precision_at_k(["a"], {"a", "b", "c"}, k=1) == pytest.approx(1.0)
    # duplicates count once, misses score zero
    assert ev.average_precision_at_k(["a", "a"], {"a", "b"}) == pytest.approx(0.5)
    assert ev.average_precision_at_k(["x", "y"], {"a"}) == 0.0


def test_recall_and_missing_predictions_score_zero():
    truth = {"c1": {"a", "b"}, "c2": {"z"}}
    out = ev.evaluate_lists({"c1": ["a", "q", "b"]}, truth, ks=(1, 3))
    assert out["recall@1"] == pytest.approx((0.5 + 0) / 2)
    assert out["recall@3"] == pytest.approx((1.0 + 0) / 2)
    assert set(out) == {"map@12", "recall@1", "recall@3", "ndcg@10"}
    assert ev.evaluate_lists({"c1": ["a", "q"]}, truth, ks=(1,), n_items=10)["coverage@12"] == pytest.approx(0.2)


def test_ndcg_binary_relevance():
    assert ev.ndcg_at_k(["a", "b"], {"a", "b"}) == pytest.approx(1.0)
    # one hit at rank 2 of two relevant items: (1/log2 3) / (1 + 1/log2 3)
    expect = (1 / np.log2(3)) / (1 + 1 / np.log2(3))
    assert ev.ndcg_at_k(["x", "a"], {"a", "b"}) == pytest.approx(expect)
    assert ev.ndcg_at_k(["x"], set()) == 0.0


def test_random_split_is_seeded_and_checks_fraction():
    tx = pd.DataFrame({"t_dat": pd.Timestamp("2020-01-01"), "customer_id": "c", "article_id": list("abcdefghij") * 100})
    a_train, a_test = ev.random_split(tx, 0.2, seed=1)
    b_train, b_test = ev.random_split(tx, 0.2, seed=1)
    assert a_test.index.equals(b_test.index) and len(a_train) + len(a_test) == len(tx)
    assert 100 < len(a_test) < 300
    with pytest.raises(ValueError, match="test_frac"):
        ev.random_split(tx, 1.5)


def test_repeat_lists_rank_by_count_then_recency():
    tx = pd.DataFrame({
        "t_dat": pd.to_datetime(["2020-01-01", "2020-01-02", "2020-01-03", "2020-01-04"]),
        "customer_id": ["c", "c", "c", "d"],
        "article_id": ["x", "y", "y", "z"],
    })
    assert ev.repeat_lists(tx, ["c", "new"], 5) == {"c": ["y", "x"], "new": []}


def test_ease_learns_co_purchases_and_excludes_history():
    # customers who buy a also buy b; customers who buy c also buy d
    rows = [(f"u{i}", a) for i in range(30) for a in ("a", "b")] + [(f"v{i}", a) for i in range(30) for a in ("c", "d")]
    rows += [("q1", "a"), ("q2", "c")]
    tx = pd.DataFrame(rows, columns=["customer_id", "article_id"]).assign(t_dat=pd.Timestamp("2020-01-01"))
    out = ev.ease_lists(tx, ["q1", "q2", "nobody"], k=1, lam=1.0)
    assert out == {"q1": ["b"], "q2": ["d"], "nobody": []}
    assert ev.ease_lists(tx, ["q1"], k=1, max_items=2) is None


def test_time_split_holds_out_last_days():
    days = pd.date_range("2020-01-01", periods=20, freq="D")
    tx = pd.DataFrame({"t_dat": days, "customer_id": "c", "article_id": "a"})
    train, test, cutoff = ev.time_split(tx, 7)
    assert len(test) == 7 and len(train) == 13
    assert train["t_dat"].max() < cutoff <= test["t_dat"].min()


def test_popularity_uses_last_week_and_drops_purchased():
    tx = pd.DataFrame({
        "t_dat": pd.to_datetime(["2020-01-01"] * 5 + ["2020-01-20"] * 3),
        "customer_id": ["c"] * 8,
        "article_id": ["old"] * 5 + ["new1", "new1", "new2"],
    })
    lists = ev.popularity_lists(tx, ["c1", "c2"], {"c2": ["new1"]}, k=3)
    assert lists["c1"] == ["new1", "new2", "old"]
    assert lists["c2"] == ["new2", "old"]


def test_top_k_exact_with_exclusion():
    q = np.array([[1.0, 0.0]])
    items = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    idx, sc = ev.top_k_exact(q, items, 2)
    assert idx.tolist() == [[0, 1]]
    idx, _ = ev.top_k_exact(q, items, 2, exclude=[np.array([0])])
    assert idx.tolist() == [[1, 2]]
    assert sc[0, 0] >= sc[0, 1]
