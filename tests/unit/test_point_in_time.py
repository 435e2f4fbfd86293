"""Point-in-time training data from feature views: a hand-made case with exact expected values,
splits, immutable and reproducible training datasets, transformations and on-demand features
shared by training and serving."""
from __future__ import annotations

import math
import stat

import numpy as np
import pandas as pd
import pytest

from common.workdir import Workdir
from feature_store.feature_view import FeatureSelection, FeatureView
from feature_store.on_demand import OnDemandFeature, age_group, month_cos, month_sin
from feature_store.online.base import InMemoryOnlineStore
from feature_store.schema import Feature, FeatureGroup
from feature_store.store import FeatureStore
from feature_store.transformations import Transformation

PROFILE = FeatureGroup("profile", "user", (Feature("user", "string"), Feature("score", "float64"),
                                           Feature("tier", "string")))
STATS = FeatureGroup("stats", "item", (Feature("item", "string"), Feature("pop", "int64")))
LABELS = FeatureGroup("labels", "user", (Feature("user", "string"), Feature("item", "string"), Feature("y", "int64"),
                                         Feature("channel", "int64")), online=False)


def T(s: str) -> pd.Timestamp:
    return pd.Timestamp(s)


def rows(group_cols, data):
    return pd.DataFrame(data, columns=[*group_cols, "event_time"])


@pytest.fixture
def fs(tmp_path):
    fs = FeatureStore(Workdir.at(tmp_path), InMemoryOnlineStore())
    profile = fs.create_feature_group(PROFILE)
    cols = ["user", "score", "tier"]
    # commit 1: u1 before, at and after label times; u2 on Jan 3; u4 only after every label
    profile.insert(rows(cols, [
        ["u1", 1.0, "bronze", T("2020-01-01")], ["u1", 5.0, "silver", T("2020-01-05")],
        ["u1", 10.0, "gold", T("2020-01-10")], ["u2", 3.0, "bronze", T("2020-01-03")],
        ["u4", 4.0, "gold", T("2020-02-01")],
    ]))
    # commit 2, arriving late: an older u2 row (Jan 2) and a correction with the same time as Jan 3
    profile.insert(rows(cols, [["u2", 2.0, "bronze", T("2020-01-02")], ["u2", 33.0, "silver", T("2020-01-03")]]))
    stats = fs.create_feature_group(STATS)
    stats.insert(rows(["item", "pop"], [["i1", 7, T("2020-01-02")], ["i1", 8, T("2020-01-06")]]))
    labels = fs.create_feature_group(LABELS)
    labels.insert(rows(["user", "item", "y", "channel"], [
        ["u1", "i1", 1, 1, T("2020-01-05")],   # L1: update at the same instant is visible
        ["u1", "i1", 0, 2, T("2020-01-04")],   # L2: only the Jan 1 row
        ["u1", "i2", 1, 1, T("2020-01-12")],   # L3: the Jan 10 row; i2 has no history
        ["u2", "i1", 0, 2, T("2020-01-02 12:00")],  # L4: the late-arriving Jan 2 row
        ["u2", "i1", 1, 1, T("2020-01-04")],   # L5: the tie at Jan 3 goes to the later insert
        ["u3", "i1", 0, 1, T("2020-01-04")],   # L6: no history at all
        ["u4", "i1", 1, 2, T("2020-01-04")],   # L7: only later rows
        ["u1", "i1", 0, 1, T("2020-01-01")],   # L8: exactly the first row's time
        ["u2", "i1", 1, 2, T("2020-01-01")],   # L9: before u2's first row
    ]))
    return fs


def view(**over) -> FeatureView:
    kw = dict(
        name="clicks",
        features=(FeatureSelection("profile", ("score", "tier")), FeatureSelection("stats", ("pop",), prefix="item_")),
        label_group="labels", label="y", label_features=("channel",),
        on_demand=(OnDemandFeature("month_sin", "month_sin", ("date",)),),
        request_from_label={"date": "event_time"},
    )
    kw.update(over)
    return FeatureView(**kw)


