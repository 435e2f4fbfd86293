"""Online feature vectors: key order, per-row status, one query per group, the TTL cache."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from common.workdir import Workdir
from feature_store.feature_view import FeatureSelection, FeatureView, TTLCache
from feature_store.online.base import InMemoryOnlineStore
from feature_store.schema import Feature, FeatureGroup
from feature_store.store import FeatureStore
from feature_store.transformations import Transformation

ITEMS = FeatureGroup("items", "item", (Feature("item", "string"), Feature("price", "float64"), Feature("n", "int64"),
                                       Feature("kind", "string"), Feature("tags", "list_string")))
USERS = FeatureGroup("users", "user_id", (Feature("user_id", "int64"), Feature("age", "float64")))


@pytest.fixture
def fs(tmp_path):
    fs = FeatureStore(Workdir.at(tmp_path), InMemoryOnlineStore())
    items = fs.create_feature_group(ITEMS)
    items.insert(pd.DataFrame({"item": [f"i{i}" for i in range(50)], "price": [i / 10 for i in range(50)],
                               "n": list(range(50)), "kind": ["a", "b"] * 25, "tags": [["x"] * (i % 3) for i in range(50)]}),
                 event_time="2020-01-01")
    users = fs.create_feature_group(USERS)
    users.insert(pd.DataFrame({"user_id": [1, 2], "age": [30.0, None]}), event_time="2020-01-01")
    return fs


def test_rows_in_key_order_with_status_and_no_exception_for_missing_keys(fs):
    fv = fs.create_feature_view(FeatureView("items_only", (FeatureSelection("items"),)))
    keys = ["i7", "nope", "i3", "i7"]
    v = fv.get_feature_vectors(keys)
    assert v.keys == keys and v.status == ["complete", "missing", "complete", "complete"]
    assert v.missing_groups == [(), ("items",), (), ()]
    assert fv.get_feature_vectors([None, "i1"]).status == ["missing", "complete"]
    assert v.columns["kind"] == ["b", None, "b", "b"] and v.columns["tags"] == [["x"], None, [], ["x"]]
    assert isinstance(v.columns["price"], np.ndarray) and math.isnan(v.columns["price"][1])
    assert v.columns["price"][[0, 2, 3]].tolist() == [0.7, 0.3, 0.7]
    assert v.rows()[2] == {"price": 0.3, "n": 3.0, "kind": "b", "tags": []}
    assert v.to_numpy(["price", "n"]).shape == (4, 2)
    assert fv.get_feature_vectors([]).status == []
    all_found = fv.get_feature_vectors(["i1", "i2"])
    assert all_found.columns["n"].dtype == np.int64


@pytest.mark.parametrize("cached", [False, True])
def test_a_key_no_row_can_have_is_a_missing_row_and_a_wrong_type_an_error(fs, cached):
    """A string longer than a key may be, or an integer outside int64, cannot be stored: its row
    is missing, like any other absent key. A key of another type is the caller's mistake."""
    fv = fs.create_feature_view(FeatureView("two", (FeatureSelection("items", ("price",)),
                                                    FeatureSelection("users", ("age",)))))
    if cached:
        fv.enable_cache("items", ttl_s=60)
    keys = [{"item": "i1", "user_id": 1}, {"item": "x" * 65, "user_id": 2}, {"item": "i2", "user_id": 2**70}]
    v = fv.get_feature_vectors(keys)
    assert v.status == ["complete", "missing", "missing"]
    assert v.missing_groups == [(), ("items",), ("users",)]
    assert v.columns["price"][[0, 2]].tolist() == [0.1, 0.2] and math.isnan(v.columns["price"][1])
    with pytest.raises(ValueError, match="invalid key 'one': expected an integer"):
        fv.get_feature_vectors([{"item": "i1", "user_id": "one"}])


def test_one_statement_for_all_groups_whatever_the_number_of_keys(fs):
    fv = fs.create_feature_view(FeatureView("two", (FeatureSelection("items", ("price",)),
                                                    FeatureSelection("users", ("age",)))))
    online = fs.online
    fv.get_feature_vectors([{"item": "i1", "user_id": 1}])  # first call reads the registry
    for n in (1, 10, 50):
        before = online.statement_count()
        v = fv.get_feature_vectors([{"item": f"i{i}", "user_id": 1 + i % 3} for i in range(n)])
        assert online.statement_count() - before == 1, n  # one statement reads both groups
        assert v.status[:3] == ["complete", "complete", "missing"][: min(n, 3)]
    with pytest.raises(ValueError, match="pass keys as dicts"):
        fv.get_feature_vectors(["i1"])


