"""Surviving failures on a multi-node Ray cluster on one machine (`ray.cluster_utils.Cluster`).

A head without CPUs (GCS, Serve controller and proxy, the driver) and two worker nodes, like
cluster.yaml's head / worker split. Each worker node declares 2 logical CPUs (the machine has 2
cores in all): with 1, the index build's Ray Data actors (0.5 CPU each) can land one per node
and leave neither node the whole CPU a read task needs.

1. a worker node hosting the Ray Train worker dies mid-epoch: training resumes on another node
   from the last checkpoint, claims no epoch that was not checkpointed, and finishes;
2. a worker node hosting Serve replicas dies while a client sends requests: only the requests in
   flight at that moment fail, Serve restores the replicas and later requests succeed;
3. the online store's MariaDB restarts: Serve's replicas reconnect by themselves and purchase
   events sent while it was down are applied once after it is back (none lost).

The cluster keeps its address file and sessions in its own RAY_TMPDIR, so other Ray instances
on the machine never see it, and nodes are killed only through `Cluster.remove_node`.
"""
from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
from conftest import MariaDBHandle, free_tcp_port, start_local_mariadb
from test_train_ray import tiny_frames

from common.config import TwoTowerConfig, load_config
from common.workdir import Workdir

pytestmark = pytest.mark.integration
PASSWORD_ENV = "RAYREC_FT_DB_PASSWORD"
WORKER_NODES = 2
WORKER_CPUS = 2
# Node death is noticed within ~5 s instead of Ray's default ~15 s (health checks every 3 s, 5 misses);
# 2 s (0.5 s x 4) marked a live node dead on this machine under a load average of 30.
SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDBHandle]:
    """A MariaDB of this module's own: test 3 stops and starts it."""
    handle = start_local_mariadb(tmp_path_factory.mktemp("ft_db"))
    try:
        yield handle
    finally:
        handle.server.stop()


@pytest.fixture(scope="module")
def cluster(db: MariaDBHandle) -> Iterator[Any]:
    """Head (0 CPUs) + 2 worker nodes, the driver connected; torn down by `Cluster.shutdown`, never `ray stop`."""
    import ray
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="rrft", dir="/tmp")  # short: Ray's unix sockets live under it
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", tmp)  # the address file and sessions: invisible to other Ray users here
        # RAY_AUTH_MODE is left as the process has it: Ray reads it once per process, and a value
        # set here would outlive this module for every later ray.init in the test session.
        mp.setenv(PASSWORD_ENV, db.password)  # every node (and so every replica) inherits it
        c = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False, "_system_config": SYSTEM_CONFIG})
        try:
            ensure_workers(c)
            ray.init(address=c.address, log_to_driver=False)
            ray.data.DataContext.get_current().enable_progress_bars = False
            yield c
        finally:
            ray.shutdown()
            c.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_workers(cluster: Any, n: int = WORKER_NODES) -> None:
    """Replace killed worker nodes (what the autoscaler does on AWS)."""
    while len(cluster.worker_nodes) < n:
        cluster.add_node(num_cpus=WORKER_CPUS)
    cluster.wait_for_nodes()


def alive_actors(class_prefix: str) -> dict[str, tuple[str, str]]:
    """Alive actors whose class name starts with `class_prefix`: actor id -> (class name, node id)."""
    import ray

    return {aid: (info["ActorClassName"], info["Address"]["NodeID"])
            for aid, info in ray._private.state.actors().items()
            if info["State"] == "ALIVE" and info["ActorClassName"].startswith(class_prefix)}


def kill_node(cluster: Any, node_id: str) -> float:
    """SIGKILL every process of the worker node `node_id`; returns when it is gone (time.time())."""
    (node,) = [n for n in cluster.worker_nodes if n.node_id == node_id]
    cluster.remove_node(node, allow_graceful=False)
    return time.time()


