"""The ingress's handlers without Serve: answers to stages that time out, to a body that is no
JSON, and the run generations a hot reload waits on."""
from __future__ import annotations

import asyncio
import json
import types

import pytest
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.testclient import TestClient

from common.config import ServeConfig
from ray_apps.metrics import NullMetrics
from ray_apps.reload import RunsInUse
from ray_apps.schemas import Event, EventBatch, RecommendRequest


class TimedOut:
    """Stage calls of the split topology whose retries ran out."""

    def __getattr__(self, name):
        async def call(*args, **kwargs):
            raise TimeoutError(f"{name} did not answer")
        return call


def _ingress():
    from ray.serve._private.http_util import ASGIAppReplicaWrapper

    from ray_apps.app import Ingress

    # the class as written, under Serve's ASGI wrapper (whose __del__ wants a running replica)
    cls = next(c for c in Ingress.func_or_class.__mro__ if not issubclass(c, ASGIAppReplicaWrapper))
    assert cls.__module__ == "ray_apps.app" and hasattr(cls, "similar")
    ing = object.__new__(cls)  # the handlers only, no run loaded
    ing.metrics, ing.cfg = NullMetrics(), ServeConfig(retry_after_s=3)
    ing.orch = types.SimpleNamespace(calls=TimedOut())
    return ing


@pytest.mark.parametrize("call", [
    lambda ing: ing.similar("0108775015", 5),
    lambda ing: ing.event(Event(event_id="e1", customer_id="c", article_id="a", type="view")),
    lambda ing: ing.events(EventBatch(events=[Event(event_id="e1", customer_id="c", article_id="a", type="click")])),
    lambda ing: ing.items("a,b"),
    lambda ing: ing.customers(5),
])
def test_a_stage_that_times_out_is_a_503_with_retry_after_not_a_500(call):
    resp = asyncio.run(call(_ingress()))
    assert resp.status_code == 503 and resp.headers["retry-after"] == "3"
    assert "retry" in json.loads(resp.body)["message"]


def test_a_body_that_is_no_json_is_named_with_its_position():
    from ray_apps.app import _validation_error

    app = FastAPI()
    app.add_exception_handler(RequestValidationError, _validation_error)

    @app.post("/r")
    async def r(req: RecommendRequest) -> dict:
        return {}

    c = TestClient(app)
    out = c.post("/r", content=b'{"customer_id": "x",', headers={"content-type": "application/json"})
    assert out.status_code == 422
    assert out.json()["message"] == "body: invalid JSON at character 20: Expecting property name enclosed in double quotes"
    out = c.post("/r", content=b'{"customer_id": "x", "k": 0}', headers={"content-type": "application/json"})
    assert out.status_code == 422 and out.json()["message"].startswith("k: ")


def _validating_app() -> TestClient:
    from ray_apps.app import _validation_error

    app = FastAPI()
    app.add_exception_handler(RequestValidationError, _validation_error)

    @app.post("/r")
    async def r(req: RecommendRequest) -> dict:
        return req.model_dump(mode="json")

    @app.post("/e")
    async def e(ev: Event) -> dict:
        return ev.model_dump(mode="json")

    return TestClient(app)


EVENT = {"event_id": "e1", "customer_id": "c1", "article_id": "a1", "type": "purchase"}


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/e", EVENT | {"ts": "2300-01-01T00:00:00"}, "ts"),  # past what the online rows hold
    ("/e", EVENT | {"ts": "9999-12-31T23:00:00-05:00"}, "ts"),  # past datetime's range in UTC
    ("/e", EVENT | {"ts": "0001-01-01T00:00:00+05:00"}, "ts"),
    ("/e", EVENT | {"ts": "1969-12-31T23:59:59"}, "ts"),
    ("/e", EVENT | {"ts": 0}, "ts"),  # not seconds since 1970
    ("/e", EVENT | {"price": True}, "price"),
    ("/e", EVENT | {"price": "12"}, "price"),
    ("/e", EVENT | {"sales_channel": True}, "sales_channel"),
    ("/e", EVENT | {"event_id": "e1 "}, "event_id"),  # the store would take it for "e1"
    ("/r", {"customer_id": "c1", "context": {"date": 0}}, "context.date"),
    ("/r", {"customer_id": "c1", "context": {"sales_channel": True}}, "context.sales_channel"),
    ("/r", {"customer_id": "c1", "filters": {"max_price": True}}, "filters.max_price"),
])
def test_values_json_would_only_take_by_coercion_or_the_stores_cannot_hold_are_422s(path, body, field):
    out = _validating_app().post(path, json=body)
    assert out.status_code == 422 and out.json()["message"].startswith(f"{field}: "), out.text


def test_event_times_are_taken_in_utc_up_to_a_day_ahead():
    import datetime as dt

    c = _validating_app()
    assert c.post("/e", json=EVENT | {"ts": "2020-09-22T01:00:00+02:00"}).json()["ts"] == "2020-09-21T23:00:00"
    soon = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=20)).replace(tzinfo=None).isoformat()
    assert c.post("/e", json=EVENT | {"ts": soon}).status_code == 200  # a client's clock a little ahead
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=30)).replace(tzinfo=None).isoformat()
    assert c.post("/e", json=EVENT | {"ts": later}).status_code == 422


@pytest.mark.parametrize(("body", "echoed"), [(b'{"customer_id": "\\ud800"}', "\\ud800"),
                                             (b'{"customer_id": "c", "\\udc00": 1}', "\\udc00")])
