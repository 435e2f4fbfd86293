"""Bring your own data: dataset configs, the generic loader and the feature path it drives."""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from feature_store.dataset import (
    HM_ROLES,
    DatasetConfigError,
    Roles,
    canonical_name,
    check_columns,
    load_dataset,
    load_dataset_config,
)
from feature_store.groups import GROUPS, dataset_groups
from feature_store.sources import DataError, generate, load_hm
from feature_store.transforms import article_features, customer_features, customer_history
from feature_store.views import query_frame, retrieval_frame
from training.features import HM_ITEM_FEATURES, HM_QUERY_FEATURES, FeatureVocab, encode_items, encode_queries
from training.index import HM_INDEX, index_columns, to_index_rows
from training.ranking_features import HM_FEATURES, RankerFeatures, ranker_features, vectorise

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ml(tmp_path_factory, movielens_writer) -> Path:
    return movielens_writer(tmp_path_factory.mktemp("ml"), users=60, movies=48, per_user=12, days=30)


def _edit(path: Path, change) -> Path:
    """A copy of the config at `path` (same folder) with `change(raw_dict)` applied."""
    raw = yaml.safe_load(path.read_text())
    change(raw["dataset"])
    out = path.with_name("edited.yaml")
    out.write_text(yaml.safe_dump(raw))
    return out


def test_movielens_style_files_load_onto_the_canonical_tables(ml):
    data = load_dataset(load_dataset_config(ml))
    assert data.name == "movielens-mini"
    assert data.roles == Roles("generic", ("gender", "age", "occupation"), (), ("genres",), (), ("title",),
                               has_price=False, has_channel=False)
    assert list(data.customers.columns) == ["customer_id", "gender", "age", "occupation"]
    assert list(data.articles.columns) == ["article_id", "genres", "title"]
    assert data.articles["title"].iloc[0].startswith("Movie 1 é")  # latin-1, as MovieLens ships it
    tx = data.transactions
    assert list(tx.columns) == ["t_dat", "customer_id", "article_id", "price", "sales_channel_id"]
    assert (tx["t_dat"] == tx["t_dat"].dt.normalize()).all() and tx["t_dat"].is_monotonic_increasing
    assert tx["price"].isna().all() and (tx["sales_channel_id"] == 1).all()
    raw = pd.read_csv(ml.parent / "ratings.dat", sep="::", engine="python", header=None)
    assert len(tx) == int((raw[2] >= 4).sum())  # ratings below min_positive dropped ...
    assert data.report.files["ratings.dat"].dropped == {"below_min_positive_4": int((raw[2] < 4).sum())}  # counted


def test_a_wrong_column_name_fails_naming_the_file_and_the_column(ml):
    bad = _edit(ml, lambda d: d["items"]["columns"].update(categorical=["Genre"]))
    with pytest.raises(DatasetConfigError, match=r"movies\.dat: no column 'Genre' \(dataset\.items\.columns\."
                                                 r"categorical .*the file has: MovieID, Title, Genres"):
        check_columns(load_dataset_config(bad))
    with pytest.raises(DatasetConfigError, match=r"ratings\.dat: no column 'Stars'"):
        load_dataset(load_dataset_config(_edit(ml, lambda d: d["interactions"]["rating"].update(column="Stars"))))


def test_the_cli_rejects_a_wrong_column_before_starting_anything(ml, tmp_path, capsys):
    from ray_apps.cli import main

    bad = _edit(ml, lambda d: d["users"]["columns"].update(id="user"))
    wd = tmp_path / "run"
    assert main(["pipeline", "--dataset", str(bad), "--workdir", str(wd)]) == 2
    err = capsys.readouterr().err
    assert "users.dat: no column 'user'" in err and "UserID, Gender, Age, Occupation, Zip-code" in err
    assert not wd.exists()  # no database, no Ray, no workdir


def test_missing_hm_files_are_all_named_before_starting_anything(tmp_path, capsys):
    """--data, a dataset config's `hm:` folder and `features build` check the Kaggle files first."""
    from ray_apps.cli import main

    folder = tmp_path / "hm"
    folder.mkdir()
    (folder / "articles.csv").write_text("article_id\n")
    hm_config = tmp_path / "hm.yaml"
    hm_config.write_text(yaml.safe_dump({"dataset": {"name": "shop", "hm": {"path": str(folder)}}}))
    wd = tmp_path / "run"
    for argv in (["pipeline", "--data", str(folder)], ["pipeline", "--dataset", str(hm_config)],
                 ["features", "build", "--data", str(folder)]):
        assert main([*argv, "--workdir", str(wd)]) == 2, argv
        err = capsys.readouterr().err
        assert f"{folder / 'customers.csv'}, {folder / 'transactions_train.csv'} not found" in err, (argv, err)
        assert not wd.exists(), argv  # no database, no Ray, no workdir


