"""Real-time purchase events: online rows updated once per event id, offline log, materialisation."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from common.workdir import Workdir
from feature_store.events import (
    PurchaseEvent,
    apply_purchase_event,
    materialize_events,
    read_event_log,
    updated_history,
)
from feature_store.groups import MAX_TYPE_DAYS, SALES_DAYS
from feature_store.online.base import InMemoryOnlineStore
from feature_store.store import FeatureStore
from feature_store.transforms import customer_history

ARTICLE = {
    "article_id": "a1", "prod_name": "Tee", "product_type_name": "T-shirt", "index_group_name": "Divided",
    "detail_desc": "soft", "price": 0.02, "sales_total": 3, "sales_7d": 2, "sales_30d": 3, "sales_trend": 1,
    "first_seen": "2020-09-01", "sales_day": "2020-09-20", "daily_sales": [1, 1, 0, 0, 0, 0, 0, 0, 1] + [0] * 21,
    "stock": 2.0, "in_stock": True, "min_age": 0, "regions": ["north"],
}


@pytest.fixture
def setup(tmp_path):
    from feature_store.groups import ARTICLE_INT_ATTRIBUTES, ARTICLE_NAME_ATTRIBUTES

    fs = FeatureStore(Workdir.at(tmp_path), InMemoryOnlineStore())
    art = {**{c: None for c in ARTICLE_NAME_ATTRIBUTES + ARTICLE_INT_ATTRIBUTES}, **ARTICLE}
    refs = {"articles": fs.write("articles", pd.DataFrame([art]), progress=False, event_time="2020-09-21"),
            "customer_history": fs.write("customer_history", pd.DataFrame([{
                "customer_id": "c1", "purchased": ["a0"], "n_purchases": 1, "mean_price": 0.04,
                "type_counts": {"Dress": 1}, "index_group_counts": {"Ladieswear": 1}, "share_ladieswear": 1.0,
                "share_divided": 0.0, "share_menswear": 0.0, "share_baby_children": 0.0, "share_sport": 0.0,
                "last_purchase": "2020-09-10", "type_last_day": {"Dress": "2020-09-10"}}]), progress=False,
                event_time="2020-09-21"),
            "transactions": fs.write("transactions", pd.DataFrame({
                "t_dat": pd.to_datetime(["2020-09-10"]), "customer_id": ["c1"], "article_id": ["a0"], "price": [0.04],
                "sales_channel_id": [2]}), progress=False)}
    return fs, refs


def online(fs, refs, name, key):
    return fs.get_feature_group(name, refs[name].version).read_online([key]).get(key)


def test_a_purchase_updates_history_and_article_once(setup):
    fs, refs = setup
    ev = PurchaseEvent("e-1", "c1", "a1", 0.03, "2020-09-22T10:00:00", 1)
    first = apply_purchase_event(fs, refs, ev)
    again = apply_purchase_event(fs, refs, ev)  # a retry: not counted twice
    assert first.applied and first.known_article and not again.applied
    hist = online(fs, refs, "customer_history", "c1")
    assert hist["purchased"] == ["a1", "a0"] and hist["n_purchases"] == 2
    assert hist["mean_price"] == pytest.approx(0.035)
    assert hist["type_counts"] == {"Dress": 1, "T-shirt": 1} and hist["index_group_counts"]["Divided"] == 1
    assert hist["share_divided"] == 0.5 and hist["last_purchase"] == "2020-09-22"
    art = online(fs, refs, "articles", "a1")
    assert art["sales_total"] == 4 and art["stock"] == 1.0 and art["in_stock"] is True
    assert art["sales_day"] == "2020-09-22" and art["daily_sales"][:4] == [1, 0, 1, 1]
    assert len(art["daily_sales"]) == SALES_DAYS
    assert art["sales_7d"] == 3 and art["sales_30d"] == 4  # the Sep 12 sale is now 10 days old
    assert art["sales_trend"] == 3 - 1
    assert art["price"] == pytest.approx((0.02 * 3 + 0.03) / 4)
    log = read_event_log(fs.wd)
    assert log["event_id"].tolist() == ["e-1"]  # logged twice, read once


def test_a_purchase_dates_its_type_once_and_never_moves_a_day_back(setup):
    fs, refs = setup
    ev = PurchaseEvent("t-1", "c1", "a1", 0.03, "2020-09-22T10:00:00")
    assert apply_purchase_event(fs, refs, ev).applied
    assert not apply_purchase_event(fs, refs, ev).applied  # a retry changes nothing
    hist = online(fs, refs, "customer_history", "c1")
    assert hist["type_last_day"] == {"Dress": "2020-09-10", "T-shirt": "2020-09-22"}
    late = PurchaseEvent("t-0", "c1", "a1", 0.03, "2020-09-15")  # arrives after a newer purchase of the type
    assert apply_purchase_event(fs, refs, late).applied
    hist = online(fs, refs, "customer_history", "c1")
    assert hist["type_last_day"]["T-shirt"] == "2020-09-22" and hist["type_counts"]["T-shirt"] == 2


def test_events_date_types_as_a_batch_build_does():
    """Batch history up to a day, then the later purchases as events == batch history of all."""
    rng = np.random.default_rng(3)
    types = [f"type {i:02d}" for i in range(MAX_TYPE_DAYS + 6)]  # more than a row keeps
    articles = pd.DataFrame({"article_id": [f"a{i}" for i in range(len(types))], "product_type_name": types,
                             "index_group_name": "Divided"})
    days = pd.Timestamp("2020-06-01") + pd.to_timedelta(rng.integers(0, 90, 300), unit="D")
    tx = pd.DataFrame({"t_dat": days, "customer_id": "c1", "article_id": rng.choice(articles["article_id"], 300),
                       "price": 0.01, "sales_channel_id": 1}).sort_values("t_dat", kind="stable")
    cut = pd.Timestamp("2020-08-01")
    row = customer_history(tx, articles, cut).iloc[0].to_dict()
    by_id = articles.set_index("article_id").to_dict("index")
    for i, r in enumerate(tx[tx["t_dat"] >= cut].itertuples()):
        ev = PurchaseEvent(f"e{i}", "c1", r.article_id, 0.01, r.t_dat)
        row = updated_history(row, ev, r.t_dat.strftime("%Y-%m-%d"), by_id[r.article_id], None)
    full = customer_history(tx, articles, None).iloc[0]
    assert len(full["type_last_day"]) == MAX_TYPE_DAYS and row["type_last_day"] == full["type_last_day"]
    assert row["type_counts"] == full["type_counts"]


def test_a_dataset_configs_type_column_is_counted_and_dated():
    ev = PurchaseEvent("g-1", "u1", "m1", 0.0, "2000-06-24")
    row = updated_history({}, ev, "2000-06-24", {"genres": "Comedy"}, None, type_column="genres")
    assert row["type_counts"] == {"Comedy": 1} and row["type_last_day"] == {"Comedy": "2000-06-24"}
    assert updated_history({}, ev, "2000-06-24", {"genres": "Comedy"}, None, type_column=None)["type_last_day"] == {}


def test_events_for_unknown_customers_articles_and_stock(setup):
    fs, refs = setup
    for i in range(3):
        apply_purchase_event(fs, refs, PurchaseEvent(f"s{i}", "c2", "a1", 0.02, "2020-09-22"))
    assert online(fs, refs, "customer_history", "c2")["n_purchases"] == 3
    art = online(fs, refs, "articles", "a1")
    assert art["stock"] == 0.0 and art["in_stock"] is False  # never below zero
    res = apply_purchase_event(fs, refs, PurchaseEvent("x", "c2", "unknown", 0.02, "2020-09-23"))
    assert res.applied and not res.known_article
    assert online(fs, refs, "customer_history", "c2")["purchased"][0] == "unknown"


@pytest.mark.parametrize("bad,match", [({"event_id": ""}, "event_id"), ({"price": -1}, "price"),
                                       ({"price": float("nan")}, "price"), ({"event_time": "not a date"}, "event_time"),
                                       ({"sales_channel_id": 3}, "sales_channel_id"),
                                       ({"event_id": "e "}, "event_id.*not ending with a space"),
                                       ({"customer_id": "c1 "}, "customer_id"),
                                       ({"event_time": "2300-01-01"}, "event_time"),  # past int64 nanoseconds
                                       ({"event_time": "1500-01-01T00:00:00+05:00"}, "event_time")])
def test_invalid_events_are_refused(setup, bad, match):
    fs, refs = setup
    kw = dict(event_id="e", customer_id="c1", article_id="a1", price=0.1, event_time="2020-09-22")
    with pytest.raises(ValueError, match=match):
        apply_purchase_event(fs, refs, PurchaseEvent(**{**kw, **bad}))


def test_logged_events_reach_the_offline_transactions_once(setup):
    fs, refs = setup
    apply_purchase_event(fs, refs, PurchaseEvent("e-1", "c1", "a1", 0.03, "2020-09-22T10:00:00"))
    apply_purchase_event(fs, refs, PurchaseEvent("e-2", "c3", "a1", 0.05, "2020-09-23T08:00:00"))
    result = materialize_events(fs)
    assert result.rows == 2
    assert materialize_events(fs) is None  # idempotent
    tx = fs.get_feature_group("transactions").read()
    assert sorted(tx["event_id"].dropna()) == ["e-1", "e-2"] and len(tx) == 3
    assert tx.set_index("event_id").loc["e-2", "t_dat"] == pd.Timestamp("2020-09-23 08:00:00")


def test_logged_purchases_join_the_next_runs_transactions(tmp_path):
    """What `rayrec pipeline` and `features build` add from the workdir's event log: known
    customers and articles, within the gap after the data's last day, once per event id, as days,
    and not when the data already holds them."""
    from feature_store.events import add_logged_purchases, append_log_lines, describe_added, event_log_dir

    wd = Workdir.at(tmp_path)
    tx = pd.DataFrame({"t_dat": pd.to_datetime(["2020-09-01", "2020-09-20"]), "customer_id": ["c1", "c2"],
                       "article_id": ["a1", "a2"], "price": [0.01, 0.02], "sales_channel_id": [1, 2]})
    customers, articles = pd.DataFrame({"customer_id": ["c1", "c2"]}), pd.DataFrame({"article_id": ["a1", "a2"]})
    assert add_logged_purchases(tx, customers, articles, wd, 30)[0] is tx  # no log: unchanged
    events = [PurchaseEvent("e1", "c1", "a2", 0.03, "2020-09-25T18:30:00", 1),
              PurchaseEvent("e1", "c1", "a2", 0.03, "2020-09-25T18:30:00", 1),  # a retry, logged twice
              PurchaseEvent("e2", "c9", "a1", 0.03, "2020-09-25T10:00:00"),     # a customer the data lacks
              PurchaseEvent("e3", "c2", "zz", 0.03, "2020-09-25T10:00:00"),     # an article the data lacks
              PurchaseEvent("e4", "c2", "a1", 0.04, "2026-12-02T10:00:00"),     # not a continuation of the data
              PurchaseEvent("e5", "c2", "a1", 0.05, "2020-09-10T09:00:00"),
              PurchaseEvent("e6", "c2", "a2", 0.02, "2020-09-20T11:00:00"),     # the data's row of that day
              PurchaseEvent("e7", "c1", "a1", 0.01, "2020-09-01T09:00:00"),     # the data holds one of these two
              PurchaseEvent("e8", "c1", "a1", 0.01, "2020-09-01T17:00:00")]
    append_log_lines(event_log_dir(wd), [(e.timestamp, e.to_dict()) for e in events], durable=False)
    out, counts = add_logged_purchases(tx, customers, articles, wd, 30)
    assert counts == {"logged": 8, "added": 3, "unknown_customer": 1, "unknown_article": 1, "after_gap": 1,
                      "in_data": 2}
    assert list(out.columns) == list(tx.columns) and (out.dtypes == tx.dtypes).all()
    assert out.to_dict("records") == [
        {"t_dat": pd.Timestamp("2020-09-01"), "customer_id": "c1", "article_id": "a1", "price": 0.01, "sales_channel_id": 1},
        {"t_dat": pd.Timestamp("2020-09-01"), "customer_id": "c1", "article_id": "a1", "price": 0.01, "sales_channel_id": 2},
        {"t_dat": pd.Timestamp("2020-09-10"), "customer_id": "c2", "article_id": "a1", "price": 0.05, "sales_channel_id": 2},
        {"t_dat": pd.Timestamp("2020-09-20"), "customer_id": "c2", "article_id": "a2", "price": 0.02, "sales_channel_id": 2},
        {"t_dat": pd.Timestamp("2020-09-25"), "customer_id": "c1", "article_id": "a2", "price": 0.03, "sales_channel_id": 1}]
    assert describe_added(counts) == ("serving's event log: 3 of 8 logged purchases added to the transactions "
                                      "(left out: 1 unknown_customer, 1 unknown_article, 1 after_gap, 2 in_data)")
    assert add_logged_purchases(tx, customers, articles, wd, 3000)[1]["added"] == 4  # a wider gap takes e4 too


def test_logged_purchases_not_applied_online_are_found(setup):
    """What a start-up replay applies: logged purchases (first per id, recent day files only)
    whose ids the online store has not recorded."""
    import os
    import time

    from feature_store.events import append_log_lines, event_log_dir, logged_purchases, unapplied_events

    fs, refs = setup
    done = PurchaseEvent("e-done", "c1", "a1", 0.02, "2020-09-22T10:00:00")
    apply_purchase_event(fs, refs, done)  # applied online and logged
    lost = PurchaseEvent("e-lost", "c1", "a1", 0.03, "2020-09-22T11:00:00")
    old = PurchaseEvent("e-old", "c1", "a1", 0.03, "2020-08-01T11:00:00")
    folder = event_log_dir(fs.wd)
    append_log_lines(folder, [(e.timestamp, e.to_dict()) for e in (lost, lost, old)], durable=True)
    week_ago = time.time() - 7 * 86400
    os.utime(folder / "2020-08-01.jsonl", (week_ago, week_ago))
    assert [e.event_id for e in logged_purchases(fs.wd)] == ["e-old", "e-done", "e-lost"]
    recent = logged_purchases(fs.wd, modified_within_s=86400)
    assert [e.event_id for e in recent] == ["e-done", "e-lost"] and recent[1] == lost
    assert [e.event_id for e in unapplied_events(fs, recent)] == ["e-lost"]
    empty = FeatureStore(Workdir.at(fs.wd.root / "other"), InMemoryOnlineStore())
    assert [e.event_id for e in unapplied_events(empty, recent)] == ["e-done", "e-lost"]  # no events table yet


@pytest.mark.parametrize("value", [
    "2020-09-23", "2020-09-23T12:00:00", "2020-09-23 12:00:00.123456", "2020-09-23T12:00:00Z",
    "2020-09-23T14:00:00+02:00", "2020-09-23T01:30:00-05:30", "2020/09/23 12:00",  # the last: pandas' own path
    dt.datetime(2020, 9, 23, 12, 0, 1, 5), dt.datetime(2020, 9, 23, 14, tzinfo=dt.timezone(dt.timedelta(hours=2))),
    pd.Timestamp("2020-09-23T12:00:00.000001"),
])
def test_one_event_time_parses_as_a_series_of_them_does(value):
    """`to_event_time` (one value, the serving path) gives what `to_event_times` gives it."""
    from feature_store.offline import to_event_time, to_event_times

    want = to_event_times([value]).iloc[0]
    got = to_event_time(value)
    assert got == want and got.tzinfo is None and got.unit == "us"
    assert PurchaseEvent("e", "c1", "a1", 0.02, value).timestamp == want
