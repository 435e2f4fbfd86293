"""The whole flow on a tiny generated dataset: real MariaDB, real local Ray, real Serve over HTTP."""
from __future__ import annotations

import json

import httpx
import pandas as pd
import pytest

from common.artifacts import read_manifest
from common.config import load_config
from common.workdir import Workdir
from feature_store.online.mysql import MySQLOnlineStore
from feature_store.sources import FILES, generate

pytestmark = pytest.mark.integration
PASSWORD_ENV = "RAYREC_E2E_DB_PASSWORD"


def free_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(mariadb, tmp_path_factory):
    """Run the pipeline into a fresh workdir and serve it; yields (workdir, base url)."""
    import os

    import ray
    from ray import serve

    from ray_apps.app import APP_NAME, build_app
    from training.pipeline import run_pipeline

    os.environ[PASSWORD_ENV] = mariadb.password  # replicas inherit it; never stored in config
    root = tmp_path_factory.mktemp("e2e")
    wd = Workdir.at(root / "run")
    generate(wd.data_dir, seed=3, customers=300, articles=200, days=40)
    cfg = load_config(None, {
        "name": "e2e",
        "database": {"host": mariadb.host, "port": mariadb.port, "database": mariadb.database,
                     "user": mariadb.user, "password_env": PASSWORD_ENV, "local": False},
        "two_tower": {"epochs": 2, "batch_size": 256},
        "ranker": {"iterations": 30, "n_candidates": 50},
        "serve": {"n_candidates": 50},
    })
    store = MySQLOnlineStore.from_config(cfg.database, mariadb.password)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run_pipeline(cfg, wd, None, store)
        port = free_tcp_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"workdir": str(wd.root)}), name=APP_NAME, route_prefix="/", blocking=False)
        yield wd, f"http://127.0.0.1:{port}"
    finally:
        store.close()
        serve.shutdown()
        ray.shutdown()


def _raw(wd: Workdir):
    arts = pd.read_csv(wd.data_dir / FILES["articles"], dtype=str)
    tx = pd.read_csv(wd.data_dir / FILES["transactions"], dtype=str)
    return set(arts["article_id"]), tx


def test_pipeline_outputs(served):
    wd, _ = served
    metrics = json.loads(wd.metrics_path.read_text())
    for model in ("popularity", "popularity_global", "repeat", "ease", "retrieval", "ranked"):
        assert {"map@12", "recall@10", "recall@12", "recall@50", "recall@100", "ndcg@10", "coverage@12"} <= set(
            metrics[model])
        assert all(0.0 <= v <= 1.0 for v in metrics[model].values())
    assert metrics["n_eval_customers"] > 0
    assert metrics["comparison"]["best_baseline"] in metrics["models"]
    # no leakage: the retrieval training data ends before the held-out week, on the actual files
    view = pd.read_parquet(wd.views_dir / "retrieval" / "v1" / "train.parquet")
    cutoff = pd.Timestamp(metrics["protocol"]["cutoff"])
    assert view["t_dat"].max() < cutoff
    tx = pd.read_csv(wd.data_dir / FILES["transactions"], dtype=str, parse_dates=["t_dat"])
    assert len(view) == int((tx["t_dat"] < cutoff).sum())
    m = read_manifest(wd)
    assert m.index is not None and m.index.n_rows == 200
    for rel in m.models.values():
        assert wd.resolve(rel).is_file()
    assert (wd.reports_dir / "training.png").is_file() and (wd.reports_dir / "recall.png").is_file()


def test_recommend_returns_k_unbought_existing_articles(served):
    wd, url = served
    article_ids, tx = _raw(wd)
    buyers = tx["customer_id"].value_counts()
    with httpx.Client(timeout=60) as c:
        for cid in [buyers.index[0], buyers.index[len(buyers) // 2]]:
            r = c.post(f"{url}/v1/recommend", json={"customer_id": cid, "k": 12, "debug": True})
            assert r.status_code == 200, r.text
            items = [i["article_id"] for i in r.json()["items"]]
            assert len(items) == 12 and len(set(items)) == 12
            assert set(items) <= article_ids
            bought = set(tx.loc[tx["customer_id"] == cid, "article_id"])
            assert not set(items) & bought
            scores = [i["score"] for i in r.json()["items"]]
            assert scores == sorted(scores, reverse=True)
            assert r.json()["debug"]["n_after_filter"] >= 12


def test_unknown_customer_still_gets_recommendations(served):
    _, url = served
    r = httpx.post(f"{url}/v1/recommend", json={"customer_id": "not-a-customer", "k": 5}, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["items"]) == 5


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"k": 12}, "customer_id"),
        ({"customer_id": "x", "k": 0}, "k"),
        ({"customer_id": "x", "k": -3}, "k"),
        ({"customer_id": "x", "k": 101}, "k"),
        ({"customer_id": "x", "colour": "red"}, "colour"),
        ({"customer_id": 123}, "customer_id"),
        ({"customer_id": "x", "k": "twelve"}, "k"),
        ({"customer_id": "x", "context": {"sales_channel": 3}}, "context.sales_channel"),
    ],
)
def test_bad_requests_get_422_naming_the_field(served, body, field):
    _, url = served
    r = httpx.post(f"{url}/v1/recommend", json=body, timeout=30)
    assert r.status_code == 422, r.text
    assert field in r.json()["message"]


