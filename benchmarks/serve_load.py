"""Open-loop HTTP load on the Serve app, per topology, against the same pipeline in-process.

Requests are sent on a fixed schedule (rate r: request i leaves at i/r seconds) whether or not
earlier ones have answered, and latency counts from the scheduled time, so a server that falls
behind shows it (no coordinated omission). The mix is mostly recommend, some similar, search
and events (search queries repeat; with `--search-queries novel` nearly each is new). Each
topology (fused, split) and Serve variant (default proxy; HAProxy ingress:
RAY_SERVE_ENABLE_HA_PROXY=1, with the replicas refusing past their bounds; `haproxy_admission`:
HAProxy enforcing those bounds itself, as `rayrec serve start` runs it; throughput-optimized:
RAY_SERVE_THROUGHPUT_OPTIMIZED=1) runs on a fresh local Ray. The same recommend pipeline called
in-process without Serve gives the baseline
(`ratio_vs_in_process` = served p50 / in-process p50). After the rates, an overload case offers
twice the highest rate that held the target (p99 <= 50 ms, no errors) and reports the goodput.
Each rate also reports `cpu_ms_per_request`: the machine's CPU over the rate's window per request
sent, by process group (serve replicas, HAProxy, database, Ray's own processes, the load
generator, ...), read from /proc, so the cost of each part of the serving stack shows. The load
generator is a process of its own (`Generator`), not this one, which is a Ray driver; its
`send_late_p99_ms` says how late it sent requests against the schedule (its own delays).
`db_statements_per_request` is the database server's statement count over the window per
request sent (every client's; the counter's own reads left out).
Two more variants measure Ray settings against `haproxy_admission`: `haproxy_no_metrics`
(RAY_SERVE_HAPROXY_METRICS_ENABLED=0: no per-request log line from HAProxy for Serve's ingress
metrics, which the Grafana dashboard reads, so it stays on) and `haproxy_ray_control` (Serve's
control loop every 0.1 s, Ray's default, against `serve.control_loop_interval_s`, 0.5 s).

The events are real writes to the run in --workdir: its purchases (a fifth of the events, dated
now) change the run's online rows and are logged in its workdir like any served event. The next
pipeline run in that workdir leaves them out while the data ends long before today (a generated or
H&M sample: `data.event_log_max_gap_days`); on a run whose data is current, benchmark a copy.

JSON lines, e.g.
    {"bench": "serve_load", "topology": "fused", "variant": "default", "target_rps": 100,
     "achieved_rps": .., "p50_ms": .., "p95_ms": .., "p99_ms": .., "error_rate": .., ...}
    {"bench": "serve_load", "case": "overload", "topology": ..., "offered_rps": .., "goodput_rps": ..,
     "share_503": .., "ratio_vs_sustainable": .., "p99_ms": .., "handler_p99_ms": .., "refused_p99_ms": ..}
        (p99_ms: accepted recommends, from the client; handler_p99_ms: the same requests' time in
         the app's handler; queued_p50/p99_ms: how long they waited between HAProxy and the
         handler (admission variants: HAProxy's queue, the replica's, its loop); refused_p50/p99_ms:
         how long a 503 took to come back; refused_by_haproxy_share and refused_shed_share: the
         503s HAProxy answered itself and those a replica's shedder answered, ray_apps.shedding)
    {"bench": "serve_load", "case": "in_process", "p50_ms": .., "p99_ms": ..}
    {"bench": "serve_load", "case": "in_process_search", "first_p50_ms": .., "repeat_p50_ms": ..,
     "ratio_vs_first": ..}   (search in-process: a query's first sight against its repeats)
    {"bench": "serve_load", "case": "search_loop_stall", "loop_late_max_ms": .., "on_loop_late_max_ms": ..,
     "ratio_vs_on_loop": ..}   (how late the request loop wakes while new search queries run, in a
     worker thread as served against on the loop itself)
    {"bench": "serve_load", "case": "gc_full_collect", "tracked_objects": .., "unsettled_ms": ..,
     "settled_ms": .., "last_good_ms": .., "python_rows_ms": .., "ratio_vs_python_rows": ..,
     "article_cache_ms": .., "row_pairs_ms": .., "ratio_vs_row_pairs": ..}
        (a full GC with a run loaded, before/after settle_heap; then with the last-good customer
         cache full, against the same rows kept as Python objects; then with the article cache
         full, against (expiry, row) pairs of the rows as read)
    {"bench": "serve_load", "case": "query_encoder", "cpu_ms": .., "torch_cpu_ms": .., "ratio_vs_torch": ..}
        (one request's query embedding, paced like serving: the numpy forward serving takes
         against the torch forward, same rows)
    {"bench": "serve_load", "case": "wakeup_cost", "sleep_wake_cpu_us": .., "thread_hop_cpu_us": ..}
        (CPU of waking a sleeping thread on this machine, at a serving-like 100 per second: what
         each timer, thread hop or background thread woken per request costs besides its work)
    {"bench": "serve_load", "case": "stage_batch_cost", "batch": 1|2|4, "encode_cpu_ms": ..,
     "rank_cpu_ms": .., "ratio_vs_alone": ..}
        (process CPU per request of the encoder's and the ranker's calls for requests alone or
         in groups sharing one call, as `fused_calls: coalesced` groups them, paced like serving)

Usage: python benchmarks/serve_load.py [--workdir RUN] [--rates 25 50 100 150 200] [--duration 8]
       [--topologies fused split] [--variants default haproxy_admission] (the defaults; also haproxy, throughput, ...)
       [--candidates 200]
       [--max-ongoing N] [--max-queued N] [--queue-timeout-ms T] [--shed-delay-ms 0 15] [--shed-interval-ms I]
       [--article-cache-ttl-s 2 0] [--fused-calls inline batched]
       [--access-log on off] [--user-code-loop thread main] [--search-queries repeat|novel]
       [--served-only] [--samples-out FILE] [--plots DIR]
Without --workdir it builds a small pipeline run in a temp folder (with its own MariaDB).

Plots (--plots DIR, else $RAYREC_BENCH_PLOTS as `make bench` sets it, else RUN/reports of
--workdir): serve_load_latency.png, a histogram of the answered recommends' latencies per app run
and window (the overload case's accepted requests too), and serve_load_latency_vs_rate.png, their
p50 and p99 against the offered rate, each with the 50 ms target.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import os
import random
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, json_lines_only, paced_cpu_s  # noqa: E402
from _plots import PLOTS_ENV, latency_histograms, latency_vs_rate, plots_dir  # noqa: E402

from common.config import ServeConfig, load_config  # noqa: E402
from common.ray_env import (  # noqa: E402
    HAPROXY_FILE_VARIABLES,
    new_head_haproxy_env,
    ray_serving_env,
    remove_haproxy_link,
)
from common.workdir import Workdir  # noqa: E402
from ray_apps.haproxy_admission import MESSAGE as _REFUSAL  # noqa: E402  (standard library only)
from ray_apps.haproxy_admission import VARIABLES as ADMISSION_VARIABLES  # noqa: E402
from ray_apps.haproxy_admission import admission_for, serving_env  # noqa: E402
from ray_apps.shedding import MESSAGE as _SHED  # noqa: E402

HAPROXY_REFUSAL = _REFUSAL.encode()  # the body of HAProxy's own 503s
SHED_REFUSAL = _SHED.encode()  # the body of a replica's 503 for a request that waited too long

TARGET_P99_MS = 50.0
# Each variant's environment for the local Ray it starts, as `rayrec serve start` sets it
# (common.ray_env): Ray's workers (the replicas, and the HAProxy they start) run at niceness 0
# (serve.worker_niceness), except in `haproxy_ray_nice`: Ray's own default, 15 above Ray's
# processes. Where replicas run the app's code is `--user-code-loop`, not a variant.
_THROUGHPUT = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
_SERVE = ServeConfig()  # the defaults `rayrec serve start` uses


def _ray_env(haproxy: bool, worker_niceness: int = 0, **changed: float) -> dict[str, str]:
    """`rayrec serve start`'s Ray environment for the default `serve:` config with `changed` fields."""
    s = _SERVE.model_copy(update=changed)
    return ray_serving_env(haproxy, worker_niceness, s.control_loop_interval_s, s.drain_s)


