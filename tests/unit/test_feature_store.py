import math

import pandas as pd
import pytest

from common.artifacts import new_manifest, read_manifest, write_manifest
from common.workdir import Workdir
from feature_store.online.base import InMemoryOnlineStore
from feature_store.store import FeatureStore, read_online


def _history():
    return pd.DataFrame({
        "customer_id": ["c1", "c2"],
        "purchased": [["a2", "a1"], []],
        "n_purchases": [2, 0],
        "mean_price": [0.02, float("nan")],
        "type_counts": [{"Dress": 2}, {}],
        "index_group_counts": [{"Ladieswear": 2}, {}],
        "last_purchase": ["2020-01-02", None],
    })


def test_write_offline_and_online_then_read_back(tmp_path):
    wd = Workdir.at(tmp_path)
    online = InMemoryOnlineStore()
    fs = FeatureStore(wd, online)
    ref = fs.write("customer_history", _history(), progress=False)
    assert ref.version == 1 and ref.online_table == "fg_customer_history_v1"
    off = fs.read_offline("customer_history", ref)
    assert off.loc[0, "purchased"] == ["a2", "a1"] and off.loc[0, "type_counts"] == {"Dress": 2}
    rows = read_online(online, ref, "customer_history", ["c1", "c2", "nobody"])
    assert set(rows) == {"c1", "c2"}
    assert rows["c1"]["purchased"] == ["a2", "a1"]
    assert rows["c2"]["mean_price"] is None or math.isnan(rows["c2"]["mean_price"])


def test_each_write_is_a_new_version_and_old_one_stays(tmp_path):
    wd = Workdir.at(tmp_path)
    online = InMemoryOnlineStore()
    fs = FeatureStore(wd, online)
    r1 = fs.write("customer_history", _history(), progress=False)
    changed = _history().assign(n_purchases=[5, 1])
    r2 = fs.write("customer_history", changed, progress=False)
    assert r2.version == 2
    assert read_online(online, r1, "customer_history", ["c1"])["c1"]["n_purchases"] == 2
    assert read_online(online, r2, "customer_history", ["c1"])["c1"]["n_purchases"] == 5


def test_missing_columns_named(tmp_path):
    fs = FeatureStore(Workdir.at(tmp_path), InMemoryOnlineStore())
    with pytest.raises(ValueError, match=r"customer_history.*mean_price"):
        fs.write("customer_history", _history().drop(columns=["mean_price"]), progress=False)


def test_manifest_round_trip_and_missing_manifest_message(tmp_path):
    wd = Workdir.at(tmp_path / "run")
    with pytest.raises(RuntimeError, match="rayrec pipeline --workdir"):
        read_manifest(wd)
    m = new_manifest("t")
    m.models["ranker"] = "models/ranker/ranker.cbm"
    write_manifest(wd, m)
    assert read_manifest(wd).models == {"ranker": "models/ranker/ranker.cbm"}
