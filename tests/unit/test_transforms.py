import numpy as np
import pandas as pd

from feature_store.on_demand import days_on_sale
from feature_store.transforms import (
    article_activity,
    article_features,
    customer_history,
    histories_before,
    snapshot_times,
    with_activity,
)
from feature_store.views import AS_OF_COLUMN, retrieval_frame


def _tx():
    return pd.DataFrame({
        "t_dat": pd.to_datetime(["2020-01-01", "2020-01-02", "2020-01-02", "2020-01-05", "2020-01-03"]),
        "customer_id": ["c1", "c1", "c1", "c1", "c2"],
        "article_id": ["a1", "a2", "a3", "a4", "a1"],
        "price": [0.01, 0.02, 0.03, 0.04, 0.05],
        "sales_channel_id": [1, 2, 2, 2, 1],
    })


def _articles():
    cols = ["prod_name", "product_type_name", "product_group_name", "colour_group_name", "index_group_name",
            "garment_group_name", "department_name", "graphical_appearance_name", "detail_desc"]
    df = pd.DataFrame({"article_id": ["a1", "a2", "a3", "a4", "a5"]})
    for c in cols:
        df[c] = "x"
    df["product_type_name"] = ["Dress", "Dress", "Socks", "Dress", "Socks"]
    return df


def test_history_excludes_same_day_basket_and_is_most_recent_first():
    tx = _tx()
    h = histories_before(tx, history_len=10)
    assert h.iloc[0] == []                 # first purchase: nothing before
    assert h.iloc[1] == ["a1"]             # same-day basket item a3 is not visible
    assert h.iloc[2] == ["a1"]
    assert h.iloc[3] == ["a3", "a2", "a1"] or h.iloc[3] == ["a2", "a3", "a1"]
    assert h.iloc[4] == []                 # other customer
    assert histories_before(tx, history_len=1).iloc[3] in (["a3"], ["a2"])


def test_history_keeps_input_order_when_unsorted():
    tx = _tx().iloc[::-1]
    h = histories_before(tx, 10)
    assert h.loc[0] == [] and h.loc[1] == ["a1"]


def test_features_as_of_use_only_earlier_transactions():
    tx = _tx()
    cut = pd.Timestamp("2020-01-03")
    arts = article_features(_articles(), tx, cut)
    a4 = arts.set_index("article_id").loc["a4"]
    assert a4["sales_total"] == 0 and pd.isna(a4["price"])     # sold after the cut-off
    hist = customer_history(tx, _articles(), cut).set_index("customer_id")
    assert hist.loc["c1", "n_purchases"] == 3 and "c2" not in hist.index
    assert hist.loc["c1", "purchased"][0] in ("a2", "a3") and hist.loc["c1", "purchased"][-1] == "a1"
    assert hist.loc["c1", "type_counts"] == {"Dress": 2, "Socks": 1}


def test_history_dates_each_type_by_its_last_purchase_before_the_cutoff():
    tx = _tx()
    cut = customer_history(tx, _articles(), pd.Timestamp("2020-01-03")).set_index("customer_id")
    assert cut.loc["c1", "type_last_day"] == {"Dress": "2020-01-02", "Socks": "2020-01-02"}
    full = customer_history(tx, _articles(), None).set_index("customer_id")
    assert full.loc["c1", "type_last_day"] == {"Dress": "2020-01-05", "Socks": "2020-01-02"}
    assert full.loc["c2", "type_last_day"] == {"Dress": "2020-01-03"}


def test_retrieval_frame_joins_point_in_time():
    tx = _tx()
    customers = pd.DataFrame({"customer_id": ["c1", "c2"], "age": [30.0, None], "club_member_status": ["ACTIVE", None],
                              "fashion_news_frequency": [None, None], "FN": [1.0, None], "Active": [1.0, None],
                              "postal_code": ["p", "q"], "region": ["north", None]})
    arts = article_features(_articles(), tx, None)
    view = retrieval_frame(tx, customers, arts, history_len=5)
    assert len(view) == len(tx)
    row = view[(view["customer_id"] == "c1") & (view["article_id"] == "a4")].iloc[0]
    assert sorted(row["history"]) == ["a1", "a2", "a3"] and row["month"] == 1
    assert row["product_type_name"] == "Dress" and row["age"] == 30.0