VARIANT_ENV = {"default": _ray_env(False), "haproxy": _ray_env(True),
               "throughput": _ray_env(False) | _THROUGHPUT,
               "haproxy_throughput": _ray_env(True) | _THROUGHPUT,
               "haproxy_ray_nice": _ray_env(True, 15), "haproxy_admission": _ray_env(True),
               "haproxy_no_metrics": _ray_env(True) | {"RAY_SERVE_HAPROXY_METRICS_ENABLED": "0"},
               "haproxy_ray_control": _ray_env(True, control_loop_interval_s=0.1),
               "haproxy_nbthread_1": _ray_env(True) | {"RAY_SERVE_HAPROXY_NBTHREAD": "1"}}
# Variants whose HAProxy enforces the app's admission bounds itself (rayrec-haproxy), as
# `rayrec serve start` runs it with serve.haproxy_admission; in the others the replicas do.
ADMISSION_VARIANTS = {"haproxy_admission", "haproxy_no_metrics", "haproxy_ray_control", "haproxy_nbthread_1"}
MIX = (("recommend", 0.80), ("similar", 0.08), ("search", 0.07), ("event", 0.05))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# The run to serve


def small_run(root: Path) -> Workdir:
    """A pipeline run sized to build in a few minutes here, with its own local MariaDB."""
    from feature_store.connect import open_online_store
    from feature_store.local_db import LocalMariaDB
    from training.pipeline import run_pipeline

    wd = Workdir.at(root / "run")
    cfg = load_config(None, {
        "name": "serve-load", "data": {"customers": 3000, "articles": 1500, "days": 60, "seed": 0},
        "database": {"port": free_port(), "password_env": "RAYREC_BENCH_UNSET"},
        "two_tower": {"epochs": 3}, "ranker": {"iterations": 100, "compare_classifier": False},
        "eval": {"split": "none"}})
    LocalMariaDB(wd, cfg.database).start()
    store = open_online_store(cfg.database, wd)
    try:
        run_pipeline(cfg, wd, None, store)
    finally:
        store.close()
    return wd


def ensure_db(wd: Workdir) -> None:
    cfg = load_config(wd.config_path)
    if cfg.database.local:
        from feature_store.local_db import LocalMariaDB

        LocalMariaDB(wd, cfg.database).start()


# ---------------------------------------------------------------------------------------------
# Load


@dataclass
class Sample:
    kind: str
    status: int
    ms: float  # from the scheduled send time to the whole answer read
    debug: dict = field(default_factory=dict)
    late_ms: float = 0.0  # how late the request left against its schedule: the generator's own delay
    by_haproxy: bool = False  # a 503 that HAProxy answered itself (rayrec-haproxy), not a replica
    shed: bool = False  # a 503 from a replica's shedder (ray_apps.shedding)


def pick(r: float) -> str:
    """The request kind for a uniform draw r in [0, 1) (MIX's shares)."""
    acc = 0.0
    for name, share in MIX:
        acc += share
        if r < acc:
            return name
    return MIX[-1][0]


