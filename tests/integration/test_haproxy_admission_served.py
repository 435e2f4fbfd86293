"""Admission in Serve's HAProxy ingress (rayrec-haproxy), on real local Ray and Serve: requests
past a replica's bound wait in HAProxy, not in the replica, and past the queue bound or the queue
timeout they get a 503 with Retry-After without ever reaching the replica."""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import free_tcp_port
from fastapi import Header

from common.ray_env import HAPROXY_BASE_MAX_LEN, haproxy_files_env, haproxy_link, remove_haproxy_link
from ray_apps.haproxy_admission import REASON_HEADER, Admission, serving_env
from ray_apps.shedding import RECEIVED_HEADER

pytestmark = pytest.mark.integration
HOLD_S = 4.0  # how long the replica holds each request; far longer than the queue timeout
ADMISSION = Admission(server_maxconn=1, queue_per_replica=2, queue_timeout_ms=1000, retry_after_s=3)


@pytest.fixture(scope="module")
def haproxy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where this module's HAProxy keeps its files, as a workdir's `ray/haproxy` (too long a path
    for HAProxy's sockets, so reached through the short link)."""
    return tmp_path_factory.mktemp("haproxy-files") / "ray" / "haproxy"


@pytest.fixture(scope="module")
def slow_app(haproxy_dir: Path):
    """One replica that holds each /hold request HOLD_S and counts the requests it saw, served
    through HAProxy with `ADMISSION`, its files in `haproxy_dir`."""
    import ray
    from fastapi import FastAPI
    from ray import serve

    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    # A stopped replica behind HAProxy stays reachable this long (Ray's 30 s, so that load balancers
    # deregister it first): nothing routes here after the tests, so shutdown need not wait.
    mp.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    for k, v in (serving_env(ADMISSION) | haproxy_files_env(haproxy_dir)).items():
        mp.setenv(k, v)
    api = FastAPI()

    @serve.deployment(max_ongoing_requests=ADMISSION.server_maxconn, max_queued_requests=ADMISSION.queue_per_replica,
                      num_replicas=1)
    @serve.ingress(api)
    class Slow:
        def __init__(self) -> None:
            self.seen = 0

        @api.get("/hold")
        async def hold(self, s: float = HOLD_S) -> dict:
            self.seen += 1
            await asyncio.sleep(s)
            return {"ok": True}

        @api.get("/seen")
        def count(self) -> dict:
            return {"seen": self.seen}

        @api.get("/stamp")
        def stamp(self, received: str | None = Header(None, alias=RECEIVED_HEADER)) -> dict:
            return {"received_us": received, "now_us": time.time_ns() // 1000}

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_tcp_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(Slow.bind(), name="slow", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # HAProxy answers once it has the replica
            try:
                if httpx.get(f"{url}/seen", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        _wait_until_haproxy_settles()
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()
        mp.undo()
        remove_haproxy_link(haproxy_dir)


def _haproxy_commands() -> dict[int, list[str]]:
    """The HAProxy processes Ray runs (`haproxy -db -f <config>`) and their command lines."""
    out = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:  # it exited meanwhile
            continue
        if b"haproxy" in cmd[0] and b"-db" in cmd and b"-f" in cmd:
            out[int(proc.name)] = [c.decode() for c in cmd]
    return out


def _haproxy_pids() -> frozenset[int]:
    """The HAProxy processes Ray runs. Ray reloads HAProxy by starting a new process whenever
    Serve's targets are broadcast; the new one counts each server's connections from zero, so a
    reload in the middle of a test lets one more request through."""
    return frozenset(_haproxy_commands())


def _wait_until_haproxy_settles(quiet_s: float = 3.0, timeout_s: float = 60.0) -> None:
    """Wait until no HAProxy process has started or stopped for `quiet_s`: the reloads that follow
    an app's start are over."""
    deadline = time.monotonic() + timeout_s
    pids, since = _haproxy_pids(), time.monotonic()
    while time.monotonic() - since < quiet_s:
        assert time.monotonic() < deadline, f"HAProxy kept reloading for {timeout_s} s: {sorted(pids)}"
        time.sleep(0.2)
        now = _haproxy_pids()
        if now != pids:
            pids, since = now, time.monotonic()
    assert pids, "no HAProxy process found"


def _get(url: str) -> tuple[httpx.Response, float]:
    r = httpx.get(url, timeout=60)
    return r, time.monotonic()


def _burst(url: str) -> list[tuple[httpx.Response, float]]:
    """One /hold, then five more while the replica holds it."""
    with ThreadPoolExecutor(6) as pool:
        first = pool.submit(_get, f"{url}/hold")
        time.sleep(0.5)  # the replica holds the first; the next five find it at its maxconn
        rest = [pool.submit(_get, f"{url}/hold") for _ in range(5)]
        return [first.result(), *(f.result() for f in rest)]


def test_past_the_bounds_haproxy_answers_503_and_the_replica_never_sees_the_request(slow_app):
    for _attempt in range(3):  # again only if Ray reloaded HAProxy during the burst (see _haproxy_pids)
        _wait_until_haproxy_settles()
        pids, base = _haproxy_pids(), httpx.get(f"{slow_app}/seen", timeout=30).json()["seen"]
        done = _burst(slow_app)
        if _haproxy_pids() == pids:
            break
    else:
        pytest.fail("Ray reloaded HAProxy during each of 3 bursts")
    ok = [t for r, t in done if r.status_code == 200]
    refused = [(r, t) for r, t in done if r.status_code == 503]
    assert len(ok) == 1 and len(refused) == 5, [r.status_code for r, _ in done]
    reasons = sorted(r.headers[REASON_HEADER] for r, _ in refused)
    # two waited in HAProxy's queue (2 per replica) until its timeout; three found it full
    assert reasons == ["queue-full"] * 3 + ["queue-timeout"] * 2
    for r, t in refused:
        assert r.headers["Retry-After"] == "3"
        assert r.json() == {"message": "the service is at capacity, retry later"}
        assert t < ok[0]  # every refusal came back while the replica still held the first request
    assert httpx.get(f"{slow_app}/seen", timeout=30).json()["seen"] == base + 1


def test_within_the_bounds_a_queued_request_is_served_in_turn_not_refused(slow_app):
    """(With the replica's own bound at 1 too, this does not show where it waited; the test above
    does.)"""
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(_get, f"{slow_app}/hold?s=0.6")  # shorter than the queue timeout
        time.sleep(0.2)
        second = pool.submit(_get, f"{slow_app}/seen")
        (r1, t1), (r2, t2) = first.result(), second.result()
    assert r1.status_code == 200 and r2.status_code == 200
    assert t2 >= t1  # it reached the replica only once the first had left


def test_haproxy_stamps_when_it_received_a_request_before_it_queues_it(slow_app):
    """The replicas' shedder (ray_apps.shedding) reads how long a request waited from this stamp."""
    got = httpx.get(f"{slow_app}/stamp", headers={RECEIVED_HEADER: "1"}, timeout=30).json()
    assert abs(int(got["received_us"]) - got["now_us"]) < 5_000_000  # HAProxy's, not the client's "1"
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(_get, f"{slow_app}/hold?s=0.6")
        time.sleep(0.2)
        second = pool.submit(httpx.get, f"{slow_app}/stamp", timeout=30)
        assert first.result()[0].status_code == 200
        got = second.result().json()
    waited_ms = (got["now_us"] - int(got["received_us"])) / 1000
    assert 300 <= waited_ms < 1000  # stamped on arrival, then queued behind the first (~0.4 s)


def test_haproxy_files_are_in_the_folder_given(slow_app: str, haproxy_dir: Path):
    """Ray's HAProxy config, server state and admin socket are in the folder `haproxy_files_env`
    names (a workdir's), not in /tmp/haproxy-serve; the running HAProxy reads that config through
    the short link, and Ray reaches it over the admin socket there (it answered above)."""
    assert len(str(haproxy_dir)) > HAPROXY_BASE_MAX_LEN  # the link case
    (cfg,) = haproxy_dir.glob("*/haproxy.cfg")
    node = cfg.parent
    assert (node / "admin.sock").is_socket() and (node / "server-state").exists()
    via_link = str(haproxy_link(haproxy_dir) / node.name / "haproxy.cfg")
    configs = [cmd[cmd.index("-f") + 1] for cmd in _haproxy_commands().values()]
    assert via_link in configs, configs
