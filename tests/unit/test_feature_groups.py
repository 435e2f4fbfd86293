"""Feature group definitions, names and validation on insert (with the in-memory online store)."""
from __future__ import annotations

import pandas as pd
import pytest

from common.workdir import Workdir
from feature_store.groups import (
    ARTICLES,
    CUSTOMER_HISTORY,
    CUSTOMERS,
    GROUPS,
    MAX_TYPE_DAYS,
    TRANSACTIONS,
    recent_type_days,
)
from feature_store.online.base import InMemoryOnlineStore, encode_json
from feature_store.schema import Feature, FeatureGroup, allowed, in_range, not_null
from feature_store.store import FeatureStore
from feature_store.validation import ValidationFailed

SHOP = FeatureGroup(
    "shop",
    "item_id",
    (Feature("item_id", "string"), Feature("price", "float64"), Feature("color", "string"), Feature("n", "int64"),
     Feature("tags", "list_string", limit=3)),
    expectations=(in_range("price", 0, 100), allowed("color", ("red", "blue")), not_null("n")),
)


def shop_frame(**over) -> pd.DataFrame:
    data = {"item_id": ["a", "b", "c"], "price": [1.0, 2.0, 3.0], "color": ["red", "blue", None], "n": [1, 2, 3],
            "tags": [["x"], [], None], "event_time": pd.to_datetime(["2020-01-01", "2020-01-02", "2020-01-03"])}
    data.update(over)
    return pd.DataFrame(data)


@pytest.mark.parametrize("bad", ["Articles", "1st", "a-b", "a b", "fg;drop table x", "x" * 64, "", "é"])
def test_group_and_feature_names_outside_the_pattern_are_refused(bad):
    with pytest.raises(ValueError, match=r"\[a-z\]\[a-z0-9_\]\*") as e:
        FeatureGroup(bad, "k", (Feature("k", "string"),))
    assert repr(bad) in str(e.value)
    with pytest.raises(ValueError, match=r"invalid feature name"):
        Feature(bad, "string")


def test_group_definition_errors_are_named():
    with pytest.raises(ValueError, match="primary key 'id' is not a feature"):
        FeatureGroup("g", "id", (Feature("k", "string"),))
    with pytest.raises(ValueError, match="online groups need"):
        FeatureGroup("g", "k", (Feature("k", "float64"),))
    with pytest.raises(ValueError, match="declared twice"):
        FeatureGroup("g", "k", (Feature("k", "string"), Feature("k", "int64")))
    with pytest.raises(ValueError, match="unknown type 'blob'"):
        Feature("x", "blob")
    with pytest.raises(ValueError, match="alias 'Other'"):
        Feature("x", "string", alias="Other")
    with pytest.raises(ValueError, match="expectation on unknown feature 'nope'"):
        FeatureGroup("g", "k", (Feature("k", "string"),), expectations=(not_null("nope"),))
    with pytest.raises(ValueError, match="at most 52 characters .* fg_" + "x" * 53):
        FeatureGroup("x" * 53, "k", (Feature("k", "string"),))
    assert FeatureGroup("x" * 52, "k", (Feature("k", "string"),)).table_spec(999999).name == f"fg_{'x' * 52}_v999999"


def test_hm_groups():
    assert len(ARTICLES.features) >= 21  # the key and at least 20 features
    assert {"age", "age_group", "club_member_status", "fashion_news_frequency", "FN", "Active", "postal_bucket"} <= set(
        CUSTOMERS.columns)
    assert {"sales_7d", "sales_30d", "sales_trend", "price", "first_seen", "stock", "in_stock", "detail_desc"} <= set(
        ARTICLES.columns)
    assert {"n_purchases", "mean_price", "purchased", "share_ladieswear"} <= set(CUSTOMER_HISTORY.columns)
    assert not TRANSACTIONS.online and TRANSACTIONS.event_time == "t_dat"
    assert CUSTOMERS.feature("FN").name == "fn" and CUSTOMERS.key == "customer_id"
    for g in GROUPS.values():
        assert FeatureGroup.from_dict(g.to_dict()) == g
        assert all(f.limit for f in g.features if f.dtype not in ("int64", "float64", "bool"))  # bounded