class Payloads:
    """Request bodies drawn from the run's customers and articles (seeded)."""

    def __init__(self, wd: Workdir, seed: int = 0, novel_search: bool = False):
        """`novel_search`: search queries are a colour, a product type and an index group
        (`novel_queries`: 2,470 of them in `make demo`'s run, so most are a first sight, as in
        search traffic's long tail) instead of a product type alone (26 there, each seen again
        within seconds)."""
        import pandas as pd

        from common.artifacts import read_manifest
        from feature_store.store import FeatureStore

        m = read_manifest(wd)
        fs = FeatureStore(wd, None)
        hist = fs.get_feature_group("customer_history", m.feature_groups["customer_history"].version).read(latest=True)
        arts = fs.get_feature_group("articles", m.feature_groups["articles"].version).read(latest=True)
        self.customers = hist["customer_id"].astype(str).tolist()
        self.articles = arts["article_id"].astype(str).tolist()
        self.words = pd.Series(arts["product_type_name"].dropna().astype(str)).unique().tolist()
        self.novel_queries = [" ".join(q) for q in itertools.product(
            *(pd.Series(arts[c].dropna().astype(str)).unique().tolist()
              for c in ("colour_group_name", "product_type_name", "index_group_name")))]
        self.novel_search = novel_search
        self.rng = random.Random(seed)

    def draw(self) -> tuple[str, str, str, dict | None]:
        """(kind, method, path, json body)."""
        kind = pick(self.rng.random())
        cid = self.rng.choice(self.customers)
        if kind == "recommend":
            return kind, "POST", "/v1/recommend", {"customer_id": cid, "k": 12, "debug": True,
                                                   "context": {"date": "2020-10-01"}}
        if kind == "similar":
            return kind, "GET", f"/v1/items/{self.rng.choice(self.articles)}/similar?k=12", None
        if kind == "search":
            query = self.rng.choice(self.novel_queries if self.novel_search else self.words)
            return kind, "POST", "/v1/search", {"query": query, "customer_id": cid, "k": 12}
        etype = "purchase" if self.rng.random() < 0.2 else "view"
        return kind, "POST", "/v1/events", {"event_id": uuid.uuid4().hex, "customer_id": cid,
                                            "article_id": self.rng.choice(self.articles), "type": etype}

    def plan(self, n: int, host: str) -> list[tuple[str, bytes]]:
        """n requests drawn ahead of a window, each as (kind, its bytes on the wire)."""
        return [(kind, Http.encode(host, method, path, body)) for kind, method, path, body in
                (self.draw() for _ in range(n))]


class Http:
    """A lean HTTP/1.1 keep-alive client on asyncio streams. The load generator shares the 2
    cores with the server; httpx spends about a millisecond of CPU per request, this a fraction,
    so the server keeps more of the machine it is measured on."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    @staticmethod
    def encode(host: str, method: str, path: str, body: dict | None) -> bytes:
        import json

        data = json.dumps(body).encode() if body is not None else b""
        head = (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(data)}\r\n"
                + ("Content-Type: application/json\r\n" if body is not None else "") + "\r\n")
        return head.encode() + data

    async def send(self, raw: bytes) -> tuple[int, bytes]:
        """Send one encoded request (`encode`) on an idle connection; (status, body)."""
        conn = self.idle.pop() if self.idle else await asyncio.open_connection(self.host, self.port)
        reader, writer = conn
        writer.write(raw)
        status_line = await reader.readline()
        if not status_line:
            writer.close()
            raise ConnectionError("connection closed")
        status = int(status_line.split()[1])
        length, chunked, close = 0, False, False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value:
                chunked = True
            elif name == "connection" and value == "close":
                close = True
        if chunked:
            parts = []
            while (size := int((await reader.readline()).strip() or b"0", 16)) > 0:
                parts.append(await reader.readexactly(size))
                await reader.readline()
            await reader.readline()
            payload = b"".join(parts)
        else:
            payload = await reader.readexactly(length)
        if close:
            writer.close()
        else:
            self.idle.append(conn)
        return status, payload

    def close(self) -> None:
        for _, w in self.idle:
            w.close()


@contextmanager
def generator_gc_paused() -> Iterator[None]:
    """Keep the generator's garbage collector out of a rate window.

    A collection in the middle of a window holds back every request due meanwhile, then sends
    them at once, and the server is charged the client's pause (docs/scaling.md F26: when the
    generator ran in this process, which holds the run for the in-process cases, a full collection
    took hundreds of ms, "case": "gc_full_collect"). The generator collects between windows."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


class Generator:
    """The open-loop client, in a process of its own.

    This benchmark's process is a Ray driver (it starts the local cluster and deploys the app),
    and Ray's threads in a driver take the CPU for ~100 ms about every 10 s: a client on that
    process then sends the requests due meanwhile late and at once, and the server is charged
    the client's delay (seen as slow requests, and fast 503s from the burst, at every 10 s mark;
    docs/scaling.md F27). The generator is a spawned process that holds only the requests of a
    window, drawn beforehand; each sample also keeps how late it left (`late_ms`), so a client
    that falls behind shows in the output (`send_late_p99_ms`) instead of passing as latency."""

    def __init__(self) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_generator_main, args=(child,), daemon=True, name="serve-load-generator")
        self._proc.start()
        GENERATOR_PIDS.add(self._proc.pid)

    def run(self, url: str, plan: list[tuple[str, bytes]], rate: float) -> tuple[list[Sample], float]:
        """Send `plan` at `rate` requests/s; the samples and the wall time the window took."""
        self._conn.send((url, plan, rate))
        out = self._conn.recv()
        if isinstance(out, BaseException):
            raise out
        return out

    def close(self) -> None:
        if self._proc.is_alive():
            self._conn.send(None)
            self._proc.join(10)
        GENERATOR_PIDS.discard(self._proc.pid)


GENERATOR_PIDS: set[int] = set()  # the generator processes: counted as "load_generator"


def _generator_main(conn) -> None:
    while (job := conn.recv()) is not None:
        try:
            with generator_gc_paused():
                conn.send(asyncio.run(open_loop(*job)))
        except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
            conn.send(e)


async def open_loop(url: str, plan: list[tuple[str, bytes]], rate: float) -> tuple[list[Sample], float]:
    """Send request i of `plan` at start + i/rate, whatever the earlier ones did: a scheduler
    creates each request's task when it is due (not all of them up front, which delayed the
    first sends of a window by the time it took to create thousands of tasks)."""
    import json

    u = urlparse(url)
    client = Http(u.hostname, u.port)
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05

    async def one(kind: str, raw: bytes, due: float) -> tuple[str, int, float, float, bytes]:
        late_ms = (loop.time() - due) * 1000
        try:
            status, payload = await asyncio.wait_for(client.send(raw), 10.0)
        except (OSError, ValueError, asyncio.IncompleteReadError, TimeoutError):
            status, payload = 599, b""
        return kind, status, (loop.time() - due) * 1000, late_ms, payload if kind == "recommend" or status == 503 else b""

    tasks = []
    for i, (kind, raw) in enumerate(plan):
        due = start + i / rate
        if (delay := due - loop.time()) > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one(kind, raw, due)))
    results = await asyncio.gather(*tasks)
    wall = loop.time() - start
    client.close()
    return [Sample(kind, status, ms, (json.loads(payload).get("debug") or {}) if status == 200 and payload else {},
                   late, status == 503 and payload == HAPROXY_REFUSAL, status == 503 and payload == SHED_REFUSAL)
            for kind, status, ms, late, payload in results], wall


