"""Bring your own data end to end: a MovieLens-style dataset through `rayrec pipeline --dataset`,
on the real MariaDB and local Ray, then one request through the serving stages."""
from __future__ import annotations

import datetime as dt
import json

import pytest
import yaml

from common.artifacts import read_manifest
from common.workdir import Workdir

pytestmark = pytest.mark.integration
PASSWORD_ENV = "RAYREC_BYOD_DB_PASSWORD"


@pytest.fixture(scope="module")
def run(mariadb, tmp_path_factory, movielens_writer):
    """`rayrec pipeline --dataset` on a planted-signal MovieLens-style dataset; yields the workdir."""
    import os

    import ray

    from ray_apps.cli import main

    root = tmp_path_factory.mktemp("byod")
    dataset = movielens_writer(root / "ml", users=300, movies=240, per_user=30, days=60)
    raw = yaml.safe_load(dataset.read_text())
    raw["dataset"]["items"]["columns"].pop("text")  # the MiniLM text vectors cost 20 s here (unit-tested)
    dataset.write_text(yaml.safe_dump(raw))
    run_cfg = root / "run.yaml"
    run_cfg.write_text(yaml.safe_dump({
        "name": "byod",
        "database": {"host": mariadb.host, "port": mariadb.port, "database": mariadb.database,
                     "user": mariadb.user, "password_env": PASSWORD_ENV, "local": False},
        "two_tower": {"epochs": 4, "batch_size": 256, "ensemble": 1},  # the tiny run trains the ensemble
        "ranker": {"iterations": 30, "n_candidates": 50, "retrieval_for_training": "served",
                   "compare_classifier": False},
        "serve": {"n_candidates": 50},
    }))
    os.environ[PASSWORD_ENV] = mariadb.password  # never stored in the config
    started = not ray.is_initialized()
    wd = Workdir.at(root / "run")
    try:
        with pytest.MonkeyPatch.context() as mp:  # Ray is imported already: no token auth for this instance
            mp.setattr("ray_apps.ray_auth.use_ray_token", lambda wd: None)
            argv = ["pipeline", "--dataset", str(dataset), "--config", str(run_cfg), "--workdir", str(wd.root)]
            assert main(argv) == 0
        yield wd
    finally:
        if started:
            ray.shutdown()


def test_metrics_have_the_models_and_baselines_and_retrieval_beats_popularity(run):
    metrics = json.loads(run.metrics_path.read_text())
    assert metrics["dataset"] == "movielens-mini" and metrics["protocol"]["split"] == "time"
    for model in ("popularity", "popularity_global", "repeat", "ease", "retrieval", "ranked"):
        assert {"map@12", "recall@12", "recall@100", "ndcg@10"} <= set(metrics[model])
    assert metrics["n_eval_customers"] > 50
    assert metrics["retrieval"]["map@12"] > 2 * metrics["popularity"]["map@12"]
    assert metrics["retrieval"]["recall@50"] > metrics["popularity"]["recall@50"]
    importance = metrics["ranking"]["importance"]
    assert {"gender", "occupation", "genres", "type_share"} <= set(importance)  # the declared roles


def test_manifest_names_the_dataset_and_its_roles(run):
    manifest = read_manifest(run)
    assert manifest.extra["dataset"]["name"] == "movielens-mini"
    assert manifest.extra["dataset"]["roles"]["user_categorical"] == ["gender", "age", "occupation"]
    assert manifest.index is not None and manifest.index.n_rows == 240
    assert {"query_tower", "item_tower", "vocab", "ranker"} <= set(manifest.models)
    vocab = json.loads(run.resolve(manifest.models["vocab"]).read_text())
    assert [f[0] for f in vocab["item_features"]] == ["article_id", "genres"]


def test_a_byod_run_serves_through_the_serving_stages(run, mariadb):
    """The classes the Serve deployments wrap, in process: online features -> query tower ->
    index -> rules + ranker (read online) for a known and an unknown user."""
    from common.config import load_config
    from feature_store.online.mysql import MySQLOnlineStore
    from ray_apps.schemas import Candidates
    from ray_apps.stages.encoder import QueryEncoder
    from ray_apps.stages.online import OnlineFeatures
    from ray_apps.stages.ranking import OnlineRanker, ranking_stage
    from training.index import ItemIndex

    manifest = read_manifest(run)
    cfg = load_config(run.config_path)
    store = MySQLOnlineStore.from_config(cfg.database, mariadb.password)
    try:
        features = OnlineFeatures(store, manifest)
        encoder = QueryEncoder(run.two_tower_dir, cfg.two_tower.history_len)
        ref = manifest.index
        index = ItemIndex(str(run.resolve(ref.uri)), ref.table, ref.version)
        ranker = OnlineRanker(store, manifest, ranking_stage(run, manifest, cfg))
        for user in ("7", "no-such-user"):
            customer, history = features.customer(user)
            assert (customer is not None) == (user == "7")
            purchased = list((history or {}).get("purchased") or [])
            ids, scores = index.search(encoder.encode(user, customer, purchased, 6, 1), 50)
            out = ranker.rank(Candidates(article_ids=ids, scores=[float(s) for s in scores]), customer, history,
                              channel=1, now=dt.date(2000, 6, 24), k=10)
            assert len(out.article_ids) == 10 and not set(out.article_ids) & set(purchased)
    finally:
        store.close()