def test_cache_serves_slow_groups_until_the_ttl_expires(fs):
    fv = fs.create_feature_view(FeatureView("cached", (FeatureSelection("items", ("price", "kind")),)))
    now = [0.0]
    cache = fv.enable_cache("items", ttl_s=60)
    cache.clock = lambda: now[0]
    online = fs.online
    first = fv.get_feature_vectors(["i1", "i2", "nope"])
    before = online.statement_count()
    again = fv.get_feature_vectors(["i2", "i1"])
    assert online.statement_count() == before  # all from the cache
    assert again.columns["price"].tolist() == [0.2, 0.1] and first.status[2] == "missing"
    fs.get_feature_group("items").insert(pd.DataFrame({"item": ["i1"], "price": [9.0], "n": [1], "kind": ["a"],
                                                       "tags": [[]]}), event_time="2020-01-02")
    before = online.statement_count()
    assert fv.get_feature_vectors(["i1"]).columns["price"].tolist() == [0.1]  # stale within the TTL
    assert online.statement_count() == before
    now[0] = 61.0
    fresh = fv.get_feature_vectors(["i1", "i3"])
    assert online.statement_count() == before + 1 and fresh.columns["price"].tolist() == [9.0, 0.3]
    assert cache.hits >= 2 and cache.misses >= 3


def test_ttl_cache_is_bounded():
    c = TTLCache(10, max_entries=2, clock=lambda: 0.0)
    c.put_many({"a": (1,), "b": (2,), "c": (3,)})
    assert c.lookup(["a", "b", "c"]) == ({"b": (2,), "c": (3,)}, ["a"])


def test_ttl_cache_lookup_refreshes_due_keys_only_with_a_read_that_happens_anyway():
    """A lookup that has to read (a key missing or expired) also asks again for the requested
    keys in the last half of their life; one that has everything fresh reads nothing, however
    old its entries; young entries are never read again; nothing outlives ttl_s."""
    now = [0.0]
    c = TTLCache(10, clock=lambda: now[0])
    c.put_many({"old": (1,)})
    now[0] = 6.0
    c.put_many({"young": (2,)})
    now[0] = 7.0  # "old" is 7 s into its 10, "young" 1 s
    assert c.lookup(["old", "young"]) == ({"old": (1,), "young": (2,)}, [])  # all fresh: no read
    assert c.lookup(["young", "new", "old", "new"]) == ({"old": (1,), "young": (2,)}, ["new", "old"])
    assert (c.hits, c.misses, c.refreshed) == (4, 1, 1)
    now[0] = 10.0  # "old" has expired: a miss, not a refresh
    assert c.lookup(["old", "young"]) == ({"young": (2,)}, ["old"])  # "young" is 4 s old: not due
    now[0] = 12.0
    assert c.lookup(["old", "young"]) == ({"young": (2,)}, ["old", "young"])  # now it is due
    none_ahead = TTLCache(10, clock=lambda: now[0], refresh_ahead=0)
    none_ahead.put_many({"a": (1,)})
    now[0] = 21.9
    assert none_ahead.lookup(["a", "b"]) == ({"a": (1,)}, ["b"])
    with pytest.raises(ValueError, match="refresh_ahead"):
        TTLCache(10, refresh_ahead=1.5)


def test_transformations_unit():
    t = Transformation("x", "standard_scaler")
    p = t.fit([1.0, 2.0, 3.0, None])
    assert np.allclose(t.apply([2.0, None], p)["x"][:1], [0.0]) and math.isnan(t.apply([None], p)["x"][0])
    mm = Transformation("x", "min_max_scaler")
    assert mm.apply([5.0], mm.fit([0, 10]))["x"].tolist() == [0.5]
    le = Transformation("c", "label_encoder")
    assert le.apply(["b", "a", "zz", None], le.fit(["b", "a", "b"]))["c"].tolist() == [1, 0, -1, -1]
    oh = Transformation("c", "one_hot_encoder")
    out = oh.apply(["b", "zz"], oh.fit(["a", "b"]))
    assert {k: v.tolist() for k, v in out.items()} == {"c__0": [0.0, 0.0], "c__1": [1.0, 0.0]}
    b = Transformation("x", "bucketizer", {"boundaries": [10, 20]})
    assert b.apply([5, 10, 15, 20, None], b.fit([]))["x"].tolist() == [0, 1, 1, 2, -1]
    with pytest.raises(ValueError, match="increasing"):
        Transformation("x", "bucketizer", {"boundaries": [2, 1]})
    with pytest.raises(ValueError, match="unknown kind"):
        Transformation("x", "pca")


def test_ttl_cache_forget_drops_only_the_named_keys():
    c = TTLCache(10, clock=lambda: 0.0)
    c.put_many({"a": (1,), "b": (2,), "absent": None})
    c.forget(["a", "not-cached"])
    assert c.lookup(["a", "b", "absent"]) == ({"b": (2,), "absent": None}, ["a"])  # None: remembered as not stored