def recommend_latencies(samples: list[Sample]) -> np.ndarray:
    """Latencies (ms) of the answered recommends: what the p50/p99 figures and plots are of."""
    return np.array([s.ms for s in samples if s.kind == "recommend" and 200 <= s.status < 300])


def _unique(name: str, taken: dict) -> str:
    """`name`, or `name #2`, `name #3`, ... when already taken."""
    out, i = name, 1
    while out in taken:
        i += 1
        out = f"{name} #{i}"
    return out


class LatencyRecord:
    """Each served window's answered-recommend latencies and p50/p99, kept for the plots."""

    def __init__(self) -> None:
        self.windows: dict[str, dict[str, np.ndarray]] = {}
        self.points: dict[str, list[tuple[float, float, float]]] = {}

    def run_name(self, topology: str, variant: str, replicas: int | None, app_args: dict | None) -> str:
        """A label per app run; a repeated setting gets '#2', '#3', ..."""
        extra = [f"{replicas} replicas"] if replicas else []
        extra += [f"{k}={v}" for k, v in (app_args or {}).items()]
        base = ", ".join([topology, variant, *extra])
        name = _unique(base, self.windows)
        self.windows[name], self.points[name] = {}, []
        return name

    def add(self, run: str, window: str, samples: list[Sample], rate: float | None, row: dict) -> None:
        """One window of `run`; a rate run again (--rates 150 150) gets '#2', '#3', ..."""
        self.windows[run][_unique(window, self.windows[run])] = recommend_latencies(samples)
        if rate is not None and row["p99_ms"] is not None:
            self.points[run].append((rate, row["p50_ms"], row["p99_ms"]))

    def plot(self, out_dir: Path) -> list[Path]:
        """serve_load_latency.png (a histogram per run and window) and
        serve_load_latency_vs_rate.png in `out_dir`; nothing when no window ran."""
        windows = {run: w for run, w in self.windows.items() if w}  # a run that did not start has none
        if not windows:
            return []
        title = f"serve_load: answered /v1/recommend, target p99 {TARGET_P99_MS:g} ms"
        return [latency_histograms(out_dir / "serve_load_latency.png", title, windows,
                                   dict.fromkeys(windows, TARGET_P99_MS)),
                latency_vs_rate(out_dir / "serve_load_latency_vs_rate.png", title, self.points, TARGET_P99_MS)]


def summarise(samples: list[Sample], wall_s: float) -> dict:
    rec = [s for s in samples if s.kind == "recommend"]
    ok = [s for s in samples if 200 <= s.status < 300]
    lat = recommend_latencies(samples)
    # The handler's own time (`debug.total_ms`) against the client's: the rest is spent before the
    # app sees the request (queued in the replica, or unread while its loop is busy) and on the wire.
    handler = np.array([s.debug["total_ms"] for s in rec if "total_ms" in s.debug])
    queued = np.array([s.debug["queued_ms"] for s in rec if "queued_ms" in s.debug])
    refused = np.array([s.ms for s in samples if s.status == 503])
    stages = {}
    for key in ("encode_ms", "retrieve_ms", "filter_rank_ms", "rank_stage_ms"):
        vals = [s.debug[key] for s in rec if key in s.debug]
        if vals:
            stages[f"{key[:-3]}_p50_ms"] = float(np.median(vals))
    batches = [s.debug["rank_batch"] for s in rec if "rank_batch" in s.debug]  # fused_calls: coalesced
    if batches:
        stages["rank_batch_mean"] = round(float(np.mean(batches)), 2)
    return {
        "requests": len(samples), "achieved_rps": len(ok) / wall_s,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p95_ms": float(np.percentile(lat, 95)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "error_rate": 1 - len(ok) / max(1, len(samples)),
        "share_503": sum(s.status == 503 for s in samples) / max(1, len(samples)),
        "all_endpoints_p99_ms": float(np.percentile([s.ms for s in ok], 99)) if ok else None,
        "send_late_p99_ms": float(np.percentile([s.late_ms for s in samples], 99)) if samples else None,
        "handler_p99_ms": float(np.percentile(handler, 99)) if len(handler) else None,
        # how long accepted recommends waited between HAProxy and the handler (admission variants)
        "queued_p50_ms": float(np.percentile(queued, 50)) if len(queued) else None,
        "queued_p99_ms": float(np.percentile(queued, 99)) if len(queued) else None,
        "refused_p50_ms": float(np.percentile(refused, 50)) if len(refused) else None,
        "refused_p99_ms": float(np.percentile(refused, 99)) if len(refused) else None,
        "refused_by_haproxy_share": sum(s.by_haproxy for s in samples) / len(refused) if len(refused) else None,
        "refused_shed_share": sum(s.shed for s in samples) / len(refused) if len(refused) else None,
        **stages,
    }


# Which process a CPU second belongs to, by its command line (first match): what a request costs
# the machine beyond the replicas' own work.
CPU_GROUPS = (("ServeReplica", "serve_replicas"), ("HAProxyManager", "haproxy_manager"), ("haproxy", "haproxy"), ("mariadbd", "database"),
              ("ProxyActor", "serve_proxy"), ("ServeController", "serve_controller"), ("raylet", "ray_system"),
              ("gcs_server", "ray_system"), ("log_monitor", "ray_system"), ("dashboard", "ray_system"),
              ("ray::", "other_ray_workers"))