EXPECTED = [  # (user, label time, score, tier, item_pop) in label-time order
    ("u1", "2020-01-01 00:00", 1.0, "bronze", None),
    ("u2", "2020-01-01 00:00", None, None, None),
    ("u2", "2020-01-02 12:00", 2.0, "bronze", 7),
    ("u1", "2020-01-04 00:00", 1.0, "bronze", 7),
    ("u2", "2020-01-04 00:00", 33.0, "silver", 7),
    ("u3", "2020-01-04 00:00", None, None, 7),
    ("u4", "2020-01-04 00:00", None, None, 7),
    ("u1", "2020-01-05 00:00", 5.0, "silver", 7),
    ("u1", "2020-01-12 00:00", 10.0, "gold", None),
]


def as_tuples(frame: pd.DataFrame) -> list[tuple]:
    def clean(v):
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else v

    return [(r.user, r.event_time.strftime("%Y-%m-%d %H:%M"), clean(r.score), clean(r.tier),
             None if clean(r.item_pop) is None else int(r.item_pop)) for r in frame.itertuples()]


def test_point_in_time_join_hand_made_case(fs):
    fv = fs.create_feature_view(view())
    td = fv.training_data()
    frame = td.frame("train")
    assert as_tuples(frame) == EXPECTED
    assert frame["y"].tolist() == [0, 1, 0, 0, 1, 0, 1, 1, 1]
    assert frame["channel"].tolist() == [1, 2, 2, 2, 1, 1, 2, 1, 1]
    assert np.allclose(frame["month_sin"], 0.0)  # January
    assert td.feature_columns == ["score", "tier", "item_pop", "channel", "month_sin"]


def test_a_tie_within_one_insert_goes_to_the_later_row_offline_and_online(tmp_path):
    """Two rows of one key with the same event time in ONE insert: the later row wins, in the
    point-in-time join and online alike (pit.py's tie rule)."""
    fs = FeatureStore(Workdir.at(tmp_path), InMemoryOnlineStore())
    profile = fs.create_feature_group(PROFILE)
    profile.insert(rows(["user", "score", "tier"], [["u1", 1.0, "bronze", T("2020-01-03")],
                                                    ["u1", 2.0, "silver", T("2020-01-03")],
                                                    ["u1", 0.5, "iron", T("2020-01-02")]]))
    fs.create_feature_group(LABELS).insert(rows(["user", "item", "y", "channel"], [["u1", "i1", 1, 1, T("2020-01-04")]]))
    fv = fs.create_feature_view(view(features=(FeatureSelection("profile", ("score", "tier")),)))
    frame = fv.training_data().frame("train")
    assert frame[["score", "tier"]].values.tolist() == [[2.0, "silver"]]
    assert profile.read_online(["u1"])["u1"]["score"] == 2.0


def test_time_splits_and_immutable_reproducible_datasets(fs):
    fv = fs.create_feature_view(view())
    td1 = fv.train_validation_test_split(train_end="2020-01-04", validation_end="2020-01-05",
                                         start="2020-01-01", end="2020-02-01")
    assert td1.meta["rows"] == {"train": 3, "validation": 4, "test": 2}
    assert (td1.frame("train")["event_time"] < T("2020-01-04")).all()
    assert (td1.frame("test")["event_time"] >= T("2020-01-05")).all()
    # late data: u3 gets a row dated before its label, after td1 was created
    fs.get_feature_group("profile").insert(rows(["user", "score", "tier"], [["u3", 99.0, "gold", T("2020-01-01")]]))
    td2 = fv.train_validation_test_split(train_end="2020-01-04", validation_end="2020-01-05",
                                         start="2020-01-01", end="2020-02-01")
    assert td2.version == td1.version + 1
    assert 99.0 in td2.frame("validation")["score"].tolist()
    stored = fv.get_training_data(td1.version)
    recreated = fv.recreate_training_data(td1.version)
    for split in ("train", "validation", "test"):
        pd.testing.assert_frame_equal(stored.frame(split), td1.frame(split), check_dtype=False)
        pd.testing.assert_frame_equal(recreated.frame(split), td1.frame(split), check_dtype=False)
    assert 99.0 not in recreated.frame("validation")["score"].tolist()
    files = list((fv.root / f"td{td1.version}").iterdir())
    assert files and all(not (f.stat().st_mode & stat.S_IWUSR) for f in files)
    from feature_store.feature_view import _write_immutable

    with pytest.raises(FileExistsError, match="immutable"):
        _write_immutable(fv.root / f"td{td1.version}", {}, {})