def _weeks_tx():
    """Three weeks of sales: a1 sells throughout, a2 from the 10th, a3 only on the last day."""
    days = ["2020-01-01", "2020-01-03", "2020-01-09", "2020-01-10", "2020-01-12", "2020-01-16", "2020-01-21"]
    arts = ["a1", "a1", "a1", "a2", "a2", "a1", "a3"]
    return pd.DataFrame({"t_dat": pd.to_datetime(days), "customer_id": ["c1", "c2", "c1", "c2", "c1", "c2", "c1"],
                         "article_id": arts, "price": 0.01, "sales_channel_id": 1})


def test_article_activity_is_the_articles_group_as_of_any_time():
    tx = _weeks_tx()
    for cut in ["2019-12-31", "2020-01-01", "2020-01-10", "2020-01-15", "2020-01-22", "2020-03-01"]:
        arts = article_features(_articles(), tx, pd.Timestamp(cut))
        act = article_activity(tx, arts["article_id"], np.full(len(arts), pd.Timestamp(cut)))
        assert act["sales_7d"].tolist() == arts["sales_7d"].tolist(), cut
        assert [None if pd.isna(v) else v for v in act["first_seen"]] == [
            None if pd.isna(v) else v for v in arts["first_seen"]], cut
        assert act["sales_day"].tolist() == arts["sales_day"].tolist(), cut
    again = with_activity(_articles(), tx, pd.Timestamp("2020-01-15")).set_index("article_id")
    assert again.loc["a1", "sales_7d"] == 1 and again.loc["a2", "sales_7d"] == 2 and again.loc["a3", "sales_7d"] == 0
    assert again.loc["a2", "first_seen"] == "2020-01-10" and pd.isna(again.loc["a3", "first_seen"])


def test_snapshots_are_weeks_counted_back_from_the_day_after_the_last():
    days = pd.Series(pd.to_datetime(["2020-01-01", "2020-01-08", "2020-01-09", "2020-01-15"]))
    # the day after the last is the 16th: weeks start on the 9th, 2nd and Dec 26th
    assert snapshot_times(days).dt.strftime("%m-%d").tolist() == ["12-26", "01-02", "01-09", "01-09"]


def test_days_on_sale_from_the_group_dates():
    out = days_on_sale(["2020-01-01", None, "2020-01-07", None], ["2020-01-07", "2020-01-07", "2020-01-07", None])
    assert out[:3].tolist() == [7.0, 0.0, 1.0] and np.isnan(out[3])  # not sold yet: 0; no window: unknown


def test_retrieval_frame_sees_article_activity_as_of_the_start_of_the_rows_week():
    tx = _weeks_tx()
    customers = pd.DataFrame({"customer_id": ["c1", "c2"], "age": [30.0, None], "club_member_status": "ACTIVE",
                              "fashion_news_frequency": None, "FN": 1.0, "Active": 1.0})
    view = retrieval_frame(tx, customers, article_features(_articles(), tx, None), history_len=5)
    row = view[view["t_dat"] == "2020-01-16"].iloc[0]  # week of Jan 15th-21st
    assert row[AS_OF_COLUMN] == pd.Timestamp("2020-01-15") and row["sales_day"] == "2020-01-14"
    assert row["sales_7d"] == 1 and row["first_seen"] == "2020-01-01"  # a1's sale of the 9th, not the 16th
    new = view[view["article_id"] == "a3"].iloc[0]  # first sold that week: nothing before its snapshot
    assert new["sales_7d"] == 0 and pd.isna(new["first_seen"])
    a2 = view[view["t_dat"] == "2020-01-12"].iloc[0]  # same week as a2's first sale (the 10th, week of the 8th)
    assert a2["sales_7d"] == 0 and pd.isna(a2["first_seen"])