def cpu_by_group() -> dict[str, float]:
    """CPU seconds used so far by the machine's processes, summed per `CPU_GROUPS` group (this
    process, the open-loop client, is "load_generator"; anything unmatched "other")."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        group = "load_generator" if int(pid) == os.getpid() or int(pid) in GENERATOR_PIDS else next(
            (g for pat, g in CPU_GROUPS if pat in cmd), "other")
        out[group] = out.get(group, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_per_request(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
    """Milliseconds of CPU per request by group between two `cpu_by_group` readings, and the total."""
    per = {g: round(1000 * max(0.0, after.get(g, 0.0) - before.get(g, 0.0)) / max(1, requests), 2)
           for g in sorted(after)}
    per = {g: v for g, v in per.items() if v > 0}
    return {**per, "total": round(sum(per.values()), 2)}


# ---------------------------------------------------------------------------------------------
# Serving


def start_app(wd: Workdir, topology: str, variant: str, candidates: int, replicas: int | None,
              admission: dict | None = None) -> tuple[str, object]:
    """A fresh local Ray with the variant's environment, the app deployed on a free port."""
    for k in [*(k for env in VARIANT_ENV.values() for k in env), *ADMISSION_VARIABLES, *HAPROXY_FILE_VARIABLES]:
        os.environ.pop(k, None)
    os.environ.update(VARIANT_ENV[variant])
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":  # HAProxy's files in the run, as `rayrec serve start` has them
        os.environ.update(new_head_haproxy_env(wd.haproxy_dir))
    if variant in ADMISSION_VARIANTS:
        args = admission or {}
        os.environ.update(serving_env(admission_for(load_config(wd.config_path).serve,
                                                    args.get("max_ongoing_requests"), args.get("max_queued_requests"),
                                                    args.get("queue_timeout_ms"))))
    import ray
    from ray import serve

    from ray_apps.app import APP_NAME, build_app

    temp = str(wd.ray_temp_dir) if wd.ray_temp_dir else None  # Ray's session files in the run too
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"workdir": str(wd.root), "topology": topology, "n_candidates": candidates}
    if replicas:
        args |= {"min_replicas": replicas, "max_replicas": replicas}
    app_admission = {k: v for k, v in (admission or {}).items() if k != "queue_timeout_ms"}  # HAProxy's alone
    args |= app_admission | {"haproxy_admission": variant in ADMISSION_VARIANTS}
    serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://127.0.0.1:{port}", serve


def stop_app(wd: Workdir) -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    remove_haproxy_link(wd.haproxy_dir)


def warm_up(url: str, payloads: Payloads, n: int = 30) -> None:
    import httpx

    with httpx.Client(base_url=url, timeout=60) as c:
        for _ in range(n):
            _, method, path, body = payloads.draw()
            c.request(method, path, json=body)


def in_process(wd: Workdir, payloads: Payloads, candidates: int, n: int = 200) -> dict:
    """The recommend pipeline called directly (no Serve, no HTTP): the baseline."""
    from ray_apps.app import InlineCalls, Orchestrator
    from ray_apps.metrics import NullMetrics
    from ray_apps.schemas import RecommendRequest
    from ray_apps.service import Recommender

    rec = Recommender(str(wd.root), follow_index=False, n_candidates=candidates)
    rec.warm()
    orch = Orchestrator(InlineCalls(rec), candidates, NullMetrics())
    reqs = [RecommendRequest(customer_id=payloads.rng.choice(payloads.customers), k=12,
                             context={"date": "2020-10-01"}) for _ in range(n + 20)]

    async def go() -> list[float]:
        out = []
        for i, r in enumerate(reqs):
            t0 = time.perf_counter()
            await orch.recommend(r)
            if i >= 20:
                out.append((time.perf_counter() - t0) * 1000)
        return out

    ms = asyncio.run(go())
    gc_row = full_collection_ms(customer_rows(rec, payloads), article_rows(rec, payloads))
    rec.close()
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "requests": n}, gc_row


def query_encoder(wd: Workdir, payloads: Payloads, n: int = 300, rate: float = 100.0) -> dict:
    """Process CPU of one request's query embedding (the run's query tower on one encoded row),
    paced like serving: the numpy forward that small batches take (`NUMPY_MAX_ROWS`) against the
    torch forward that larger ones take, on the same rows."""
    from feature_store.views import query_row
    from ray_apps.service import Recommender
    from ray_apps.stages.online import OnlineFeatures
    from training.features import as_columns, encode_queries
    from training.two_tower import model as towers

    rec = Recommender(str(wd.root), follow_index=False)
    enc = rec.encoder
    ids = [payloads.rng.choice(payloads.customers) for _ in range(n)]
    found = OnlineFeatures(rec.store(), rec.manifest).customers(list(dict.fromkeys(ids)))
    rows = []
    for c in ids:
        customer, history = found[c]
        purchased = list((history or {}).get("purchased") or [])[: enc.history_len]
        rows.append(encode_queries(enc.vocab, as_columns([query_row(customer, c, purchased, 10, 2)]), enc.history_len))
    ours = paced_cpu_s(lambda i: enc.tower.embed(rows[i]), n, rate) / n * 1000
    limit, towers.NUMPY_MAX_ROWS = towers.NUMPY_MAX_ROWS, 0
    try:
        torch_ms = paced_cpu_s(lambda i: enc.tower.embed(rows[i]), n, rate) / n * 1000
    finally:
        towers.NUMPY_MAX_ROWS = limit
    rec.close()
    return {"rate": rate, "requests": n, "cpu_ms": round(ours, 3), "torch_cpu_ms": round(torch_ms, 3),
            "ratio_vs_torch": round(ours / torch_ms, 3)}


