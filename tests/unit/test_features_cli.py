"""`rayrec features build | describe | validate | retire` as functions, and their argument parsing."""
from __future__ import annotations

import argparse

import pandas as pd
import pytest

from common.workdir import Workdir
from feature_store.online.base import InMemoryOnlineStore
from feature_store.sources import generate
from feature_store.store import FeatureStore
from feature_store.transforms import backfill_times
from ray_apps.features_cli import (
    add_features_commands,
    build_features,
    describe_features,
    format_table,
    main,
    retire_features,
    validate_features,
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hm")
    generate(d, seed=5, customers=120, articles=60, days=20)
    return d


def test_build_then_describe(tmp_path, data_dir):
    fs = FeatureStore(Workdir.at(tmp_path), InMemoryOnlineStore())
    refs = build_features(fs, data_dir, event_time="2020-07-01")
    assert set(refs) == {"transactions", "customers", "articles", "customer_history"}
    assert refs["articles"].online_table == "fg_articles_v1" and refs["transactions"].online_table is None
    build_features(fs, data_dir, names=["articles"])
    rows = {(r["group"], r["version"]): r for r in describe_features(fs)}
    assert set(rows) == {("transactions", 1), ("customers", 1), ("articles", 1), ("articles", 2),
                         ("customer_history", 1)}
    assert rows[("articles", 2)]["online_rows"] == rows[("articles", 2)]["offline_rows"] == 60
    table = format_table(list(rows.values()))
    assert "fg_articles_v2" in table and "freshness_s" in table.splitlines()[0]


def test_a_rebuild_keeps_the_purchases_serving_logged(tmp_path, data_dir, capsys):
    """A purchase applied online by POST /v1/events is logged in the workdir; rebuilding the
    groups from the data files would drop it from the new version unless the log joins them."""
    from feature_store.events import PurchaseEvent, append_log_lines, event_log_dir
    from feature_store.sources import FILES

    tx = pd.read_csv(data_dir / FILES["transactions"], dtype={"article_id": str})
    cid, aid = tx["customer_id"].iloc[0], tx["article_id"].iloc[-1]
    last = pd.Timestamp(tx["t_dat"].max())
    fs = FeatureStore(Workdir.at(tmp_path), InMemoryOnlineStore())
    ev = PurchaseEvent("served-1", cid, aid, 0.05, (last + pd.Timedelta(days=1)).isoformat())
    append_log_lines(event_log_dir(fs.wd), [(ev.timestamp, ev.to_dict())], durable=False)
    without = build_features(fs, data_dir, names=["customer_history"], event_time="2020-07-01")
    with_log = build_features(fs, data_dir, names=["customer_history"], event_time="2020-07-02",
                              event_log_max_gap_days=30)
    assert "1 of 1 logged purchases added" in capsys.readouterr().out

    def history(ref):
        return fs.get_feature_group("customer_history", ref.version).read_online([cid])[cid]

    before, after = history(without["customer_history"]), history(with_log["customer_history"])
    assert after["n_purchases"] == before["n_purchases"] + 1 and after["purchased"][0] == aid
    assert main(["features", "describe", "--workdir", str(tmp_path), "--config", str(_no_db(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert f"event log: 1 purchases ({ev.timestamp.isoformat()} .. {ev.timestamp.isoformat()}), 0 views" in out


def _no_db(tmp_path):
    cfg = tmp_path / "no-db.yaml"
    cfg.write_text("database: {local: false, port: 1}\n")  # describe then shows offline figures only
    return cfg


def test_validate_reports_without_writing(tmp_path, data_dir):
    reports = validate_features(data_dir)
    assert all(r.ok for r in reports.values()), {n: r.summary_lines() for n, r in reports.items()}
    assert not (tmp_path / "feature_store").exists()


def test_build_and_validate_from_a_dataset_config(tmp_path, movielens_writer, capsys):
    """Non-H&M files mapped by a dataset config build and validate with the same commands."""
    from feature_store.dataset import load_dataset_config

    cfg_path = movielens_writer(tmp_path / "ml", users=40, movies=30, per_user=8, days=20)
    reports = validate_features(load_dataset_config(cfg_path))
    assert set(reports) == {"transactions", "customers", "articles", "customer_history"}
    assert all(r.ok for r in reports.values()), {n: r.summary_lines() for n, r in reports.items()}
    fs = FeatureStore(Workdir.at(tmp_path / "run"), InMemoryOnlineStore())
    refs = build_features(fs, load_dataset_config(cfg_path), names=["articles", "customers"], event_time="2020-01-01")
    assert set(refs) == {"articles", "customers"}
    arts = fs.get_feature_group("articles").read()
    assert len(arts) == 30 and "genres" in {f.name for f in fs.get_feature_group("articles").group.features}
    assert main(["features", "validate", "--workdir", str(tmp_path / "run"), "--dataset", str(cfg_path)]) == 0
    assert main(["features", "validate", "--workdir", str(tmp_path / "run"), "--dataset", str(cfg_path),
                 "--data", str(tmp_path)]) == 2
    assert "not both" in capsys.readouterr().err


def test_parser_registers_the_commands(tmp_path, capsys):
    p = argparse.ArgumentParser(prog="rayrec")
    add_features_commands(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["features", "describe", "--workdir", str(tmp_path), "--json"])
    assert args.features_command == "describe" and args.json
    args = p.parse_args(["features", "build", "--workdir", str(tmp_path), "--group", "articles", "--validation",
                         "always"])
    assert args.group == ["articles"] and args.validation == "always" and args.backfill_weeks == 0
    assert p.parse_args(["features", "build", "--backfill-weeks", "3"]).backfill_weeks == 3
    with pytest.raises(SystemExit):
        p.parse_args(["features", "build", "--group", "nope"])
    assert main(["features", "describe", "--workdir", str(tmp_path / "empty"), "--json"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        '{"event_log": {"purchases": 0, "first_purchase": null, "last_purchase": null, "interactions": 0}}']


def test_hm_purchases_view_training_data_and_vectors(tmp_path, data_dir):
    from feature_store.views import PURCHASES_VIEW

    fs = FeatureStore(Workdir.at(tmp_path), InMemoryOnlineStore())
    build_features(fs, data_dir, event_time="2019-01-01")  # snapshots older than every purchase
    fv = fs.create_feature_view(PURCHASES_VIEW)
    tx = fs.get_feature_group("transactions").read()
    cut = tx["t_dat"].sort_values().iloc[len(tx) * 3 // 4]
    td = fv.train_test_split(train_end=cut)
    assert td.meta["rows"]["train"] + td.meta["rows"]["test"] == len(tx)
    x = td.features("train")
    assert {"age", "age_group__0", "article_price", "month_sin", "sales_channel_id"} <= set(x.columns)
    assert x["article_price"].between(0, 1).all()
    row = tx.iloc[0]
    v = fv.get_feature_vectors([{"customer_id": row["customer_id"], "article_id": row["article_id"]}],
                               request={"date": "2020-09-23", "sales_channel_id": 2})
    assert v.status == ["complete"] and list(v.columns) == list(x.columns)


def test_backfilled_weekly_snapshots_give_each_label_the_values_of_its_week(tmp_path, data_dir, capsys):
    """`--backfill-weeks`: a point-in-time view over a snapshot group sees, for each purchase,
    the group as it was at the start of the purchase's week (never a later value), not nothing."""
    from feature_store.feature_view import FeatureSelection, FeatureView

    fs = FeatureStore(Workdir.at(tmp_path), InMemoryOnlineStore())
    refs = build_features(fs, data_dir, backfill_weeks=2)
    assert "as of" in capsys.readouterr().out
    tx = fs.get_feature_group("transactions").read()
    times = backfill_times(tx, 2)
    assert times[1] - times[0] == pd.Timedelta(days=7) and times[1] == tx["t_dat"].max().normalize() - pd.Timedelta(days=6)
    hist = fs.get_feature_group("customer_history").read()
    assert sorted(hist["event_time"].unique())[:2] == times  # then the current snapshot ("now")
    assert (fs.get_feature_group("customers").read()["event_time"].min() == times[0])  # profiles: once, first
    fv = fs.create_feature_view(FeatureView("weekly", (FeatureSelection("customer_history", ("n_purchases",)),),
                                            label_group="transactions", label_features=("sales_channel_id",)))
    frame = fv.training_data().frame("train")
    assert len(frame) == len(tx)
    seen = 0
    for row in frame.itertuples():
        at = [t for t in times if t <= row.event_time]
        mine = tx[tx["customer_id"] == row.customer_id]
        if not at or not (mine["t_dat"] < at[-1]).any():  # no snapshot yet, or no purchase before it
            assert pd.isna(row.n_purchases)
            continue
        assert row.n_purchases == (mine["t_dat"] < at[-1]).sum()
        seen += 1
    assert seen > 50
    online = fs.get_feature_group("customer_history").read_online(list(tx["customer_id"].unique()))
    assert all(r["n_purchases"] == (tx["customer_id"] == c).sum() for c, r in online.items())  # online: now
    assert refs["customer_history"].version == 1
    with pytest.raises(ValueError, match="after the last backfill time"):
        build_features(fs, data_dir, backfill_weeks=2, event_time="2019-01-01")
    assert {(r["group"], r["version"]) for r in describe_features(fs)} == {(g, 1) for g in refs}  # nothing new


def test_retire_keeps_what_the_manifest_serves(tmp_path, data_dir):
    from common.artifacts import new_manifest, write_manifest

    wd = Workdir.at(tmp_path)
    fs = FeatureStore(wd, InMemoryOnlineStore())
    served = build_features(fs, data_dir, names=["articles", "customers"], event_time="2020-07-01")
    for _ in range(2):
        build_features(fs, data_dir, names=["articles"])
    manifest = new_manifest("t")
    manifest.feature_groups.update(served)  # the app serves v1 of both, built first
    write_manifest(wd, manifest)
    assert retire_features(fs, keep=1, dry_run=True) == [
        {"group": "articles", "version": 2, "online_table": "fg_articles_v2", "online_rows": 60}]
    with pytest.raises(ValueError, match="'articles' v1 is what the manifest serves"):
        retire_features(fs, version=1, groups=["articles"])
    with pytest.raises(ValueError, match="--version needs exactly one --group"):
        retire_features(fs, version=2)
    assert [r["version"] for r in retire_features(fs, version=2, groups=["articles"])] == [2]
    rows = {(r["group"], r["version"]): r for r in describe_features(fs)}
    assert rows[("articles", 2)]["online_retired_at"] and rows[("articles", 2)]["online_table"] is None
    assert rows[("articles", 1)]["online_rows"] == 60 and rows[("articles", 3)]["online_rows"] == 60
    assert "online_retired_at" in format_table(list(rows.values())).splitlines()[0]


def test_retire_parses_keep_or_one_version(tmp_path):
    p = argparse.ArgumentParser(prog="rayrec")
    add_features_commands(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["features", "retire", "--workdir", str(tmp_path)])
    assert (args.keep, args.version, args.group, args.dry_run) == (2, None, None, False)
    args = p.parse_args(["features", "retire", "--version", "3", "--group", "articles", "--dry-run", "--json"])
    assert (args.version, args.group, args.dry_run, args.json) == (3, ["articles"], True, True)
    with pytest.raises(SystemExit):
        p.parse_args(["features", "retire", "--keep", "1", "--version", "3"])
