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


def test_the_next_pipeline_run_reads_the_purchases_serving_logged(tmp_path, capsys):
    """`prepare_data` adds the workdir's event log to the transactions (data.event_log, on by
    default) and says so in the data report; `data.event_log: false` leaves the files' data alone."""
    import json

    from common.config import RayrecConfig
    from common.workdir import Workdir
    from feature_store.events import PurchaseEvent, append_log_lines, event_log_dir
    from training.pipeline import prepare_data

    wd = Workdir.at(tmp_path / "run")
    cfg = RayrecConfig.model_validate({"data": {"customers": 40, "articles": 20, "days": 15, "seed": 3}})
    plain = prepare_data(cfg, wd, None)
    tx = plain.transactions
    ev = PurchaseEvent("served-1", tx["customer_id"].iloc[0], tx["article_id"].iloc[0], 0.05,
                       (tx["t_dat"].max() + pd.Timedelta(days=2)).isoformat())
    append_log_lines(event_log_dir(wd), [(ev.timestamp, ev.to_dict())], durable=False)
    raw = prepare_data(cfg, wd, None)
    assert len(raw.transactions) == len(tx) + 1
    last = raw.transactions.iloc[-1]
    assert (last["customer_id"], last["article_id"], last["t_dat"]) == (ev.customer_id, ev.article_id,
                                                                        ev.timestamp.normalize())
    report = json.loads((wd.reports_dir / "data_report.json").read_text())
    assert report["event_log"] == {"logged": 1, "added": 1, "unknown_customer": 0, "unknown_article": 0,
                                   "after_gap": 0, "in_data": 0}
    assert "[data] serving's event log: 1 of 1 logged purchases added" in capsys.readouterr().out
    off = cfg.model_copy(update={"data": cfg.data.model_copy(update={"event_log": False})})
    assert len(prepare_data(off, wd, None).transactions) == len(tx)


def test_a_run_retires_the_versions_its_config_does_not_keep(tmp_path, capsys):
    from common.artifacts import new_manifest
    from common.workdir import Workdir
    from feature_store.online.base import InMemoryOnlineStore
    from feature_store.schema import Feature, FeatureGroup
    from feature_store.store import FeatureStore
    from training.pipeline import retire_old_versions

    prices = FeatureGroup("prices", "item", (Feature("item", "string"), Feature("price", "float64")))
    fs = FeatureStore(Workdir.at(tmp_path), InMemoryOnlineStore())
    refs = []
    for _ in range(3):
        fgv = fs.create_feature_group(prices)
        fgv.insert(pd.DataFrame({"item": ["a", "b"], "price": [1.0, 2.0], "event_time": pd.Timestamp("2020-01-01")}))
        refs.append(fgv.ref)
    manifest = new_manifest("t")
    manifest.feature_groups["prices"] = refs[-1]
    retire_old_versions(fs, manifest, keep=2)
    assert [t for t in fs.online.list_tables() if t.startswith("fg_")] == ["fg_prices_v2", "fg_prices_v3"]
    assert "prices v1: dropped online table fg_prices_v1 (2 rows" in capsys.readouterr().out

    class Down(InMemoryOnlineStore):
        def list_tables(self):
            raise ConnectionError("the store is down")

    fs.online = Down()
    retire_old_versions(fs, manifest, keep=2)  # the run is done: reported, not raised
    assert "could not retire old online tables (the store is down)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="keep_online_versions"):
        load_config(None, {"database": {"keep_online_versions": 1}})