# -- 1. training ------------------------------------------------------------------------------------
def _checkpoint_epochs(run_dir: Path) -> list[int]:
    """Epochs whose checkpoint is on storage, oldest first.

    A worker uploads `epoch_NNN/` before the controller registers it, and registering one deletes the
    previous (num_to_keep=1): the oldest folder is the registered one Ray Train would resume from,
    a newer one is uploaded but not (yet) registered.
    """
    return sorted(int(p.name.split("_")[1]) for p in run_dir.glob("epoch_*") if (p / "model.pt").is_file())


def test_training_resumes_from_the_last_checkpoint_when_its_node_dies(cluster: Any, tmp_path: Path) -> None:
    from training.two_tower.train import train_two_tower

    ensure_workers(cluster)
    frame, articles, customers = tiny_frames(n_rows=16_000, n_customers=300, n_articles=200)
    cfg = TwoTowerConfig(embedding_dim=8, output_dim=8, hidden_dims=[16], history_len=3, batch_size=32, epochs=4,
                         num_workers=1, cpus_per_worker=1, max_failures=2, early_stopping_patience=0,
                         ensemble=1)  # one run: the timings below are about its resume
    storage = tmp_path / "ckpt"
    run_dir = storage / "node_loss"
    out: dict[str, Any] = {}

    def fit() -> None:
        try:  # the checkpoints go through a URI, as with s3:// on the cluster
            out["result"] = train_two_tower(frame, articles, customers, cfg, tmp_path / "model",
                                            f"file://{storage}", progress=False, run_name="node_loss")
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            out["error"] = e

    thread = threading.Thread(target=fit, daemon=True)
    started = time.time()
    thread.start()
    deadline = time.time() + 120
    while (_checkpoint_epochs(run_dir) or [0])[0] < 2:
        assert thread.is_alive(), f"training ended before its second checkpoint: {out}"
        assert time.time() < deadline, "no epoch-2 checkpoint within 120 s"
        time.sleep(0.05)
    ((_, node_id),) = alive_actors("RayTrainWorker").values()
    registered = _checkpoint_epochs(run_dir)[0]
    t0 = time.time()
    killed_at = kill_node(cluster, node_id)
    uploaded = _checkpoint_epochs(run_dir)[-1]  # nothing uploads now: the restarted worker needs seconds
    thread.join(timeout=150)
    assert not thread.is_alive(), "training did not finish within 150 s of the node's death"
    assert "error" not in out, out.get("error")
    history = out["result"].history
    kept = [h["epoch"] for h in history if h["finished_at"] < killed_at]  # trained before the kill, kept
    assert kept == list(range(1, len(kept) + 1))
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert len(kept) < cfg.epochs, "the run finished before the node was killed: make the epochs longer"
    print(f"[ft] killed at +{t0 - started:.1f}s ({killed_at - t0:.1f}s to remove the node), checkpoints: "
          f"epoch {registered} registered, {uploaded} uploaded; epochs finished at {[round(h['finished_at'] - started, 1) for h in history]}")
    # resumed from the last checkpoint: not from scratch, and no epoch past it claimed as done
    assert registered <= len(kept) <= uploaded, (registered, kept, uploaded)
    assert all(h["finished_at"] > killed_at for h in history[len(kept):])
    assert (tmp_path / "model" / "query_tower.pt").is_file()


# -- a pipeline run served on the cluster -----------------------------------------------------------
@pytest.fixture(scope="module")
def served(cluster: Any, db: MariaDBHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Workdir, str]]:
    """A tiny pipeline run on the cluster, served by build_app; yields (workdir, base url)."""
    from ray import serve

    from feature_store.online.mysql import MySQLOnlineStore
    from feature_store.sources import generate
    from ray_apps.app import APP_NAME, build_app
    from training.pipeline import run_pipeline

    ensure_workers(cluster)
    wd = Workdir.at(tmp_path_factory.mktemp("ft_run") / "run")
    generate(wd.data_dir, seed=5, customers=200, articles=150, days=40)
    cfg = load_config(None, {
        "name": "ft",
        "database": {"host": db.host, "port": db.port, "database": db.database, "user": db.user,
                     "password_env": PASSWORD_ENV, "local": False},
        "two_tower": {"epochs": 1, "batch_size": 256, "ensemble": 1},  # what is served does not matter here
        "ranker": {"iterations": 20, "n_candidates": 40, "retrieval_for_training": "served",
                   "compare_classifier": False},
        "eval": {"split": "none"},
        "serve": {"n_candidates": 40},
    })
    store = MySQLOnlineStore.from_config(cfg.database, db.password)
    try:
        run_pipeline(cfg, wd, None, store)
    finally:
        store.close()
    port = free_tcp_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    # split: the ingress and each stage are replicas of their own, which the node kill can separate
    serve.run(build_app({"workdir": str(wd.root), "topology": "split"}), name=APP_NAME, route_prefix="/",
              blocking=False)
    try:
        yield wd, f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@dataclass