def stage_batch_cost(wd: Workdir, payloads: Payloads, candidates: int, sizes: tuple[int, ...] = (1, 2, 4),
                     n: int = 240, rate: float = 75.0) -> list[dict]:
    """Process CPU per request of the two stages `fused_calls: coalesced` shares, for requests
    arriving alone or `size` at a time (one `encode_many` and one `rank_many` per group), with the
    groups paced at `rate / size` per second as a replica's share of the load would arrive."""
    import datetime as dt

    from ray_apps.app import settle_heap
    from ray_apps.service import Recommender

    rec = Recommender(str(wd.root), follow_index=False, n_candidates=candidates)
    rec.warm()
    settle_heap()
    day = dt.date(2020, 10, 1)
    rows = []
    for size in sizes:
        groups = [[(payloads.rng.choice(payloads.customers), 10, 2) for _ in range(size)] for _ in range(n // size)]
        ranks = [[(rec.retrieve(c.vector, candidates), c, 12, None, day) for c in rec.encode_many(g)] for g in groups]
        enc = paced_cpu_s(lambda i, g=groups: rec.encode_many(g[i]), len(groups), rate / size)
        rank = paced_cpu_s(lambda i, r=ranks: rec.rank_many(r[i]), len(groups), rate / size)
        per = len(groups) * size
        rows.append({"batch": size, "requests": per, "rate": rate, "encode_cpu_ms": round(enc / per * 1000, 3),
                     "rank_cpu_ms": round(rank / per * 1000, 3)})
    rec.close()
    alone = rows[0]["encode_cpu_ms"] + rows[0]["rank_cpu_ms"]
    return [r | {"ratio_vs_alone": round((r["encode_cpu_ms"] + r["rank_cpu_ms"]) / alone, 3)} for r in rows]


def in_process_search(wd: Workdir, payloads: Payloads, candidates: int, n: int = 100) -> dict:
    """The search pipeline called directly: each query of the mix seen for the first time (its
    full-text and semantic pool computed; the query's text vector already cached, as it was
    before pools were), then `n` repeats drawn from the same queries (pools from the index's
    cache). Each request is personalised and ranked for a random customer."""
    from ray_apps.app import InlineCalls, Orchestrator
    from ray_apps.metrics import NullMetrics
    from ray_apps.schemas import SearchRequest
    from ray_apps.service import Recommender

    rec = Recommender(str(wd.root), follow_index=False, n_candidates=candidates)
    rec.warm()
    orch = Orchestrator(InlineCalls(rec), candidates, NullMetrics())
    for q in payloads.words:
        rec.index.index.semantic_search(q, 1)  # text vectors cached; their pools are not

    def req(q: str) -> SearchRequest:
        return SearchRequest(query=q, customer_id=payloads.rng.choice(payloads.customers), k=12)

    async def timed(reqs: list[SearchRequest]) -> list[float]:
        out = []
        for r in reqs:
            t0 = time.perf_counter()
            await orch.search(r)
            out.append((time.perf_counter() - t0) * 1000)
        return out

    first = asyncio.run(timed([req(q) for q in payloads.words]))
    repeat = asyncio.run(timed([req(payloads.rng.choice(payloads.words)) for _ in range(n)]))
    rec.close()
    first_p50, repeat_p50 = float(np.percentile(first, 50)), float(np.percentile(repeat, 50))
    return {"queries": len(payloads.words), "first_p50_ms": first_p50, "repeat_p50_ms": repeat_p50,
            "repeat_p99_ms": float(np.percentile(repeat, 99)), "ratio_vs_first": repeat_p50 / first_p50}


def search_loop_stall(wd: Workdir, payloads: Payloads, candidates: int, n: int = 30) -> dict:
    """How long a search query's first sight holds a fused replica's request loop: a ticker on the
    loop (1 ms sleeps) records how late it wakes while queries never seen before are fetched
    through `InlineCalls` (a worker thread for a new query) and, for the baseline, called on the
    loop itself (as before). Each query is new to both: the text model and LanceDB run each time.
    The heap is settled first, as a replica's is: a full collection of this process otherwise
    stalls the loop for hundreds of ms ("case": "gc_full_collect")."""
    import gc

    from ray_apps.app import InlineCalls, settle_heap
    from ray_apps.service import Recommender

    rec = Recommender(str(wd.root), follow_index=False, n_candidates=candidates)
    rec.warm()
    settle_heap()
    calls = InlineCalls(rec)
    queries = random.Random(1).sample(payloads.novel_queries, 2 * n)

    async def stalls(on_loop: bool, batch: list[str]) -> list[float]:
        late: list[float] = []
        done = False

        async def ticker() -> None:
            while not done:
                t0 = time.perf_counter()
                await asyncio.sleep(0.001)
                late.append((time.perf_counter() - t0) * 1000 - 1.0)

        tick = asyncio.create_task(ticker())
        for q in batch:
            if on_loop:
                rec.search_pool(q, None, candidates)
            else:
                await calls.search_pool(q, None, candidates)
            await asyncio.sleep(0.005)
        done = True
        await tick
        return late

    async def both() -> tuple[list[float], list[float]]:
        return await stalls(False, queries[:n]), await stalls(True, queries[n:])

    threaded, on_loop = asyncio.run(both())
    rec.close()
    gc.unfreeze()
    worst, base = max(threaded), max(on_loop)
    return {"queries": n, "loop_late_max_ms": round(worst, 2),
            "loop_late_p99_ms": round(float(np.percentile(threaded, 99)), 2),
            "on_loop_late_max_ms": round(base, 2), "on_loop_late_p99_ms": round(float(np.percentile(on_loop, 99)), 2),
            "ratio_vs_on_loop": round(worst / base, 3) if base > 0 else None}


def customer_rows(rec, payloads: Payloads, n: int = 200) -> list:
    """(customer, history) rows of n customers, as the encoder reads them online."""
    from ray_apps.stages.online import OnlineFeatures

    return list(OnlineFeatures(rec.store(), rec.manifest).customers(payloads.customers[:n]).values())


def article_rows(rec, payloads: Payloads) -> list[dict]:
    """Every article's row with the columns the ranker's rules read, as it reads them online."""
    from feature_store.store import read_online

    ranker = rec.ranker()
    return list(read_online(ranker.store, ranker.articles_ref, "articles", payloads.articles,
                            ranker.stage.article_columns(None)).values())


def full_collection_ms(rows: list, articles: list[dict], cached: int = 50_000, cached_articles: int = 100_000
                       ) -> dict:
    """A full garbage collection in this process, which holds a loaded run as a replica does:
    as is, then after `settle_heap()` (what replicas do once a run is loaded); then with the
    encoder's last-good cache (`LastGood`) full, `cached` customers, against the same rows held
    as Python objects (as LastGood kept them before); then with the ranker's article cache full,
    `cached_articles` rows, against (expiry, row) pairs of the rows as read (as it kept them
    before). Undone after."""
    import copy
    import gc
    from collections import OrderedDict

    from feature_store.feature_view import TTLCache
    from ray_apps.app import settle_heap
    from ray_apps.service import LastGood
    from ray_apps.stages.ranking import atomic_row

    def collect_ms() -> float:
        t0 = time.perf_counter()
        gc.collect()
        return (time.perf_counter() - t0) * 1000

    tracked = len(gc.get_objects())
    before = min(collect_ms() for _ in range(3))
    settle_heap()
    after = min(collect_ms() for _ in range(3))
    last_good = LastGood(size=cached)
    for i in range(cached):
        last_good.put(f"c{i}", rows[i % len(rows)])
    with_cache = min(collect_ms() for _ in range(3))
    del last_good
    plain = OrderedDict((f"c{i}", copy.deepcopy(rows[i % len(rows)])) for i in range(cached))
    with_plain = min(collect_ms() for _ in range(3))
    del plain
    ttl = TTLCache(60.0, cached_articles)
    ttl.put_many({f"a{i}": atomic_row(articles[i % len(articles)]) for i in range(cached_articles)})
    with_articles = min(collect_ms() for _ in range(3))
    del ttl
    pairs = OrderedDict((f"a{i}", (time.monotonic() + 60.0, copy.deepcopy(articles[i % len(articles)])))
                        for i in range(cached_articles))
    with_pairs = min(collect_ms() for _ in range(3))
    del pairs
    gc.unfreeze()
    return {"tracked_objects": tracked, "unsettled_ms": before, "settled_ms": after, "cached_customers": cached,
            "last_good_ms": with_cache, "python_rows_ms": with_plain,
            "ratio_vs_python_rows": with_cache / with_plain if with_plain > 0 else None,
            "cached_articles": cached_articles, "article_cache_ms": with_articles, "row_pairs_ms": with_pairs,
            "ratio_vs_row_pairs": with_articles / with_pairs if with_pairs > 0 else None}


def dump_samples(path: Path | None, window: dict, sent_at: float, samples: list[Sample], rate: float) -> None:
    """Append one line per request to `path` (--samples-out): when it was due (s into the window,
    which was handed to the generator at `sent_at`, epoch seconds), what it was and how it went,
    so slow or refused requests can be placed in time."""
    if path is None:
        return
    import json

    with path.open("a") as f:
        for i, x in enumerate(samples):
            f.write(json.dumps({**window, "target_rps": rate, "sent_at": round(sent_at, 3), "due_s": round(i / rate, 4), "kind": x.kind, "status": x.status,
                                "ms": round(x.ms, 2), "late_ms": round(x.late_ms, 2), "by_haproxy": x.by_haproxy,
                                "shed": x.shed, **{k: x.debug[k] for k in ("total_ms", "queued_ms", "rank_batch") if k in x.debug}})
                    + "\n")


def run_topology(wd: Workdir, payloads: Payloads, topology: str, variant: str, rates: list[float], duration: float,
                 candidates: int, base_p50: float | None, replicas: int | None, admission: dict | None = None,
                 labels: dict | None = None, samples_out: Path | None = None,
                 record: LatencyRecord | None = None) -> None:
    """`labels`: fields added to each row (how the load was drawn); `samples_out`: see
    dump_samples; `record`: gets each window's latencies for the plots."""
    run = record.run_name(topology, variant, replicas, admission) if record is not None else ""
    try:
        url, _ = start_app(wd, topology, variant, candidates, replicas, admission)
    except Exception as e:  # noqa: BLE001 - a variant that does not start is reported, not fatal
        emit("serve_load", topology=topology, variant=variant, error=f"did not start: {type(e).__name__}: {e}")
        stop_app(wd)
        return
    gen = Generator()
    host = urlparse(url).hostname or "127.0.0.1"
    db = statement_counter(wd)
    try:
        warm_up(url, payloads)
        held = None
        for rate in rates:
            plan = payloads.plan(int(rate * duration), host)
            cpu0, q0 = cpu_by_group(), db.server_statement_count()
            sent_at = time.time()
            samples, wall = gen.run(url, plan, rate)
            dump_samples(samples_out, {"variant": variant, **(admission or {})}, sent_at, samples, rate)
            row = summarise(samples, wall)
            if record is not None:
                record.add(run, f"{rate:g} req/s", samples, rate, row)
            row["cpu_ms_per_request"] = cpu_per_request(cpu0, cpu_by_group(), len(samples))
            row["db_statements_per_request"] = round((db.server_statement_count() - q0 - 1) / max(1, len(samples)), 3)
            ok = row["p99_ms"] is not None and row["p99_ms"] <= TARGET_P99_MS and row["error_rate"] == 0
            held = (rate, row["achieved_rps"]) if ok else held
            ratio = row["p50_ms"] / base_p50 if row["p50_ms"] and base_p50 else None
            emit("serve_load", topology=topology, variant=variant, replicas=replicas or "config", target_rps=rate,
                 duration_s=duration, candidates=candidates, **(admission or {}), **(labels or {}), **row,
                 held_target=ok,
                 ratio_vs_in_process=ratio)
            if row["error_rate"] > 0.5:
                break  # far past capacity: higher rates say nothing new
        base_rate, base_achieved = held or (rates[0], None)
        offered = 2 * base_rate
        plan, sent_at = payloads.plan(int(offered * duration), host), time.time()
        samples, wall = gen.run(url, plan, offered)
        dump_samples(samples_out, {"variant": variant, "case": "overload", **(admission or {})}, sent_at, samples, offered)
        row = summarise(samples, wall)
        if record is not None:
            record.add(run, f"offered {offered:g} req/s (overload)", samples, None, row)
        goodput = row["achieved_rps"]
        emit("serve_load", case="overload", topology=topology, variant=variant, replicas=replicas or "config",
             **(admission or {}), **(labels or {}), offered_rps=offered,
             sustainable_rps=base_achieved, goodput_rps=goodput, share_503=row["share_503"],
             error_rate=row["error_rate"], p50_ms=row["p50_ms"], p99_ms=row["p99_ms"],
             handler_p99_ms=row["handler_p99_ms"], queued_p50_ms=row["queued_p50_ms"],
             queued_p99_ms=row["queued_p99_ms"], refused_p50_ms=row["refused_p50_ms"],
             refused_p99_ms=row["refused_p99_ms"], refused_by_haproxy_share=row["refused_by_haproxy_share"],
             refused_shed_share=row["refused_shed_share"],
             **({"rank_batch_mean": row["rank_batch_mean"]} if "rank_batch_mean" in row else {}),
             ratio_vs_sustainable=(goodput / base_achieved) if base_achieved else None)
    finally:
        db.close()
        gen.close()
        stop_app(wd)


def statement_counter(wd: Workdir):
    """A connection to the run's database that reads how many statements the server has run."""
    from feature_store.connect import open_online_store

    return open_online_store(load_config(wd.config_path).database, wd)


def wakeup_cost(rate: float = 100.0, seconds: float = 2.0) -> dict:
    """Process CPU per paced wake-up: a timer sleep alone, and an `asyncio.to_thread` hop on top
    (a worker thread woken and its result handed back), 100 per second as under serving load."""
    n = int(rate * seconds)

    async def paced(hop: bool) -> float:
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(n):
            await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
            if hop:
                await asyncio.to_thread(int)
        return (time.process_time() - c0) / n * 1e6

    async def both() -> tuple[float, float]:
        return await paced(False), await paced(True)

    sleep_us, hop_us = asyncio.run(both())
    return {"rate": rate, "sleep_wake_cpu_us": round(sleep_us, 1), "thread_hop_cpu_us": round(hop_us - sleep_us, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", help="a pipeline run to serve (default: build a small one in a temp folder)")
    ap.add_argument("--rates", type=float, nargs="+", default=[25, 50, 100, 150, 200])
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per rate")
    ap.add_argument("--topologies", nargs="+", default=["fused", "split"], choices=["fused", "split"])
    ap.add_argument("--variants", nargs="+", default=["default", "haproxy_admission"],
                    choices=list(VARIANT_ENV),
                    help="Serve's Python proxy and the HAProxy admission `rayrec serve start` runs (default); "
                         "`haproxy` (the replicas refusing) and the others are for A/B runs")
    ap.add_argument("--candidates", type=int, default=200)
    ap.add_argument("--replicas", type=int, nargs="+", default=[0],
                    help="replicas per deployment (fixed; 0 = the run's autoscaling config)")
    ap.add_argument("--max-ongoing", type=int, help="max_ongoing_requests per replica (default: the run's config)")
    ap.add_argument("--max-queued", type=int, help="max_queued_requests (default: the run's config)")
    ap.add_argument("--queue-timeout-ms", type=int,
                    help="HAProxy's queue timeout, admission variants only (default: the run's serve.queue_timeout_ms)")
    ap.add_argument("--shed-delay-ms", type=float, nargs="+",
                    help="serve.shed_delay_ms values to run each case with (admission variants; 0: off; "
                         "default: the run's config)")
    ap.add_argument("--shed-interval-ms", type=float, help="serve.shed_interval_ms (default: the run's config)")
    ap.add_argument("--article-cache-ttl-s", type=float, nargs="+",
                    help="serve.article_cache_ttl_s values to run each case with (default: the run's config; 0: off)")
    ap.add_argument("--fused-calls", nargs="+", choices=["inline", "coalesced", "batched"],
                    help="serve.fused_calls values to run the fused topology with (default: the run's config)")
    ap.add_argument("--access-log", nargs="+", choices=["on", "off"],
                    help="serve.access_log values to run each case with (default: the run's config)")
    ap.add_argument("--user-code-loop", nargs="+", choices=["thread", "main"],
                    help="serve.user_code_loop values to run each case with (default: the run's config)")
    ap.add_argument("--search-queries", choices=["repeat", "novel"], default="repeat",
                    help="repeat: a product type (a few hundred queries, cached after their first sight); "
                         "novel: a colour and a product type (nearly every query a first sight)")
    ap.add_argument("--samples-out", type=Path,
                    help="append every request of every window to this file, one JSON line each (for analysis)")
    ap.add_argument("--plots", help=f"write the latency plots here (default: ${PLOTS_ENV}, else WORKDIR/reports)")
    ap.add_argument("--served-only", action="store_true",
                    help="skip the in-process cases (for A/B runs of served variants; no ratio_vs_in_process)")
    a = ap.parse_args()
    json_lines_only()
    out_dir, record = plots_dir(a.plots, a.workdir), LatencyRecord()
    with tempfile.TemporaryDirectory(prefix="rayrec-serve-load-") as tmp:
        if a.workdir:
            wd = Workdir.at(a.workdir)
            ensure_db(wd)
        else:
            wd = small_run(Path(tmp))
            import ray

            ray.shutdown()
        payloads = Payloads(wd, novel_search=a.search_queries == "novel")
        admission = {k: v for k, v in (("max_ongoing_requests", a.max_ongoing), ("max_queued_requests", a.max_queued),
                                       ("queue_timeout_ms", a.queue_timeout_ms),
                                       ("shed_interval_ms", a.shed_interval_ms)) if v is not None}
        base_p50 = None
        if not a.served_only:
            base, gc_row = in_process(wd, payloads, a.candidates)
            base_p50 = base["p50_ms"]
            emit("serve_load", case="in_process", candidates=a.candidates, **base)
            emit("serve_load", case="gc_full_collect", **gc_row)
            emit("serve_load", case="in_process_search", candidates=a.candidates,
                 **in_process_search(wd, payloads, a.candidates))
            emit("serve_load", case="search_loop_stall", candidates=a.candidates,
                 **search_loop_stall(wd, payloads, a.candidates))
            emit("serve_load", case="wakeup_cost", **wakeup_cost())
            emit("serve_load", case="query_encoder", **query_encoder(wd, payloads))
            for row in stage_batch_cost(wd, payloads, a.candidates):
                emit("serve_load", case="stage_batch_cost", candidates=a.candidates, **row)
        for variant in a.variants:
            for topology in a.topologies:
                for replicas in a.replicas:
                    for ttl in a.article_cache_ttl_s or [None]:
                        for calls in (a.fused_calls or [None]) if topology == "fused" else [None]:
                            for log, loop, shed in itertools.product(a.access_log or [None], a.user_code_loop or [None],
                                                                     a.shed_delay_ms or [None]):
                                app_args = admission | ({} if shed is None else {"shed_delay_ms": shed}) | (
                                    {} if ttl is None else {"article_cache_ttl_s": ttl}) | (
                                    {} if calls is None else {"fused_calls": calls}) | (
                                    {} if log is None else {"access_log": log == "on"}) | (
                                    {} if loop is None else {"user_code_loop": loop})
                                run_topology(wd, payloads, topology, variant, a.rates, a.duration, a.candidates,
                                             base_p50, replicas or None, app_args,
                                             {"search_queries": a.search_queries} if a.search_queries != "repeat"
                                             else None, a.samples_out, record)
        if out_dir is not None:
            for path in record.plot(out_dir):
                print(f"[serve_load] plot: {path}", file=sys.stderr)
        if not a.workdir:
            from feature_store.local_db import LocalMariaDB

            LocalMariaDB(wd, load_config(wd.config_path).database).stop()


if __name__ == "__main__":
    main()
