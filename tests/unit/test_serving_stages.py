import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common import ray_env
from ray_apps.schemas import RecommendRequest
from training.index import TABLE_NAME, ItemIndex, to_index_rows


def test_request_schema_rejects_bad_input():
    assert RecommendRequest(customer_id="x").k == 12
    for bad in ({"customer_id": "x", "k": 0}, {"customer_id": "x", "k": "3"}, {"customer_id": 1},
                {"customer_id": "x", "extra": 1}, {"customer_id": ""}):
        with pytest.raises(ValueError):
            RecommendRequest.model_validate(bad)


def test_item_index_returns_exact_top_k_and_pinned_version(tmp_path):
    import lancedb

    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(300, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    frame = pd.DataFrame({"article_id": [f"{i:010d}" for i in range(300)], "prod_name": "p",
                          "product_type_name": "t", "index_group_name": "g", "garment_group_name": "g",
                          "colour_group_name": "c", "price": 0.01, "stock": [0, 1, None] * 100, "min_age": 0})
    db = lancedb.connect(str(tmp_path))
    v1 = db.create_table(TABLE_NAME, data=to_index_rows(frame, vecs), mode="overwrite").version
    index = ItemIndex(str(tmp_path), TABLE_NAME, v1)
    q = vecs[7]
    ids, sims = index.search(q, 10)
    exact = np.argsort(-(vecs @ q))[:10]
    assert ids == [f"{i:010d}" for i in exact]
    assert sims[0] == pytest.approx(1.0, abs=1e-5) and list(sims) == sorted(sims, reverse=True)
    ids_f, _ = index.search(q, 10, where="in_stock")
    assert all(int(a) % 3 != 0 for a in ids_f)          # stock 0 rows are out of stock
    # a new build (new version) does not change what a reader pinned to v1 sees
    db.create_table(TABLE_NAME, data=to_index_rows(frame.iloc[:50], vecs[:50]), mode="overwrite")
    assert ItemIndex(str(tmp_path), TABLE_NAME, v1).table.count_rows() == 300


def test_fused_calls_run_inline_on_the_request_loop_or_batched_in_a_thread():
    """`serve.fused_calls`: inline stages run on the caller's loop thread (no hop); the batched
    form hands them to a worker thread. Both return the stage's answer."""
    import asyncio
    import threading

    from ray_apps.app import AppArgs, InlineCalls, LocalCalls

    class Stages:
        def __init__(self):
            self.threads = []

        def popular(self, ctx, k, filters, age):
            self.threads.append(threading.get_ident())
            return {"k": k}

    async def call(calls):
        return await calls.popular(None, 3, None, None), threading.get_ident()

    for cls, same_thread in ((InlineCalls, True), (LocalCalls, False)):
        stages = Stages()
        answer, loop_thread = asyncio.run(call(cls(stages)))
        assert answer == {"k": 3}
        assert (stages.threads == [loop_thread]) is same_thread
    assert AppArgs(workdir="w", fused_calls="batched").fused_calls == "batched"
    with pytest.raises(ValueError, match="fused_calls"):
        AppArgs(workdir="w", fused_calls="threads")


def test_inline_calls_wait_for_the_event_logs_fsync_off_the_request_loop():
    """An event's durable write can wait on a busy disk for 100+ ms: inline, the replica's other
    requests must keep being answered meanwhile, and the event is acknowledged only after it."""
    import asyncio
    import threading

    from ray_apps.app import InlineCalls

    class Stages:
        def __init__(self):
            self.disk = threading.Event()  # the fsync that has not returned yet

        def record_events(self, events):
            assert self.disk.wait(10), "the disk was never released"
            return [{"event_id": e["event_id"], "applied": True} for e in events]

        def popular(self, ctx, k, filters, age):
            return {"k": k}

    async def scenario(calls, stages):
        event = asyncio.create_task(calls.record_events([{"event_id": "e1"}]))
        await asyncio.sleep(0.05)
        served = await asyncio.wait_for(calls.popular(None, 3, None, None), 2)  # the loop is free
        assert not event.done()  # not acknowledged before the durable write returned
        stages.disk.set()
        return served, await asyncio.wait_for(event, 10)

    stages = Stages()
    served, acked = asyncio.run(scenario(InlineCalls(stages), stages))
    assert served == {"k": 3} and acked == [{"event_id": "e1", "applied": True}]


def test_inline_calls_run_a_new_search_query_off_the_request_loop_and_a_seen_one_on_it():
    """A query's first sight runs the text model and two LanceDB queries (tens of ms): inline, the
    replica's other requests must keep being answered meanwhile. A query whose pool is cached is
    answered on the loop itself (no thread hop)."""
    import asyncio
    import threading

    from ray_apps.app import InlineCalls

    class Stages:
        def __init__(self):
            self.model = threading.Event()  # the text model's forward that has not returned yet
            self.seen = {"shoes"}
            self.threads = {}

        def search_pool_cached(self, query, n):
            return query in self.seen

        def search_pool(self, query, vector, n):
            self.threads[query] = threading.get_ident()
            if query not in self.seen:
                assert self.model.wait(10), "the model never returned"
                self.seen.add(query)
            return {"query": query, "n": n}

        def popular(self, ctx, k, filters, age):
            return {"k": k}

    async def scenario(calls, stages):
        new = asyncio.create_task(calls.search_pool("red summer dress", None, 200))
        await asyncio.sleep(0.05)
        served = await asyncio.wait_for(calls.popular(None, 3, None, None), 2)  # the loop is free
        seen = await asyncio.wait_for(calls.search_pool("shoes", None, 200), 2)
        assert not new.done()
        stages.model.set()
        return served, seen, await asyncio.wait_for(new, 10)

    stages = Stages()
    loop_thread = threading.get_ident()
    served, seen, new = asyncio.run(scenario(InlineCalls(stages), stages))
    assert served == {"k": 3} and seen == {"query": "shoes", "n": 200}
    assert new == {"query": "red summer dress", "n": 200}
    assert stages.threads["shoes"] == loop_thread and stages.threads["red summer dress"] != loop_thread


def test_access_log_is_off_unless_the_config_or_the_app_args_turn_it_on():
    """Serve's per-request access log costs the replica CPU on every request: off by default."""
    from common.config import ServeConfig
    from ray_apps.app import AppArgs, deployment_options

    def enabled(serve_cfg, **args):
        opts = deployment_options(serve_cfg, AppArgs(workdir="w", **args), "fused")
        return opts["logging_config"]["enable_access_log"]

    assert enabled(ServeConfig()) is False
    assert enabled(ServeConfig(access_log=True)) is True
    assert enabled(ServeConfig(access_log=True), access_log=False) is False
    assert enabled(ServeConfig(), access_log=True) is True


def test_behind_haproxys_admission_a_replica_queues_what_haproxy_sends_before_it_counts_an_answer():
    """HAProxy enforces the bounds; the replica's own queue gets max_ongoing_requests of slack for
    the requests HAProxy sends as soon as answers are out. Without HAProxy's admission (Serve's
    proxy, the cluster's serve_config.yaml) the replica's bounds are the config's, and an
    unbounded queue (-1) stays unbounded."""
    from common.config import ServeConfig
    from ray_apps.app import AppArgs, deployment_options

    def bounds(serve_cfg, **args):
        opts = deployment_options(serve_cfg, AppArgs(workdir="w", **args), "fused")
        return opts["max_ongoing_requests"], opts["max_queued_requests"]

    cfg = ServeConfig(max_ongoing_requests=4, max_queued_requests=2)
    assert bounds(cfg) == (4, 2)
    assert bounds(cfg, haproxy_admission=True) == (4, 6)
    assert bounds(cfg, haproxy_admission=True, max_ongoing_requests=8, max_queued_requests=0) == (8, 8)
    assert bounds(ServeConfig(max_queued_requests=-1), haproxy_admission=True)[1] == -1


def test_user_code_loop_main_sets_serves_variable_in_the_replicas_environment():
    """`main` (the default) runs the app on the replica's main loop: Serve reads the variable when the
    replica's process starts, so it goes in the deployment's runtime_env; `thread` sets nothing."""
    from common.config import ServeConfig
    from ray_apps.app import AppArgs, deployment_options

    def actor(serve_cfg, **args):
        return deployment_options(serve_cfg, AppArgs(workdir="w", **args), "fused")["ray_actor_options"]

    assert "runtime_env" not in actor(ServeConfig(user_code_loop="thread"))
    env = actor(ServeConfig())["runtime_env"]["env_vars"]
    assert env == {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
    assert "runtime_env" not in actor(ServeConfig(), user_code_loop="thread")
    assert "runtime_env" in actor(ServeConfig(user_code_loop="thread"), user_code_loop="main")
    with pytest.raises(ValueError):
        ServeConfig(user_code_loop="fiber")


def test_serving_ray_head_runs_its_workers_at_the_configured_niceness(tmp_path, monkeypatch):
    """Ray adds 15 to its workers' niceness by default; the replicas (workers) and the HAProxy they
    start would then run below Ray's own processes: `rayrec serve start` passes
    `serve.worker_niceness` (0 by default) to the Ray head it starts, and Serve's control loop
    interval (`serve.control_loop_interval_s`) and a stopped replica's drain (`serve.drain_s`)."""
    from common.config import ServeConfig
    from common.workdir import Workdir
    from ray_apps import local

    calls = []
    monkeypatch.setattr(local, "_listening", lambda host, port: False)
    monkeypatch.setattr(local.subprocess, "call", lambda cmd, **kw: calls.append((cmd, kw["env"])) or 0)
    monkeypatch.setattr(ray_env, "LINK_DIR", tmp_path)  # the short link HAProxy's sockets need, made here
    wd = Workdir.at(tmp_path / "run")
    local.start_ray(wd, ServeConfig())
    local.start_ray(wd, ServeConfig(haproxy=False, worker_niceness=5, control_loop_interval_s=0.1, drain_s=30))
    (cmd, env), (_, env5) = calls
    assert "start" in cmd and "--head" in cmd
    assert env["RAY_worker_niceness"] == "0" and env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert env5["RAY_worker_niceness"] == "5" and env5["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert env["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.5" and env5["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.1"
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "5.0"
    assert env5["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "30.0"
    # HAProxy's files in the workdir (through the short link), none named without HAProxy
    assert Path(env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]).resolve() == wd.haproxy_dir / "haproxy.cfg"
    assert not set(ray_env.HAPROXY_FILE_VARIABLES) & set(env5) - set(os.environ)
    with pytest.raises(ValueError, match="worker_niceness"):
        ServeConfig(worker_niceness=20)


def test_serving_ray_head_has_haproxy_enforce_the_replicas_admission_bounds(tmp_path, monkeypatch):
    """With HAProxy and `serve.haproxy_admission` (the default), the head's HAProxy is
    rayrec-haproxy with the bounds the replicas have; without either, Ray's own HAProxy."""
    import os

    from common.config import ServeConfig
    from common.workdir import Workdir
    from ray_apps import local
    from ray_apps.haproxy_admission import ENV, Admission, admission_from_env

    calls = []
    monkeypatch.setattr(local, "_listening", lambda host, port: False)
    monkeypatch.setattr(local.subprocess, "call", lambda cmd, **kw: calls.append(kw["env"]) or 0)
    monkeypatch.setattr(ray_env, "LINK_DIR", tmp_path)
    for k in [*ENV.values(), "RAY_SERVE_HAPROXY_BINARY_PATH"]:  # as an earlier shell may have left them
        monkeypatch.setenv(k, "9")
    wd = Workdir.at(tmp_path / "run")
    local.start_ray(wd, ServeConfig(max_ongoing_requests=3, max_queued_requests=5, queue_timeout_ms=400,
                                    retry_after_s=2.4))
    local.start_ray(wd, ServeConfig(haproxy_admission=False))
    local.start_ray(wd, ServeConfig(haproxy=False))
    on, off, no_haproxy = calls
    assert admission_from_env(on) == Admission(server_maxconn=3, queue_per_replica=5, queue_timeout_ms=400,
                                               retry_after_s=2)
    assert os.access(on["RAY_SERVE_HAPROXY_BINARY_PATH"], os.X_OK)
    assert on["RAY_SERVE_HAPROXY_BINARY_PATH"].endswith("/rayrec-haproxy")
    for env in (off, no_haproxy):
        assert admission_from_env(env) is None and "RAY_SERVE_HAPROXY_BINARY_PATH" not in env


def test_cached_article_rows_drop_out_of_garbage_collection():
    """The ranker's article cache holds up to 100,000 rows: after one full collection nothing it
    holds may be tracked, or every later full collection of the replica walks all of them."""
    import gc

    from feature_store.feature_view import TTLCache
    from ray_apps.stages.ranking import atomic_row

    cache = TTLCache(10, clock=lambda: 0.0)
    rows = {f"a{i}": atomic_row({"price": 9.99, "regions": ["EU", "US"], "colour": f"c{i}", "min_age": None})
            for i in range(50)}
    cache.put_many(rows | {"unknown": None})
    gc.collect()
    held = [o for d in (cache._rows, cache._expires) for o in gc.get_referents(d)]
    assert len(held) >= 2 * 51 and not any(gc.is_tracked(o) for o in held)
    got, todo = cache.lookup(["a7", "unknown", "never"])
    assert todo == ["never"]
    assert got == {"a7": {"price": 9.99, "regions": ("EU", "US"), "colour": "c7", "min_age": None}, "unknown": None}
    assert "EU" in got["a7"]["regions"]  # what the region rule asks of it


def test_a_rebuild_can_start_each_replacement_replica_before_its_old_one_stops():
    """Serve's `max_surge_percent` on every deployment: Serve's 0 unless the config or the app
    args ask for a surge (which needs room for the replacements: configs/cluster.yaml sets 100)."""
    from common.config import ServeConfig, load_config
    from ray_apps.app import AppArgs, Ingress, Stage, deployment_options

    for topology, deployment in (("fused", Ingress), ("split", Stage)):
        assert deployment_options(ServeConfig(), AppArgs(workdir="w"), topology)["max_surge_percent"] == 0
        opts = deployment_options(ServeConfig(rollout_surge_percent=100), AppArgs(workdir="w"), topology)
        assert opts["max_surge_percent"] == 100
        assert deployment.options(**opts)._deployment_config.max_surge_percent == 100  # Serve takes it
    surge = deployment_options(ServeConfig(), AppArgs(workdir="w", rollout_surge_percent=50), "split")
    assert surge["max_surge_percent"] == 50
    assert load_config(Path(__file__).parents[2] / "configs" / "cluster.yaml").serve.rollout_surge_percent == 100
    with pytest.raises(ValueError):
        ServeConfig(rollout_surge_percent=101)