def test_healthz(served):
    _, url = served
    assert httpx.get(f"{url}/healthz", timeout=10).json() == {"status": "ok"}


# -- filtering, ranking and batch recommendations (issue #9) -----------------------------------


def _articles_group(wd: Workdir) -> pd.DataFrame:
    ref = read_manifest(wd).feature_groups["articles"]
    return pd.read_parquet(wd.resolve(ref.offline_path)).set_index("article_id")


def _recommend(url: str, body: dict) -> dict:
    r = httpx.post(f"{url}/v1/recommend", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_ranking_metrics_and_importance_are_reported(served):
    wd, _ = served
    metrics = json.loads(wd.metrics_path.read_text())
    ranking = metrics["ranking"]
    for name in ("popularity", "retrieval", "ranked", "ranked_classifier", "retrieval_filtered", "served"):
        assert set(ranking["metrics"][name]) == {"map@12", "ndcg@12"}
    assert "ranked_vs_retrieval_map@12" in ranking and "classifier_vs_retrieval_map@12" in ranking
    assert ranking["ranker"]["groups"] > 0 and len(ranking["ranker"]["cutoffs"]) == 2
    assert ranking["ranker"]["retrieval_for_training"] == "refit"
    assert (wd.root / ranking["importance_png"]).is_file()


def test_request_filters_over_http(served):
    wd, url = served
    arts = _articles_group(wd)
    _, tx = _raw(wd)
    cid = tx["customer_id"].value_counts().index[0]
    group = arts["index_group_name"].value_counts().index[0]
    out = _recommend(url, {"customer_id": cid, "k": 5, "filters": {"index_groups": [group]}, "debug": True})
    assert len(out["items"]) == 5 and out["warnings"] == []
    assert {arts.loc[i["article_id"], "index_group_name"] for i in out["items"]} == {group}
    assert out["debug"]["filter_removed"]["index_group"] > 0
    cheap = float(arts["price"].quantile(0.5))
    out = _recommend(url, {"customer_id": cid, "k": 5, "filters": {"max_price": cheap}})
    assert all(arts.loc[i["article_id"], "price"] <= cheap for i in out["items"])


def test_too_strict_filters_return_fewer_items_and_say_so(served):
    _, url = served
    out = _recommend(url, {"customer_id": "not-a-customer", "k": 12, "filters": {"max_price": 1e-9}, "debug": True})
    assert out["items"] == []
    assert "only 0 of k=12" in out["warnings"][0]
    assert len(out["debug"]["fetches"]) >= 2  # it asked retrieval for more before giving up


@pytest.mark.parametrize(("filters", "field"), [({"colour": "red"}, "filters.colour"),
                                                ({"max_price": -1}, "filters.max_price"),
                                                ({"index_groups": []}, "filters.index_groups")])
def test_bad_filters_get_422_naming_the_field(served, filters, field):
    _, url = served
    r = httpx.post(f"{url}/v1/recommend", json={"customer_id": "x", "filters": filters}, timeout=30)
    assert r.status_code == 422, r.text
    assert field in r.json()["message"]


def test_recommend_batch_agrees_with_http(served, monkeypatch, capsys):
    import argparse

    from ray_apps.batch_cli import add_batch_commands

    wd, url = served
    _, tx = _raw(wd)
    buyers = tx["customer_id"].value_counts()
    cids = [buyers.index[0], buyers.index[len(buyers) // 2], "not-a-customer"]
    http = {c: _recommend(url, {"customer_id": c, "k": 12, "context": {"date": "2020-10-01", "sales_channel": 1}})
            for c in cids}
    ids_file = wd.root / "batch_customers.txt"
    ids_file.write_text("\n".join(cids) + "\n")
    # The command turns on Ray token auth for its own Ray; this process's Ray is already up, and
    # changing the auth variables under it would break later `ray.init`s in this test session.
    monkeypatch.setattr("ray_apps.ray_auth.use_ray_token", lambda wd: None)
    parser = argparse.ArgumentParser()
    add_batch_commands(parser.add_subparsers())
    out = wd.root / "batch.parquet"
    args = parser.parse_args(["recommend-batch", "--workdir", str(wd.root), "--k", "12", "--out", str(out),
                              "--customers", str(ids_file), "--date", "2020-10-01", "--channel", "1"])
    assert args.func(args) == 0
    assert "36 rows for 3 customers" in capsys.readouterr().out
    got = pd.read_parquet(out)
    assert list(got.columns) == ["customer_id", "rank", "article_id", "score"]
    for c in cids:
        mine = got[got["customer_id"] == c].sort_values("rank")
        assert mine["rank"].tolist() == list(range(1, 13))
        assert mine["article_id"].tolist() == [i["article_id"] for i in http[c]["items"]]
        assert mine["score"].tolist() == pytest.approx([i["score"] for i in http[c]["items"]], abs=1e-9)