class Call:
    start: float
    end: float
    ok: bool
    detail: str = ""


@dataclass
class Client:
    """Threads that POST /v1/recommend back to back and record every call."""

    url: str
    customers: list[str]
    threads: int = 2
    calls: list[Call] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def _loop(self, offset: int) -> None:
        with httpx.Client(timeout=60) as c:
            i = offset
            while not self._stop.is_set():
                t0 = time.time()
                try:
                    r = c.post(f"{self.url}/v1/recommend", json={"customer_id": self.customers[i % len(self.customers)],
                                                                  "k": 5})
                    ok, detail = r.status_code == 200 and len(r.json()["items"]) == 5, f"{r.status_code} {r.text[:200]}"
                except httpx.HTTPError as e:
                    ok, detail = False, repr(e)
                self.calls.append(Call(t0, time.time(), ok, detail))
                i += self.threads

    def __enter__(self) -> Client:
        self._workers = [threading.Thread(target=self._loop, args=(k,), daemon=True) for k in range(self.threads)]
        for t in self._workers:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(timeout=90)

    def wait_for(self, n_ok: int, after: float, timeout: float) -> None:
        """Until `n_ok` calls started after `after` have succeeded."""
        deadline = time.time() + timeout
        while sum(c.ok for c in self.calls if c.start > after) < n_ok:
            assert time.time() < deadline, f"fewer than {n_ok} successful requests within {timeout:.0f} s: " \
                                           f"{[c.detail for c in self.calls if c.start > after][-3:]}"
            time.sleep(0.1)


def _customers(wd: Workdir) -> list[str]:
    from feature_store.sources import FILES

    return pd.read_csv(wd.data_dir / FILES["transactions"], dtype=str)["customer_id"].drop_duplicates().tolist()[:50]


# -- 2. serving -------------------------------------------------------------------------------------
def test_serving_loses_only_requests_in_flight_when_a_node_dies(cluster: Any, served: tuple[Workdir, str]) -> None:
    from ray import serve

    wd, url = served
    replicas = alive_actors("ServeReplica:")
    assert len(replicas) == 4, replicas
    assert {node for _, node in replicas.values()} <= {n.node_id for n in cluster.worker_nodes}  # none on the head
    # the node of the ranking replica, which every request passes through
    victim = next(node for cls, node in replicas.values() if cls.endswith("ranker_stage"))
    lost = sorted(cls for cls, node in replicas.values() if node == victim)
    with Client(url, _customers(wd)) as client:
        client.wait_for(10, after=0, timeout=120)
        kill_started = time.time()
        killed_at = kill_node(cluster, victim)
        client.wait_for(20, after=killed_at, timeout=120)
    failed = [c for c in client.calls if not c.ok]
    first_ok = min(c.end for c in client.calls if c.ok and c.start > killed_at)
    print(f"[ft] node with {lost} killed: {len(failed)} of {len(client.calls)} requests failed "
          f"({[c.detail[:80] for c in failed]}); first success {first_ok - killed_at:.1f}s after the kill")
    assert all(c.start <= killed_at for c in failed), [(c.start - killed_at, c.detail) for c in failed]
    # a request that failed had to be running when the node went: at most one per client thread
    assert all(c.end >= kill_started for c in failed)
    assert len(failed) <= client.threads
    assert all(c.ok for c in client.calls if c.start > killed_at)
    # Serve replaced the lost replicas on the surviving node
    restored = alive_actors("ServeReplica:")
    assert sorted(cls for cls, _ in restored.values()) == sorted(cls for cls, _ in replicas.values())
    assert victim not in {node for _, node in restored.values()}, (lost, restored)
    assert set(restored) - set(replicas), "no replica was replaced"
    # and the app is RUNNING again: Serve's status follows its health checks, which on two busy
    # cores may find a surviving replica slow for a while after the kill (seen: encoder_stage)
    t0, app = time.time(), serve.status().applications["rayrec"]
    first = (app.status, {n: d.message for n, d in app.deployments.items() if d.status != "HEALTHY"})
    while app.status != "RUNNING" and time.time() < t0 + 60:
        time.sleep(1)
        app = serve.status().applications["rayrec"]
    if first[0] != "RUNNING":
        print(f"[ft] the app was {first} when the replicas were back; {app.status} {time.time() - t0:.0f}s later")
    assert app.status == "RUNNING", (app.status, app.message, {n: (d.status, d.message)
                                                               for n, d in app.deployments.items()})