def test_purchases_of_long_ids_are_kept_within_the_rows_bound(tmp_path):
    """500 UUID article ids (18.5 kB) do not fit an online row: the most recent that fit
    PURCHASED_BYTES are kept, in batch builds and in real-time events alike."""
    import uuid

    from feature_store.events import PurchaseEvent, updated_history
    from feature_store.groups import MAX_PURCHASED, PURCHASED_BYTES, recent_purchases
    from feature_store.transforms import customer_history

    hm = [f"{i:010d}" for i in range(MAX_PURCHASED + 20)]
    assert recent_purchases(hm) == hm[:MAX_PURCHASED]  # H&M's ids: the count is the bound
    ids = [str(uuid.UUID(int=i)) for i in range(MAX_PURCHASED)]
    kept = recent_purchases(ids)
    assert kept == ids[:PURCHASED_BYTES // 37] and len(kept) == 148
    assert recent_purchases(["é" * 10] * 300, max_bytes=210) == ["é" * 10] * 10  # UTF-8 bytes, not characters
    tx = pd.DataFrame({"t_dat": pd.date_range("2020-01-01", periods=MAX_PURCHASED, freq="h"), "customer_id": "c1",
                       "article_id": ids[::-1], "price": 0.01, "sales_channel_id": 2})
    arts = pd.DataFrame({"article_id": ids, "product_type_name": "Top", "index_group_name": "Divided"})
    frame = customer_history(tx, arts, None)
    assert frame.loc[0, "purchased"] == kept and frame.loc[0, "n_purchases"] == MAX_PURCHASED
    fs = FeatureStore(Workdir.at(tmp_path), InMemoryOnlineStore())
    ref = fs.write("customer_history", frame, progress=False)  # before the bound: "packed row ... above the limit"
    row = fs.get_feature_group("customer_history", ref.version).read_online(["c1"])["c1"]
    new = str(uuid.uuid4())
    after = updated_history(row, PurchaseEvent("e1", "c1", new, 0.02, "2020-02-01"), "2020-02-01",
                            {"product_type_name": "Top", "index_group_name": "Divided"}, MAX_PURCHASED)
    assert after["purchased"] == [new, *kept[:-1]]


def test_type_days_keep_the_most_recent_types_within_the_bound():
    days = {f"t{i:03d}": f"2020-{1 + i // 28:02d}-{1 + i % 28:02d}" for i in range(MAX_TYPE_DAYS + 10)}
    kept = recent_type_days(days)
    assert list(kept) == sorted(days, reverse=True)[:MAX_TYPE_DAYS]  # most recent first
    assert recent_type_days({"b": "2020-01-01", "a": "2020-01-01", "c": "2019-12-31"}, limit=2) == {
        "b": "2020-01-01", "a": "2020-01-01"}  # ties by name
    long = {("é" * 60) + str(i): f"2020-01-{1 + i:02d}" for i in range(MAX_TYPE_DAYS)}
    text = encode_json(recent_type_days(long))
    limit = CUSTOMER_HISTORY.feature("type_last_day").limit
    assert len(text.encode("utf-8")) <= limit < len(encode_json(long).encode("utf-8"))
    size = len(text.encode("utf-8"))  # the size estimate is exact: one byte less drops a type
    assert recent_type_days(long, max_bytes=size) == recent_type_days(long)
    assert len(recent_type_days(long, max_bytes=size - 1)) == len(recent_type_days(long)) - 1


def test_strict_failure_writes_nothing_anywhere(tmp_path):
    online = InMemoryOnlineStore()
    fgv = FeatureStore(Workdir.at(tmp_path), online).create_feature_group(SHOP)
    bad = shop_frame(price=[1.0, 250.0, -3.0], color=["red", "green", "blue"], n=[1, None, 3])
    with pytest.raises(ValidationFailed) as e:
        fgv.insert(bad, validation="strict")
    report = e.value.report
    by_rule = {(f.feature, f.rule): f for f in report.failures}
    assert by_rule[("price", "range [0, 100]")].failing_rows == 2
    assert [x["value"] for x in by_rule[("price", "range [0, 100]")].examples] == [250.0, -3.0]
    assert by_rule[("color", "allowed ['red', 'blue']")].examples == [{"row": 1, "value": "green"}]
    assert by_rule[("n", "not_null")].failing_rows == 1
    assert "price: range [0, 100]: 2 failing rows" in str(e.value)
    assert fgv.offline.commits() == [] and fgv.read().empty
    assert online.table_stats(fgv.spec)["rows"] == 0


def test_a_write_that_fails_leaves_no_new_version(tmp_path):
    """`FeatureStore.write` creates the version it fills: when the insert fails, that version goes
    (else an empty version would be the group's latest)."""
    online = InMemoryOnlineStore()
    fs = FeatureStore(Workdir.at(tmp_path), online)
    good = fs.write("shop", shop_frame(), progress=False, validation="strict", groups={"shop": SHOP})
    with pytest.raises(ValidationFailed):
        fs.write("shop", shop_frame(price=[1.0, 250.0, 3.0]), progress=False, validation="strict", groups={"shop": SHOP})
    assert fs.versions("shop") == [1] and fs.get_feature_group("shop").version == good.version == 1
    assert sorted(p.name for p in fs.group_dir("shop", 1).parent.iterdir()) == ["v1"]
    assert "fg_shop_v2" not in online.list_tables()
    again = fs.write("shop", shop_frame(), progress=False, validation="strict", groups={"shop": SHOP})
    assert again.version == 3 and fs.get_feature_group("shop").read_online(["a"])["a"]["price"] == 1.0


def test_always_policy_writes_and_reports(tmp_path):
    fgv = FeatureStore(Workdir.at(tmp_path), InMemoryOnlineStore()).create_feature_group(SHOP)
    frame = shop_frame(price=[1.0, "cheap", 500.0], item_id=["a", None, "c"], tags=[["x"], [], ["1", "2", "3", "4"]])
    result = fgv.insert(frame, validation="always")
    failures = {(f.feature, f.rule): f.failing_rows for f in result.report.failures}
    assert failures[("price", "type float64")] == 1
    assert failures[("price", "range [0, 100]")] == 1
    assert failures[("item_id", "not_null (primary key)")] == 1
    assert failures[("tags", "type list_string (limit 3)")] == 1
    assert result.report.dropped_rows == 1 and result.rows == 2
    rows = fgv.read_online(["a", "c"])
    assert rows["c"]["price"] == 500.0 and rows["c"]["tags"] is None  # out of range kept; unstorable -> null


def test_missing_event_time_and_columns_are_named(tmp_path):
    fgv = FeatureStore(Workdir.at(tmp_path), InMemoryOnlineStore()).create_feature_group(SHOP)
    with pytest.raises(ValueError, match="event-time column 'event_time'"):
        fgv.insert(shop_frame().drop(columns=["event_time"]))
    with pytest.raises(ValueError, match=r"lacks columns \['color'\]"):
        fgv.insert(shop_frame().drop(columns=["color"]))
    with pytest.raises(ValidationFailed, match="event_time: not_null timestamp"):
        fgv.insert(shop_frame(event_time=[pd.Timestamp("2020-01-01"), None, pd.Timestamp("2020-01-01")]))


def test_keys_an_online_table_cannot_hold_apart_are_refused_before_anything_is_written(tmp_path):
    """A key longer than the online key column, or ending with a space (MySQL-protocol servers
    compare 'a ' as 'a', so it would overwrite a's row), fails validation: strict writes nothing,
    not even the dictionary codes of the batch's values; always drops those rows."""
    online = InMemoryOnlineStore()
    group = FeatureGroup("coded", "item_id", (Feature("item_id", "string"), Feature("colour", "string", dictionary=True)))
    fgv = FeatureStore(Workdir.at(tmp_path), online).create_feature_group(group)
    frame = pd.DataFrame({"item_id": ["a", "b ", "x" * 65], "colour": ["Red", "Blue", "Green"],
                          "event_time": pd.to_datetime(["2020-01-01"] * 3)})
    with pytest.raises(ValidationFailed, match=r"item_id: online key \(at most 64 characters, no trailing space\): "
                                               r"2 failing rows \(e.g. row 1: 'b '"):
        fgv.insert(frame, validation="strict")
    assert fgv.read().empty and online.dictionary_entries() == []
    result = fgv.insert(frame, validation="always")
    assert result.rows == 1 and result.report.dropped_rows == 2
    assert fgv.read()["item_id"].tolist() == ["a"] and [v for _, v in online.dictionary_entries()] == ["Red"]
    offline_only = FeatureGroup("logged", "item_id", (Feature("item_id", "string"),), online=False)
    kept = FeatureStore(Workdir.at(tmp_path), online).create_feature_group(offline_only)
    assert kept.insert(frame[["item_id", "event_time"]], validation="strict").rows == 3  # no online table


@pytest.mark.parametrize(("column", "value", "rule"), [
    ("n", pd.Series([2**63 + 5], dtype="uint64"), "type int64"),
    ("color", pd.Series(["bad\ud800"], dtype=object), "type string"),
    ("tags", pd.Series([["ok", "\udc00"]], dtype=object), "type list_string"),
])
def test_values_their_stores_cannot_hold_fail_validation_by_name(tmp_path, column, value, rule):
    fgv = FeatureStore(Workdir.at(tmp_path), InMemoryOnlineStore()).create_feature_group(SHOP)
    frame = shop_frame(**{"item_id": ["a"], "price": [1.0], "color": ["red"], "n": [1], "tags": [["x"]],
                          "event_time": pd.to_datetime(["2020-01-01"]), column: value})
    with pytest.raises(ValidationFailed, match=f"{column}: {rule}"):
        fgv.insert(frame, validation="strict")


def test_int64_bounds_are_checked_exactly_in_object_columns(tmp_path):
    """float() rounds 2**63 - 1 up to 2**63, which would call the largest int64 out of range."""
    fgv = FeatureStore(Workdir.at(tmp_path), InMemoryOnlineStore()).create_feature_group(SHOP)
    frame = shop_frame(item_id=["a", "b"], price=[1.0, 2.0], color=["red", "red"], tags=[["x"], ["y"]],
                       n=pd.Series([2**63 - 1, -(2**63)], dtype=object), event_time=pd.to_datetime(["2020-01-01"] * 2))
    assert fgv.insert(frame, validation="strict").rows == 2
    assert fgv.read_online(["a", "b"])["a"]["n"] == 2**63 - 1
    with pytest.raises(ValidationFailed, match="n: type int64"):
        fgv.insert(frame.assign(n=pd.Series([2**63, 1], dtype=object)), validation="strict")
