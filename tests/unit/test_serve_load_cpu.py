"""benchmarks/serve_load.py's CPU accounting (per-group CPU per request from /proc readings) and
its load generator process; online_store.py's per-call server CPU (call_cpu_split)."""
from __future__ import annotations

import importlib.util
import os
import sys
import threading
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_load.py"


def _load(path: Path = BENCH):
    spec = importlib.util.spec_from_file_location(f"{path.stem}_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_cpu_per_request_divides_each_groups_cpu_by_the_requests():
    sl = _load()
    got = sl.cpu_per_request({"serve_replicas": 10.0, "database": 2.0, "gone": 1.0},
                             {"serve_replicas": 10.5, "database": 2.1, "haproxy": 0.02, "other": 0.0}, 50)
    assert got == {"database": 2.0, "haproxy": 0.4, "serve_replicas": 10.0, "total": 12.4}


def test_the_admission_variant_runs_rays_processes_as_rayrec_serve_start_does():
    """The benchmark's `haproxy_admission` is the default serving setup: the same Ray environment
    as `rayrec serve start` builds from the default `serve:` config; each other Ray setting
    measured against it differs in one variable only."""
    from common.config import ServeConfig
    from common.ray_env import ray_serving_env

    sl = _load()
    cfg = ServeConfig()
    base = sl.VARIANT_ENV["haproxy_admission"]
    assert base == ray_serving_env(cfg.haproxy, cfg.worker_niceness, cfg.control_loop_interval_s, cfg.drain_s)
    for variant, var in (("haproxy_ray_control", "RAY_SERVE_CONTROL_LOOP_INTERVAL_S"),
                         ("haproxy_no_metrics", "RAY_SERVE_HAPROXY_METRICS_ENABLED"),
                         ("haproxy_nbthread_1", "RAY_SERVE_HAPROXY_NBTHREAD")):
        env = sl.VARIANT_ENV[variant]
        assert {k for k in env.keys() | base.keys() if env.get(k) != base.get(k)} == {var}, variant
        assert variant in sl.ADMISSION_VARIANTS


def test_this_process_is_counted_as_the_load_generator():
    sl = _load()
    before = sl.cpu_by_group()
    t_end = time.process_time() + 0.2
    while time.process_time() < t_end:  # burn CPU in this process
        sum(range(1000))
    after = sl.cpu_by_group()
    assert after["load_generator"] - before.get("load_generator", 0.0) >= 0.15


def test_the_generator_process_sends_the_plan_on_schedule_and_is_counted_as_the_load_generator():
    """The open-loop client runs in a spawned process (not the Ray driver that deploys the app):
    every planned request is sent once, in order, answers are read, and its CPU is the load
    generator's."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    sys.path.insert(0, str(BENCH.parent))
    import serve_load as sl  # by name: the spawned generator imports its function from it

    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the generator's client expects

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body["customer_id"])
            out = json.dumps({"debug": {"encode_ms": 1.5}} if self.path == "/v1/recommend" else {}).encode()
            if body["customer_id"] in ("c3", "c4"):  # c4 as HAProxy refuses (rayrec-haproxy), c3 otherwise
                out = sl.HAPROXY_REFUSAL if body["customer_id"] == "c4" else b"Request dropped"
            self.send_response(200 if body["customer_id"] not in ("c3", "c4") else 503)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address
    plan = [("recommend" if i % 2 == 0 else "search",
             sl.Http.encode(host, "POST", "/v1/recommend" if i % 2 == 0 else "/v1/search", {"customer_id": f"c{i}"}))
            for i in range(20)]
    gen = sl.Generator()
    try:
        assert gen._proc.pid in sl.GENERATOR_PIDS
        samples, wall = gen.run(f"http://{host}:{port}", plan, 100.0)
        assert gen._proc.pid in {int(p) for p in os.listdir("/proc") if p.isdigit()}  # still serving windows
    finally:
        gen.close()
        server.shutdown()
    assert sorted(seen, key=lambda c: int(c[1:])) == [f"c{i}" for i in range(20)]
    assert [s.kind for s in samples] == [k for k, _ in plan]
    assert [s.status for s in samples] == [503 if i in (3, 4) else 200 for i in range(20)]
    assert [i for i, s in enumerate(samples) if s.by_haproxy] == [4]
    assert samples[0].debug == {"encode_ms": 1.5} and samples[1].debug == {}
    assert wall >= 19 / 100.0  # request i left at i/rate: 20 requests span at least 0.19 s
    row = sl.summarise(samples, wall)
    assert row["share_503"] == 2 / 20 and row["refused_by_haproxy_share"] == 1 / 2


def test_summary_splits_the_handlers_time_from_the_clients_and_times_the_503s():
    """In overload the time a request spends before the app sees it, and how fast a refusal
    comes back, are what admission control is about: both are reported."""
    sys.path.insert(0, str(BENCH.parent))
    import serve_load as sl

    samples = [sl.Sample("recommend", 200, 40.0 + i, {"total_ms": 8.0 + i}) for i in range(10)]
    samples += [sl.Sample("recommend", 503, ms, by_haproxy=ms < 10) for ms in (2.0, 4.0, 300.0)]
    samples += [sl.Sample("search", 200, 500.0)]  # not a recommend: in neither figure
    row = sl.summarise(samples, 1.0)
    assert row["p99_ms"] == pytest.approx(48.91) and row["handler_p99_ms"] == pytest.approx(16.91)
    assert row["refused_p50_ms"] == 4.0 and row["refused_p99_ms"] == pytest.approx(294.08)
    assert row["refused_by_haproxy_share"] == pytest.approx(2 / 3)
    assert sl.summarise(samples[:10], 1.0)["refused_p99_ms"] is None


def _spin(seconds: float, done: threading.Event, release: threading.Event) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass
    done.set()
    release.wait()  # alive while read: an ended thread leaves /proc/<pid>/task (the server's threads stay)


def test_server_threads_cpu_counts_the_cpu_of_other_threads():
    bench = _load(BENCH.with_name("online_store.py"))
    before = bench.server_threads_cpu_ns(os.getpid())
    done, release = threading.Event(), threading.Event()
    worker = threading.Thread(target=_spin, args=(0.2, done, release))  # another thread's CPU, not the caller's
    worker.start()
    done.wait()
    spent = (bench.server_threads_cpu_ns(os.getpid()) - before) / 1e9
    release.set()
    worker.join()
    assert 0.2 <= spent < 2.0


def test_latency_record_keeps_repeated_runs_and_windows_apart(tmp_path, monkeypatch):
    """--variants X X and --rates 150 150 give two runs and two windows, not one overwritten."""
    sl = _load()
    rec = sl.LatencyRecord()

    def window(ms: float, n: int = 50) -> list:
        return [sl.Sample("recommend", 200, ms)] * n + [sl.Sample("similar", 200, 1.0), sl.Sample("recommend", 503, 2.0)]

    first = rec.run_name("fused", "haproxy_admission", None, {"max_queued_requests": 2})
    second = rec.run_name("fused", "haproxy_admission", None, {"max_queued_requests": 2})
    assert (first, second) == ("fused, haproxy_admission, max_queued_requests=2",
                               "fused, haproxy_admission, max_queued_requests=2 #2")
    rec.add(first, "150 req/s", window(10.0), 150, {"p50_ms": 10.0, "p99_ms": 10.0})
    rec.add(first, "150 req/s", window(30.0), 150, {"p50_ms": 30.0, "p99_ms": 30.0})
    assert list(rec.windows[first]) == ["150 req/s", "150 req/s #2"]
    assert rec.windows[first]["150 req/s #2"].tolist() == [30.0] * 50  # answered recommends only
    assert rec.points[first] == [(150, 10.0, 10.0), (150, 30.0, 30.0)]
    drawn = {}
    real = sl.latency_histograms
    monkeypatch.setattr(sl, "latency_histograms", lambda path, title, panels, targets: drawn.update(panels) or real(
        path, title, panels, targets))
    paths = rec.plot(tmp_path)
    assert list(drawn) == [first]  # the second run has no window: left out, not an empty panel
    assert [p.name for p in paths] == ["serve_load_latency.png", "serve_load_latency_vs_rate.png"]
    assert all(p.stat().st_size > 5_000 for p in paths)