def test_split_bounds_with_and_without_an_offset_compare_in_utc(fs):
    """04:00+05:00 on the 5th is 23:00 UTC on the 4th, before a validation end at 23:30 UTC."""
    fv = fs.create_feature_view(view())
    td = fv.train_validation_test_split(train_end="2020-01-05T04:00:00+05:00", validation_end="2020-01-04 23:30")
    assert (td.frame("train")["event_time"] < T("2020-01-04 23:00")).all()
    with pytest.raises(ValueError, match="train_end must not be after validation_end"):
        fv.train_validation_test_split(train_end="2020-01-05T04:00:00+05:00", validation_end="2020-01-04 22:00")


def test_transformations_fitted_on_train_and_applied_identically_online(fs):
    transformations = (
        Transformation("score", "standard_scaler"),
        Transformation("tier", "one_hot_encoder"),
        Transformation("item_pop", "bucketizer", {"boundaries": [5, 7.5]}),
        Transformation("channel", "label_encoder"),
    )
    fv = fs.create_feature_view(view(transformations=transformations))
    td = fv.train_test_split(train_end="2020-01-05")
    train = td.frame("train")
    scores = train["score"].dropna()
    assert td.params["score"] == {"mean": pytest.approx(scores.mean()), "std": pytest.approx(scores.std(ddof=0))}
    assert td.params["tier"]["categories"] == ["bronze", "silver"]  # "gold" only appears after train_end
    x_test = td.features("test")
    assert list(x_test.columns) == ["score", "tier__0", "tier__1", "item_pop", "channel", "month_sin"]
    # u1 at Jan 12 (test) sees the latest rows, as the online store serves them now
    row = x_test.iloc[-1]
    vecs = fv.get_feature_vectors([{"user": "u1", "item": "i1"}, {"user": "u1", "item": "i2"}],
                                  request={"date": "2020-01-20", "channel": [1, 1]})
    online = vecs.to_frame()
    assert online.loc[1, "score"] == pytest.approx(row["score"])
    assert online.loc[1, ["tier__0", "tier__1"]].tolist() == [0.0, 0.0] == row[["tier__0", "tier__1"]].tolist()
    assert online.loc[0, "item_pop"] == 2 and online.loc[1, "item_pop"] == row["item_pop"] == -1
    assert online.loc[1, "channel"] == row["channel"] == 0
    assert online.loc[0, "month_sin"] == pytest.approx(month_sin(["2020-01-20"])[0]) == pytest.approx(0.0)
    assert vecs.status == ["complete", "missing"] and vecs.missing_groups == [(), ("stats",)]


def test_serving_without_a_training_dataset_needs_one_for_transformations(fs):
    fv = fs.create_feature_view(view(transformations=(Transformation("score", "min_max_scaler"),)))
    with pytest.raises(LookupError, match="create one first"):
        fv.get_feature_vectors([{"user": "u1", "item": "i1"}], request={"date": "2020-01-01"})
    raw = fv.get_feature_vectors([{"user": "u1", "item": "i1"}], request={"date": "2020-01-01"}, transformed=False)
    assert raw.columns["score"].tolist() == [10.0]


def test_on_demand_functions():
    assert list(age_group([0, 18, 18.9, 19, 25, 26, 35, 36, 45, 46, 55, 56, 65, 66, 99, None, float("nan"), -1])) == [
        "0-18", "0-18", "0-18", "19-25", "19-25", "26-35", "26-35", "36-45", "36-45", "46-55", "46-55", "56-65",
        "56-65", "66+", "66+", None, None, None]
    assert month_sin(["2020-04-15"])[0] == pytest.approx(1.0)
    assert month_cos(["2020-07-01"])[0] == pytest.approx(-1.0)
    assert math.isnan(month_sin([None])[0])


def test_view_definition_errors(fs):
    with pytest.raises(ValueError, match="'score' appears twice"):
        fs.create_feature_view(view(features=(FeatureSelection("profile", ("score",)),
                                              FeatureSelection("profile", ("score",)))))
    with pytest.raises(ValueError, match="unknown function 'nope'"):
        OnDemandFeature("x", "nope", ("date",))
    with pytest.raises(ValueError, match="invalid feature view name"):
        view(name="Clicks")
    with pytest.raises(ValueError, match="transformation of unknown column 'nope'"):
        fs.create_feature_view(view(transformations=(Transformation("nope", "standard_scaler"),)))