def test_a_bad_input_that_utf8_cannot_encode_is_echoed_escaped_in_a_422(body, echoed):
    """JSON's \\ud800 escape decodes to a lone surrogate: echoing it unescaped failed the answer (a 500)."""
    out = _validating_app().post("/r", content=body, headers={"content-type": "application/json"})
    assert out.status_code == 422 and out.json()["detail"][0]["input"] == echoed, out.text


def test_a_reload_waits_for_the_requests_of_the_run_it_replaced():
    runs = RunsInUse()

    async def scenario() -> list[str]:
        done: list[str] = []
        old = runs.enter()  # a request of the first run, mid-way

        async def retire():
            ended = runs.advance()  # the new run is installed
            assert await runs.drained(ended, timeout_s=5, poll_s=0.01)
            done.append("closed")

        async def finish_request():
            await asyncio.sleep(0.1)
            new = runs.enter()  # a request of the new run does not hold the old one
            done.append("answered")
            runs.leave(old)
            await asyncio.sleep(0.2)
            runs.leave(new)

        await asyncio.gather(retire(), finish_request())
        return done

    assert asyncio.run(scenario()) == ["answered", "closed"]
    assert runs.in_use(runs.generation) == 0


def test_a_reload_closes_the_old_run_anyway_after_its_timeout():
    runs = RunsInUse()
    runs.enter()  # never answers
    assert asyncio.run(runs.drained(runs.advance(), timeout_s=0.05, poll_s=0.01)) is False


def test_reconfigure_closes_the_replaced_run_only_after_its_requests_answered(tmp_path, monkeypatch):
    """A hot reload installs the new run at once and closes the old one (its store connection,
    its index) once the requests that came in before the switch are done."""
    import ray_apps.app as app_module
    from ray_apps.reload import RUNS

    monkeypatch.setattr(app_module, "settle_heap", lambda: None)
    events: list[str] = []

    class Run:
        def __init__(self, name):
            self.name = name

        def close(self):
            events.append(f"closed {self.name}")

    ing = _ingress()
    ing.stages, ing.workdir, ing.rec = None, str(tmp_path / "old"), Run("old")
    ing._load = lambda target: Run("new")

    def install(run):
        old, ing.rec = ing.rec, run
        return old, Run("old log")  # no request writes to the old log once the new one is installed

    ing._install = install

    async def scenario():
        gen = RUNS.enter()  # a request of the old run, mid-way
        reload = asyncio.create_task(ing.reconfigure({"workdir": str(tmp_path / "new")}))
        await asyncio.sleep(0.3)
        assert ing.rec.name == "new" and events == ["closed old log"]  # the old run still open for that request
        events.append("answered")
        RUNS.leave(gen)
        await reload

    asyncio.run(scenario())
    assert events == ["closed old log", "answered", "closed old"]
    assert RUNS.in_use(RUNS.generation) == 0


def test_a_stage_closes_the_run_it_stops_keeping_only_after_a_while(monkeypatch):
    """Split topology: a stage replica keeps the two latest runs; the one it drops is closed after
    RETIRE_TIMEOUT_S, not while a request of that run may be between two of its calls."""
    import time

    from ray_apps.app import Stage

    closed: list[str] = []

    class Rec:
        def __init__(self, workdir, metrics, **kwargs):
            self.workdir = workdir

        def warm(self, role):
            pass

        def close(self):
            closed.append(self.workdir)

    cls = Stage.func_or_class
    g = cls._get.__globals__  # the class Serve holds (pickled by value): its own globals
    monkeypatch.setitem(g, "Recommender", Rec)
    monkeypatch.setitem(g, "settle_heap", lambda: None)
    monkeypatch.setitem(g, "RETIRE_TIMEOUT_S", 0.3)
    stage = object.__new__(cls)
    stage.metrics, stage.role, stage.n_candidates, stage.article_cache_ttl_s, stage.runs = None, "ranker", None, None, {}
    for run in ("a", "b", "c"):
        stage._get(run)
    assert list(stage.runs) == ["b", "c"] and closed == []  # "a" dropped, still open
    time.sleep(0.6)
    assert closed == ["a"]


def test_readiness_says_what_failed_only_to_callers_with_the_key():
    """/readyz needs no key (a probe has none), so the database's address in its error is kept
    for callers with the key when one is configured."""
    import hashlib

    from starlette.requests import Request

    class Calls:
        async def ready(self):
            return {"ready": False, "database": False, "database_error": "cannot connect to rayrec@db-1:3306/rayrec"}

    ing = _ingress()
    ing.orch = types.SimpleNamespace(calls=Calls())
    ing.manifest = types.SimpleNamespace(index=None, run_name="r", created_at="t")

    def ask(key_sha256, headers):
        app = types.SimpleNamespace(state=types.SimpleNamespace(api_key_sha256=key_sha256))
        scope = {"type": "http", "app": app, "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
        resp = asyncio.run(ing.readyz(Request(scope)))
        assert resp.status_code == 503
        return json.loads(resp.body)

    sha = hashlib.sha256(b"k3y").hexdigest()
    assert ask(sha, {}) == {"ready": False, "database": False, "model": {"run": "r", "created_at": "t",
                                                                         "index_version": None}}
    assert ask(sha, {"X-API-Key": "k3y"})["database_error"].endswith("db-1:3306/rayrec")
    assert "database_error" in ask(None, {})  # no key configured: everyone is an operator