# -- 3. database restart ----------------------------------------------------------------------------
def _event(i: int, customer: str, article: str) -> Any:
    from feature_store.events import PurchaseEvent

    return PurchaseEvent(event_id=f"ft-{i:04d}", customer_id=customer, article_id=article, price=0.02,
                         event_time=f"2020-09-2{i % 3}T10:{i % 60:02d}:00")


def test_a_database_restart_is_survived_without_restarting_serve(
    cluster: Any, served: tuple[Workdir, str], db: MariaDBHandle
) -> None:
    from common.artifacts import read_manifest
    from feature_store.events import APPLIED_EVENTS, apply_purchase_event, read_event_log
    from feature_store.online.mysql import MySQLOnlineStore
    from feature_store.store import FeatureStore

    ensure_workers(cluster)
    wd, url = served
    refs = read_manifest(wd).feature_groups
    customers = _customers(wd)
    articles = pd.read_parquet(wd.resolve(refs["articles"].offline_path))["article_id"].tolist()[:10]
    replicas = alive_actors("ServeReplica:")
    store = MySQLOnlineStore.from_config(load_config(wd.config_path).database, db.password, connect_timeout=2)
    fs = FeatureStore(wd, store)
    events = [_event(i, customers[i % 5], articles[i % len(articles)]) for i in range(30)]
    pending = list(events)

    def send(batch: int) -> None:
        """The producer: apply the next events; one that raises stays pending (at-least-once)."""
        for e in list(pending[:batch]):
            try:
                apply_purchase_event(fs, refs, e)
                pending.remove(e)
            except ConnectionError:
                return

    try:
        with Client(url, customers, threads=1) as client:
            client.wait_for(5, after=0, timeout=120)
            send(10)
            assert len(pending) == 20
            down_at = time.time()
            assert db.server.stop()
            send(10)
            assert len(pending) == 20  # refused while the database is down, kept by the producer
            time.sleep(1.0)  # requests keep coming while it is down (their answers are not asserted)
            db.server.start()
            up_at = time.time()
            client.wait_for(10, after=up_at, timeout=60)
            send(len(pending))
        assert pending == []
        assert all(c.ok for c in client.calls if c.start > up_at), \
            [c.detail for c in client.calls if c.start > up_at and not c.ok]
        assert any(c.start > down_at for c in client.calls)
        assert alive_actors("ServeReplica:") == replicas  # the same replica actors: nothing was restarted
        # no event lost, none applied twice: each once online and in the event log
        logged = read_event_log(wd)
        assert sorted(logged["event_id"]) == sorted(e.event_id for e in events)
        applied = store.read_batch(APPLIED_EVENTS, [e.event_id for e in events])
        assert len(applied) == len(events)
        for e in events[:2]:  # a retried event is recognised as applied, not counted twice
            assert apply_purchase_event(fs, refs, e, log=False).applied is False
    finally:
        store.close()
        if not db.server.status()["running"]:
            db.server.start()