def test_config_errors_name_the_file_and_the_key(ml, tmp_path):
    with pytest.raises(DatasetConfigError, match=r"edited\.yaml: invalid dataset config: "
                                                 r"dataset\.items\.columns\.catgorical: Extra inputs"):
        load_dataset_config(_edit(ml, lambda d: d["items"]["columns"].update(catgorical=["x"])))
    with pytest.raises(DatasetConfigError, match=r"dataset\.interactions\.format: Input should be"):
        load_dataset_config(_edit(ml, lambda d: d["interactions"].update(format="xlsx")))
    with pytest.raises(DatasetConfigError, match="interactions is required"):
        load_dataset_config(_edit(ml, lambda d: d.pop("interactions")))
    with pytest.raises(DatasetConfigError, match="dataset config not found"):
        load_dataset_config(tmp_path / "nope.yaml")
    clash = _edit(ml, lambda d: d["items"]["columns"].update(numeric=["Genres"]))
    with pytest.raises(DatasetConfigError, match="column 'Genres' becomes 'genres', which clashes"):
        check_columns(load_dataset_config(clash))


def test_bad_values_name_file_line_and_field(tmp_path):
    (tmp_path / "r.csv").write_text("user,item,when,stars\nu1,i1,2020-01-01,5\nu2,i2,2020-01-02,five\n")
    cfg = tmp_path / "d.yaml"
    cfg.write_text(yaml.safe_dump({"dataset": {"name": "x", "interactions": {
        "path": "r.csv", "user": "user", "item": "item", "timestamp": {"column": "when", "format": "%Y-%m-%d"},
        "rating": {"column": "stars", "min_positive": 4}}}}))
    with pytest.raises(DataError, match=r"r\.csv line 3, field stars: cannot parse 'five' as a number"):
        load_dataset(load_dataset_config(cfg))
    (tmp_path / "r.csv").write_text("user,item,when,stars\nu1,i1,2020-01-01,5\nu2,i2,01/02/2020,4\n")
    with pytest.raises(DataError, match=r"r\.csv line 3, field when: cannot parse '01/02/2020' as a time"):
        load_dataset(load_dataset_config(cfg))


def test_relative_paths_follow_the_yaml_and_users_items_are_optional(tmp_path, monkeypatch):
    """Plain interactions (no attribute files), a tsv with a header, parquet, iso times, price and channel."""
    folder = tmp_path / "data"
    folder.mkdir()
    pd.DataFrame({"u": ["a", "b", "a", "c"], "i": ["x", "y", "y", "z"], "p": [1.0, 2.0, 2.5, 0.5],
                  "ch": [1, 3, 3, 1], "ts": ["2020-01-01T10:00:00Z", "2020-01-02T09:00:00Z",
                                             "2020-01-03T23:59:00Z", "2020-01-04T00:00:00Z"]}
                 ).to_parquet(folder / "tx.parquet")
    (folder / "items.tsv").write_text("item id\tkind\tlength\nx\tshort\t1.5\ny\tlong\t\nz\tshort\t3\n")
    cfg = folder / "d.yaml"
    cfg.write_text(yaml.safe_dump({"dataset": {
        "name": "plain",
        "items": {"path": "items.tsv", "columns": {"id": "item id", "categorical": ["kind"], "numeric": ["length"]}},
        "interactions": {"path": "tx.parquet", "user": "u", "item": "i", "timestamp": {"column": "ts"},
                         "price": "p", "channel": "ch"}}}))
    monkeypatch.chdir(tmp_path)  # not the YAML's folder
    data = load_dataset(load_dataset_config(cfg))
    assert sorted(data.customers["customer_id"]) == ["a", "b", "c"]
    assert data.articles["length"].tolist()[:1] == [1.5] and np.isnan(data.articles["length"].iloc[1])
    assert data.transactions["price"].tolist() == [1.0, 2.0, 2.5, 0.5]
    assert data.transactions["sales_channel_id"].tolist() == [1, 3, 3, 1]
    assert data.transactions["t_dat"].dt.day.tolist() == [1, 2, 3, 4]
    assert data.roles.has_price and data.roles.has_channel and data.roles.item_numeric == ("length",)


def test_the_hm_config_loads_the_demo_data_as_load_hm_does(tmp_path):
    generate(tmp_path / "data", seed=1, customers=60, articles=40, days=20)
    shipped = load_dataset_config(REPO / "configs" / "datasets" / "hm.yaml")
    assert shipped.dataset.hm is not None and shipped.dataset.name == "hm"
    cfg = tmp_path / "hm.yaml"
    cfg.write_text(yaml.safe_dump({"dataset": {"name": "hm", "hm": {"path": "data"}}}))
    data = load_dataset(load_dataset_config(cfg))
    hm = load_hm(tmp_path / "data")
    for name in ("articles", "customers", "transactions"):
        pd.testing.assert_frame_equal(getattr(data, name), getattr(hm, name))
    assert data.extras.keys() == hm.extras.keys() and data.roles == HM_ROLES
    assert data.report.to_dict() == hm.report.to_dict()


def test_the_example_configs_validate():
    for name in ("hm.yaml", "movielens.yaml"):
        load_dataset_config(REPO / "configs" / "datasets" / name)
    from common.config import load_config

    assert load_config(REPO / "configs" / "movielens.yaml").eval.split == "random"


