import pandas as pd
import pytest

from common.config import load_config
from training.pipeline import compare_to_baselines, make_split


def _tx(days=30):
    d = pd.date_range("2020-01-01", periods=days, freq="D")
    return pd.DataFrame({"t_dat": d.repeat(10), "customer_id": "c", "article_id": [f"a{i}" for i in range(days * 10)]})


def test_time_split_holds_out_the_last_days_with_no_overlap():
    s = make_split(_tx(), load_config(None, {"eval": {"split": "time", "test_days": 7}}))
    assert s.kind == "time" and s.train["t_dat"].max() < s.as_of <= s.test["t_dat"].min()
    assert s.test["t_dat"].nunique() == 7 and s.month == 1
    assert not set(s.train.index) & set(s.test.index)


def test_random_split_uses_all_training_rows_as_history():
    s = make_split(_tx(), load_config(None, {"eval": {"split": "random", "test_frac": 0.25}}))
    assert s.as_of is None and 0.15 < len(s.test) / 300 < 0.35
    assert not set(s.train.index) & set(s.test.index)


def test_no_split_trains_on_everything():
    s = make_split(_tx(), load_config(None, {"eval": {"split": "none"}}))
    assert len(s.train) == 300 and s.test.empty


def test_comparison_says_plainly_when_a_model_loses():
    m = {"ease": {"map@12": 0.2}, "popularity": {"map@12": 0.05}, "retrieval": {"map@12": 0.1}}
    out = compare_to_baselines(m, ("retrieval",), ["ease", "popularity"])
    assert out["best_baseline"] == "ease" and out["retrieval"]["beats_best_baseline"] is False
    assert out["retrieval"]["ratio_vs_best_baseline"] == pytest.approx(0.5)
    assert "does NOT beat" in out["summary"][0]
