"""Shared pytest fixtures.

Keep this file generic: each fixture's helpers are plain functions named after what they do,
so other fixtures (and tests that need a server of their own) can reuse them.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from common.config import DatabaseConfig, load_config
from common.ray_env import use_train_env
from common.workdir import Workdir
from feature_store.local_db import LocalMariaDB, MariaDBMissing

use_train_env()  # every Ray the tests start trains as `init_ray`'s local Ray does

# ---------------------------------------------------------------------------------------------
# MariaDB


@pytest.fixture(scope="session", autouse=True)
def _leaked_servers_stopped(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Claim this session's temp folder, and stop the test MariaDBs of earlier sessions that
    ended without their teardown (tests/leaks.py)."""
    import leaks

    base = tmp_path_factory.getbasetemp()
    leaks.claim_session(base)
    for pid, datadir in leaks.reap(base.parent, base):
        print(f"\n[tests] stopped MariaDB pid {pid} ({datadir}), left running by a session that ended")


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class MariaDBHandle:
    """A running local MariaDB: the server object, its config and the app user's password."""

    server: LocalMariaDB
    cfg: DatabaseConfig
    password: str = field(repr=False)

    @property
    def host(self) -> str:
        return self.cfg.host

    @property
    def port(self) -> int:
        return self.cfg.port

    @property
    def database(self) -> str:
        return self.cfg.database

    @property
    def user(self) -> str:
        return self.cfg.user


def local_mariadb_config(**overrides: object) -> DatabaseConfig:
    """A DatabaseConfig for a test server on a free port. The password env variable is one
    nobody sets, so the password comes from the workdir's password file."""
    values: dict[str, object] = dict(
        host="127.0.0.1",
        port=free_tcp_port(),
        database="rayrec_test",
        user="rayrec_test",
        password_env="RAYREC_TEST_DB_PASSWORD_UNSET",
        local=True,
    )
    values.update(overrides)
    return DatabaseConfig(**values)


def start_local_mariadb(root: Path, cfg: DatabaseConfig | None = None) -> MariaDBHandle:
    """Start a LocalMariaDB in workdir `root`; fails the test (no skip) if MariaDB is missing."""
    cfg = cfg or local_mariadb_config()
    server = LocalMariaDB(Workdir.at(root), cfg)
    try:
        server.start()
    except MariaDBMissing as e:
        pytest.fail(str(e), pytrace=False)
    return MariaDBHandle(server=server, cfg=cfg, password=server.password())


@pytest.fixture(scope="session")
def mariadb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDBHandle]:
    """A real MariaDB for the whole session (database/user `rayrec_test`), stopped at the end.

    Use `MySQLOnlineStore.from_config(mariadb.cfg, mariadb.password)` to talk to it. Tests that
    stop/start it must leave it running.
    """
    handle = start_local_mariadb(tmp_path_factory.mktemp("mariadb"))
    try:
        yield handle
    finally:
        handle.server.stop()


# ---------------------------------------------------------------------------------------------
# One tiny pipeline run, shared

TINY_RUN_PASSWORD_ENV = "RAYREC_TINY_RUN_DB_PASSWORD"


@pytest.fixture(scope="session")
def tiny_run(mariadb: MariaDBHandle, tmp_path_factory: pytest.TempPathFactory) -> Workdir:
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
                     "user": mariadb.user, "password_env": TINY_RUN_PASSWORD_ENV, "local": False,
                     "max_txn_rows": 120},  # the 300 customers and 200 articles go online in parts
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


# ---------------------------------------------------------------------------------------------
# A MovieLens-style dataset (bring your own data)

GENRES = ("Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Animation", "Thriller")
OCCUPATIONS = 8

MOVIELENS_CONFIG = """\
dataset:
  name: movielens-mini
  users:
    path: users.dat
    format: dat
    names: [UserID, Gender, Age, Occupation, Zip-code]
    columns: {id: UserID, categorical: [Gender, Age, Occupation]}
  items:
    path: movies.dat
    format: dat
    encoding: latin-1
    names: [MovieID, Title, Genres]
    columns: {id: MovieID, categorical: [Genres], text: [Title]}
  interactions:
    path: ratings.dat
    format: dat
    names: [UserID, MovieID, Rating, Timestamp]
    user: UserID
    item: MovieID
    timestamp: {column: Timestamp, format: unix_s}
    rating: {column: Rating, min_positive: 4}
"""


def write_movielens(root: Path, users: int = 300, movies: int = 240, per_user: int = 30, days: int = 60,
                    seed: int = 0) -> Path:
    """Write users.dat, movies.dat, ratings.dat (MovieLens 1M layout, '::' separated, no header)
    and dataset.yaml into `root`; returns the config's path.

    Planted signal: each user's favourite genre follows from occupation and gender; most of a
    user's ratings are of that genre and mostly 4-5, the rest popular movies of any genre rated
    mostly 1-3, so the positives (rating >= 4) of a user stay in one genre, which popularity
    cannot know and a model of the user's attributes and history can.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    gender = rng.choice(["F", "M"], size=users)
    occupation = rng.integers(0, OCCUPATIONS, size=users)
    age = rng.choice([1, 18, 25, 35, 45, 50, 56], size=users)
    favourite = (occupation + (gender == "M") * 3) % len(GENRES)
    genre = np.arange(movies) % len(GENRES)
    second = (genre + 1 + rng.integers(0, len(GENRES) - 1, size=movies)) % len(GENRES)
    pop = rng.zipf(1.6, size=movies).clip(max=50).astype(float)
    with open(root / "users.dat", "w", encoding="latin-1") as f:
        for u in range(users):
            f.write(f"{u + 1}::{gender[u]}::{age[u]}::{occupation[u]}::{10000 + u % 97}\n")
    with open(root / "movies.dat", "w", encoding="latin-1") as f:
        for m in range(movies):
            genres = "|".join(sorted({GENRES[genre[m]], GENRES[second[m]]})) if m % 3 == 0 else GENRES[genre[m]]
            f.write(f"{m + 1}::Movie {m + 1} é ({1980 + m % 40})::{genres}\n")
    start = 956_703_932  # 2000-04-25, as MovieLens 1M
    with open(root / "ratings.dat", "w", encoding="latin-1") as f:
        for u in range(users):
            liked = np.flatnonzero(genre == favourite[u])
            fav = rng.choice(liked, size=min(int(per_user * 0.6), len(liked)), replace=False,
                             p=pop[liked] / pop[liked].sum())
            rest = np.setdiff1d(np.arange(movies), fav)
            other = rng.choice(rest, size=per_user - len(fav), replace=False, p=pop[rest] / pop[rest].sum())
            movies_u = rng.permutation(np.concatenate([fav, other]))
            times = np.sort(rng.integers(0, days * 86400, size=len(movies_u)))
            for m, t in zip(movies_u, times, strict=True):
                good = rng.random() < (0.9 if genre[m] == favourite[u] else 0.15)
                rating = rng.integers(4, 6) if good else rng.integers(1, 4)
                f.write(f"{u + 1}::{m + 1}::{rating}::{start + int(t)}\n")
    path = root / "dataset.yaml"
    path.write_text(MOVIELENS_CONFIG)
    return path


@pytest.fixture(scope="session")
def movielens_writer():
    """`write_movielens`, for tests that size their own MovieLens-style dataset."""
    return write_movielens