def test_canonical_names_are_feature_names():
    assert canonical_name("Zip-code") == "zip_code" and canonical_name("UserID") == "userid"
    assert canonical_name("1st genre") == "c_1st_genre"


# -- the feature path the roles drive -------------------------------------------------------------


def test_hm_roles_keep_the_hm_feature_set():
    from training.features import QUERY_CATEGORICALS

    assert dataset_groups(HM_ROLES) is GROUPS and ranker_features(HM_ROLES) is HM_FEATURES
    assert index_columns(HM_ROLES) is HM_INDEX
    assert [n for n, _, _ in HM_QUERY_FEATURES] == QUERY_CATEGORICALS and HM_ITEM_FEATURES[0][0] == "article_id"


def test_declared_roles_drive_groups_vocab_ranker_and_index(ml):
    data = load_dataset(load_dataset_config(ml))
    roles = data.roles
    tx = data.transactions
    groups = dataset_groups(roles)
    custs = customer_features(data.customers, None, roles)
    arts = article_features(data.articles, tx, None, {}, roles)
    hist = customer_history(tx, data.articles, None, roles)
    for name, frame in (("customers", custs), ("articles", arts), ("customer_history", hist)):
        assert set(groups[name].columns) <= set(frame.columns), name
    assert arts["stock"].isna().all() and (arts["min_age"] == 0).all() and arts["regions"].isna().all()
    first = hist.iloc[0]
    assert sum(first["type_counts"].values()) == first["n_purchases"]  # counted per genres value
    assert set(first["type_last_day"]) == set(first["type_counts"])  # and dated per genres value
    assert max(first["type_last_day"].values()) == first["last_purchase"]

    view = retrieval_frame(tx, custs, arts, 5, roles)
    vocab = FeatureVocab.fit(arts, custs, roles=roles, channels=[1])
    assert vocab.query_names == ["customer_id", "gender", "age", "occupation"]
    assert vocab.item_names == ["article_id", "genres"]  # no price column: no price bucket
    q = encode_queries(vocab, view, 5)
    assert (q["gender"] > 0).all() and (q["occupation"] > 0).all()
    assert (encode_items(vocab, view)["genres"] > 0).all()
    qf = query_frame(["1", "nobody"], custs, {"1": ["3"]}, 6, 1, 5, roles)
    assert list(qf.columns) == ["customer_id", "gender", "age", "occupation", "sales_channel_id", "month", "history"]

    spec = ranker_features(roles)
    assert RankerFeatures.from_dict(spec.to_dict()) == spec
    assert Roles.from_dict(json.loads(json.dumps(asdict(roles)))) == roles  # as the manifest records them
    assert Roles.from_dict(None) == HM_ROLES
    assert {"gender", "age", "occupation", "genres"} <= set(spec.categorical) and "price" not in spec.numeric
    rows = arts.set_index("article_id", drop=False).to_dict("index")
    ids = list(rows)[:5]
    block = vectorise(custs.iloc[0].to_dict(), None, [rows[a] for a in ids], np.linspace(1, 0.5, 5),
                      article_ids=ids, channel=1, now=tx["t_dat"].max().date(), recent=[], window=20, spec=spec)
    frame = block.to_frame(spec)
    assert frame["genres"].tolist() == [rows[a]["genres"] for a in ids]
    assert {"type_share", "purchases_since_type", "days_since_type"} <= set(spec.numeric)
    now = tx["t_dat"].max().date()
    bought = [a for a in rows if rows[a]["genres"] in first["type_last_day"]][:3]
    assert bought
    days = vectorise(None, first.to_dict(), [rows[a] for a in bought], np.ones(len(bought)), article_ids=bought,
                     channel=1,
                     now=now, recent=[], window=20, spec=spec).to_frame(spec)["days_since_type"]
    assert days.tolist() == [(now - dt.date.fromisoformat(first["type_last_day"][rows[a]["genres"]])).days
                             for a in bought]
    assert frame["gender"].nunique() == 1 and frame["retrieval_rank"].tolist() == [0, 1, 2, 3, 4]

    cols = index_columns(roles)
    table = to_index_rows(arts, np.eye(len(arts), 8, dtype=np.float32), columns=cols)
    assert {"article_id", "genres", "title", "price_band", "in_stock", "vector"} <= set(table.schema.names)
    assert "product_type_name" not in table.schema.names and cols.fts == ("title",)
    assert cols.text_of(arts.head(1)) == [arts["title"].iloc[0]]


def test_vocab_round_trips_its_features(ml, tmp_path):
    data = load_dataset(load_dataset_config(ml))
    custs = customer_features(data.customers, None, data.roles)
    arts = article_features(data.articles, data.transactions, None, {}, data.roles)
    vocab = FeatureVocab.fit(arts, custs, roles=data.roles, channels=[1])
    back = FeatureVocab.load(vocab.save(tmp_path / "vocab.json"))
    assert back.query_features == vocab.query_features and back.item_cardinalities() == vocab.item_cardinalities()
