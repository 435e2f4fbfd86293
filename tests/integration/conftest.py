"""Fixtures shared by integration modules."""
from __future__ import annotations

import os

import pytest

from common.config import load_config
from common.workdir import Workdir

TINY_RUN_PASSWORD_ENV = "RAYREC_TINY_RUN_DB_PASSWORD"


@pytest.fixture(scope="session")
def tiny_run(mariadb, tmp_path_factory: pytest.TempPathFactory) -> Workdir:
    """One pipeline run on a tiny generated dataset (real MariaDB, local Ray, models trained,
    evaluated and indexed), built once per session: a run costs over a minute on two cores, and the
    end-to-end and web-page modules each serve it in turn with a Ray of their own. Ray is shut
    down before this returns. The database password is in $RAYREC_TINY_RUN_DB_PASSWORD, which
    the run's config names and Serve's replicas inherit."""
    import ray

    from feature_store.online.mysql import MySQLOnlineStore
    from feature_store.sources import generate
    from training.pipeline import run_pipeline

    os.environ[TINY_RUN_PASSWORD_ENV] = mariadb.password  # never stored in config
    wd = Workdir.at(tmp_path_factory.mktemp("tiny") / "run")
    generate(wd.data_dir, seed=3, customers=300, articles=200, days=40)
    cfg = load_config(None, {
        "name": "e2e",
        "database": {"host": mariadb.host, "port": mariadb.port, "database": mariadb.database,
                     "user": mariadb.user, "password_env": TINY_RUN_PASSWORD_ENV, "local": False},
        "two_tower": {"epochs": 2, "batch_size": 256},
        "ranker": {"iterations": 30, "n_candidates": 50},
        "serve": {"n_candidates": 50},
    })
    store = MySQLOnlineStore.from_config(cfg.database, mariadb.password)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run_pipeline(cfg, wd, None, store)
    finally:
        store.close()
        ray.shutdown()
    return wd
