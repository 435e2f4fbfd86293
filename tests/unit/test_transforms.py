import pandas as pd

from feature_store.transforms import article_features, customer_history, histories_before
from feature_store.views import retrieval_frame


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
