"""The Serve application: the HTTP API over one run's stages, fused or split.

`build_app(args)` is the only place that knows the graph's shape:

- `fused` (default): one deployment holds every stage (`service.Recommender`) and answers
  without a hop between replicas; on small machines hops are what costs. Its stages run on the
  request loop, shared by the requests that reach them together (`serve.fused_calls: coalesced`),
  one request at a time (`inline`), or batched across requests in a worker thread (`batched`).
- `split`: the ingress orchestrates three stage deployments (encoder, retriever, ranker), each
  autoscaling on its own; query encoding is batched across requests with `@serve.batch`.

The orchestration (`Orchestrator`) is written once over `Calls`, either in-process calls or
deployment handles, so both topologies answer the same way. Admission control: at most
`max_ongoing_requests` per replica plus `max_queued_requests` waiting, then a 503 with
`Retry-After`; Serve enforces it in each replica, and with HAProxy's ingress so does HAProxy, before
a request reaches a replica (`ray_apps/haproxy_admission.py`). Hot reload: a new `user_config: {workdir: ...}` on the ingress switches to another
run (new models and index) once it is loaded; requests in flight finish on the old one (`serve_config`
says how to deploy it so that the replicas stay).
"""

import asyncio
import base64
import binascii
import datetime as dt
import gc
import hashlib
import hmac
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import Headers

from common.artifacts import read_manifest
from common.config import FilterConfig, ServeConfig, load_config
from common.workdir import Workdir
from feature_store.online.base import MAX_KEY_CHARS
from ray_apps import reload, shedding  # modules, not their objects: Serve pickles the Ingress class by value
from ray_apps.coalesce import IN_APP, Coalescer
from ray_apps.schemas import (
    Candidates,
    Event,
    EventBatch,
    EventsResponse,
    QueryContext,
    RecommendRequest,
    RecommendResponse,
    SearchRequest,
    SearchResponse,
    SimilarResponse,
)
from ray_apps.service import Recommender, UnknownArticle
from ray_apps.web import mount_ui

APP_NAME = "rayrec"
INGRESS_NAME = "Ingress"  # the ingress deployment's name (its class's), as a Serve config names it
# Without the API key: the health checks, and the web page with its static assets (the repo's
# files, the same for every deployment; the page asks for the key and sends it with each call).
EXEMPT_PATHS = {"/healthz", "/readyz", "/"}
PUBLIC_PREFIXES = ("/ui/",)
# The API's documentation needs the key like the API; a browser opening it gets HTTP Basic's
# challenge, so that it asks for the key (as the password, any user name) and then sends it with
# every request to this origin, Swagger UI's "Try it out" included.
DOCS_PATHS = {"/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc"}
# How long a hot reload waits for the replaced run's requests before it closes the run anyway:
# far past any request's stage timeouts and retries.
RETIRE_TIMEOUT_S = 60.0

logger = logging.getLogger("ray.serve")


class AppArgs(BaseModel):
    """Arguments of `build_app`, as given in the Serve config YAML; unset ones come from the
    run's config (`serve:` section)."""

    model_config = ConfigDict(extra="forbid")
    workdir: str = Field(..., description="The pipeline run to serve (holds manifest.json)")
    topology: str | None = Field(None, pattern="^(fused|split)$")
    num_cpus: float | None = Field(None, gt=0, description="CPUs per replica of each deployment")
    min_replicas: int | None = Field(None, ge=1)
    max_replicas: int | None = Field(None, ge=1)
    max_ongoing_requests: int | None = Field(None, ge=1)
    max_queued_requests: int | None = Field(None, ge=-1)
    n_candidates: int | None = Field(None, ge=1, le=1000, description="Candidates ranked per request")
    article_cache_ttl_s: float | None = Field(None, ge=0, description="Seconds article rows stay cached (0: off)")
    fused_calls: str | None = Field(None, pattern="^(inline|coalesced|batched)$",
                                    description="Fused topology: stages inline on the request loop (coalesced: "
                                                "requests waiting together share a call), or batched in a thread")
    access_log: bool | None = Field(None, description="Serve's per-request access log lines")
    rollout_surge_percent: int | None = Field(None, ge=0, le=100, description=(
        "Serve's max_surge_percent: on a rebuild, replacement replicas start before the old ones stop "
        "(needs room for them)"))
    user_code_loop: str | None = Field(None, pattern="^(thread|main)$",
                                       description="Replicas run the app on a loop in its own thread, or on the main loop")
    user_config: dict[str, Any] | None = Field(
        None, description="The ingress's user_config: {workdir: PATH}, the run it answers from. Set it in the "
                          "Serve config's `deployments` entry of the ingress, not here, for a switch without new "
                          "replicas (serve_config)")
    haproxy_admission: bool = Field(
        False, description="HAProxy enforces the bounds before the replicas (`rayrec serve start` with "
                           "serve.haproxy_admission): a replica's own queue then takes max_ongoing_requests more")
    shed_delay_ms: float | None = Field(None, ge=0, description="Shed requests that waited longer (0: off)")
    shed_interval_ms: float | None = Field(None, gt=0, description="...once none waited less for this long")


def settle_heap() -> None:
    """Hide what a replica has loaded (models, index, vocabularies: ~700k objects in the demo run)
    from the garbage collector. A full collection walks every tracked object: measured in a fused
    replica under 100 req/s, the one that allocations trigger took 390-440 ms, a stall of every
    request in flight; after `gc.freeze()` it took 18-20 ms. Frozen objects are still freed by
    reference counting when dropped; the next call (another run loaded) unfreezes and collects first."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


# ---------------------------------------------------------------------------------------------
# Calls: the stages, in-process or behind deployment handles


class LocalCalls:
    """Stages in this process (fused topology, `serve.fused_calls: batched`). Stage work runs in
    worker threads, so the replica's request loop stays free for requests waiting on I/O, and
    requests queued together share one encode and one rank call."""

    def __init__(self, rec: Recommender, encode: Any = None, rank: Any = None):
        self.rec = rec
        self._encode = encode  # a batched encoder (@serve.batch) shared by concurrent requests
        self._rank = rank  # batched ranking (@serve.batch): one articles read, one model call

    async def _run(self, method: str, *args: Any) -> Any:
        return await asyncio.to_thread(getattr(self.rec, method), *args)

    async def encode(self, customer_id, month, channel):
        if self._encode is not None:
            return await self._encode(customer_id, month, channel)
        return await self._run("encode", customer_id, month, channel)

    async def retrieve(self, vector, n):
        return self.rec.retrieve(vector, n)  # exact top-n in numpy: shorter than a thread hop

    async def rank(self, cands, ctx, k, filters, day):
        if self._rank is not None:
            return await self._rank(cands, ctx, k, filters, day)
        return await self._run("rank", cands, ctx, k, filters, day)

    async def popular(self, ctx, k, filters, age):
        return await self._run("popular", ctx, k, filters, age)

    async def fetch_policy(self):
        return self.rec.fetch_policy()

    async def similar(self, article_id, k):
        return await self._run("similar", article_id, k)

    async def search_pool(self, query, vector, n):
        return await self._run("search_pool", query, vector, n)

    async def record_events(self, events):
        return await self._run("record_events", events)

    async def known_articles(self, ids):
        return await self._run("known_articles", ids)

    async def sample_customers(self, n):
        return await self._run("sample_customers", n)

    async def article_details(self, ids):
        return await self._run("article_details", ids)

    async def ready(self):
        return await self._run("ready")


class InlineCalls(LocalCalls):
    """Stages in this process, run on the replica's request loop itself (`serve.fused_calls:
    inline`; the default, `coalesced`, is this with calls shared). A stage blocks the loop while it
    runs (the database reads included, each bounded by `serve.db_timeout_s`), but the work is
    GIL-bound anyway, and on these VMs waking a worker thread costs ~0.3 ms of CPU per hop
    (serve_load.py, "case": "wakeup_cost"). With `serve.user_code_loop: main` (the default) that
    loop is also the replica's control plane's (health checks, metrics), which then waits at most
    one request's stages; `thread` gives the app a loop of its own."""

    async def _run(self, method: str, *args: Any) -> Any:
        return getattr(self.rec, method)(*args)

    async def record_events(self, events):
        """In a worker thread: acknowledging an event waits for the durable log's fsync, which
        waits on the disk, far longer than usual when the disk is busy (docs/scaling.md F27); on the
        request loop that wait would stall every request of the replica."""
        return await asyncio.to_thread(self.rec.record_events, events)

    async def search_pool(self, query, vector, n):
        """A query seen before (its fused pool cached) inline; a new one in a worker thread: its
        first sight runs the text model and two LanceDB queries, 16-20 ms in one process here
        ("case": "in_process_search"), during which a loop running it would hold every other
        request of the replica. Torch and LanceDB release the GIL while they compute: with the
        thread, the loop woke at most 7-25 ms late against 28-45 ms (serve_load.py, "case":
        "search_loop_stall"; docs/scaling.md F29)."""
        if self.rec.search_pool_cached(query, n):
            return self.rec.search_pool(query, vector, n)
        return await asyncio.to_thread(self.rec.search_pool, query, vector, n)


class CoalescedCalls(InlineCalls):
    """Inline, and the requests that reach the encoder or the ranker together share one call
    (`serve.fused_calls: coalesced`, the default; ray_apps/coalesce.py): one customer read and
    one forward pass, one article read and one model call, for all of them, with no thread and no
    timer. Alone a request runs as inline; behind a queue the calls are shared, so a replica
    serves more exactly when it is behind (docs/scaling.md F38)."""

    def __init__(self, rec: Recommender):
        super().__init__(rec)
        self._encoder = Coalescer(rec.encode_many, alone=IN_APP.alone)
        self._ranker = Coalescer(rec.rank_many, alone=IN_APP.alone)

    async def encode(self, customer_id, month, channel):
        return await self._encoder((customer_id, month, channel))

    async def rank(self, cands, ctx, k, filters, day):
        out, n = await self._ranker.sized((cands, ctx, k, filters, day))
        return {**out, "batch": n}


class RemoteCalls:
    """Stages behind deployment handles (split topology). Every call names the run, so a stage
    replica serves the run the ingress serves, loading it on first use (hot reload)."""

    def __init__(self, encoder: DeploymentHandle, retriever: DeploymentHandle, ranker: DeploymentHandle,
                 workdir: str, timeout_s: float, retries: int = 0):
        self.h = {"encoder": encoder, "retriever": retriever, "ranker": ranker}
        self.workdir = workdir
        self.timeout_s = timeout_s
        self.retries = retries

    async def _retrying(self, send: Any) -> Any:
        """`send()` awaited with the stage timeout, sent again after a timeout or a dead replica:
        every stage call is a read or an idempotent write, and while Serve has not yet noticed
        that a node died its router still picks the dead replicas."""
        import ray.exceptions

        for attempt in range(self.retries + 1):
            try:
                return await asyncio.wait_for(_await(send()), self.timeout_s)
            except (TimeoutError, ray.exceptions.RayActorError):
                if attempt == self.retries:
                    raise TimeoutError("a serving stage did not answer") from None
        raise AssertionError("unreachable")

    async def _call(self, stage: str, method: str, *args: Any) -> Any:
        out = await self._retrying(lambda: self.h[stage].call.remote(self.workdir, method, *args))
        if isinstance(out, dict) and out.get("__error__") == "unknown_article":
            raise UnknownArticle(out["message"])
        return out

    async def encode(self, customer_id, month, channel):
        return await self._retrying(lambda: self.h["encoder"].encode.remote(self.workdir, customer_id, month,
                                                                            channel))

    async def retrieve(self, vector, n):
        return await self._call("retriever", "retrieve", vector, n)

    async def rank(self, cands, ctx, k, filters, day):
        return await self._retrying(lambda: self.h["ranker"].rank.remote(self.workdir, cands, ctx, k, filters, day))

    async def popular(self, ctx, k, filters, age):
        return await self._call("ranker", "popular", ctx, k, filters, age)

    async def fetch_policy(self):
        return await self._call("ranker", "fetch_policy")

    async def similar(self, article_id, k):
        return await self._call("retriever", "similar", article_id, k)

    async def search_pool(self, query, vector, n):
        return await self._call("retriever", "search_pool", query, vector, n)

    async def record_events(self, events):
        return await self._call("encoder", "record_events", events)

    async def known_articles(self, ids):
        return await self._call("retriever", "known_articles", ids)

    async def sample_customers(self, n):
        return await self._call("encoder", "sample_customers", n)

    async def article_details(self, ids):
        return await self._call("ranker", "article_details", ids)

    async def ready(self):
        checks = await asyncio.gather(*[self._call(s, "ready") for s in self.h])
        return {s: c for s, c in zip(self.h, checks, strict=True)} | {"ready": all(c["ready"] for c in checks)}


async def _await(resp: Any) -> Any:
    return await resp


# ---------------------------------------------------------------------------------------------
# Orchestration: the same for both topologies


class Orchestrator:
    """recommend / search / similar / events over `Calls`, with fallbacks and timings."""

    def __init__(self, calls: LocalCalls | RemoteCalls, n_candidates: int, metrics):
        self.calls = calls
        self.n_candidates = n_candidates
        self.metrics = metrics
        self.filter_cfg: FilterConfig | None = None

    async def _policy(self) -> FilterConfig:
        if self.filter_cfg is None:
            self.filter_cfg = FilterConfig.model_validate(await self.calls.fetch_policy())
        return self.filter_cfg

    async def _encode(self, customer_id: str, day: dt.date, channel: int) -> QueryContext:
        try:
            return await self.calls.encode(customer_id, day.month, channel)
        except TimeoutError:
            self.metrics.fallback("encode_timeout")
            return QueryContext(customer_id=customer_id, known_customer=False, customer=None, history=None,
                                purchased=[], vector=[], sales_channel=channel, degraded=True)

    async def recommend(self, req: RecommendRequest) -> tuple[dict[str, Any], dict[str, Any]]:
        """The answer (response fields) and the debug/log details."""
        from training.filters import bought_within, fetch_size, next_fetch
        from training.popularity import is_cold

        t0 = time.perf_counter()
        day = req.context.date or dt.date.today()
        channel = req.context.sales_channel or 2
        filters = req.filters.model_dump() if req.filters is not None else None
        ctx = await self._encode(req.customer_id, day, channel)
        t_enc = time.perf_counter()
        self.metrics.stage_ms("encode", (t_enc - t0) * 1000)
        timings: dict[str, float] = {"encode_ms": round((t_enc - t0) * 1000, 2)}
        if ctx.degraded or is_cold(ctx.customer, ctx.history):
            reason = "store_unavailable" if ctx.degraded else "cold_start"
            return await self._popular(ctx, req.k, filters, req.context.age, reason, timings, t_enc)
        fcfg = await self._policy()
        n = fetch_size(self.n_candidates, len(bought_within(ctx.history, fcfg.bought_lookback)), fcfg)
        retrieve_s, rank_s, fetches = 0.0, 0.0, []
        while True:
            t1 = time.perf_counter()
            cands: Candidates = await self.calls.retrieve(ctx.vector, n)
            t2 = time.perf_counter()
            try:
                ranked = await self.calls.rank(cands, ctx, req.k, filters, day)
            except TimeoutError:
                ranked = {"unavailable": "ranking timed out"}
            t3 = time.perf_counter()
            retrieve_s, rank_s = retrieve_s + t2 - t1, rank_s + t3 - t2
            if "unavailable" in ranked:
                timings |= {"retrieve_ms": round(retrieve_s * 1000, 2), "rank_ms": round(rank_s * 1000, 2)}
                return await self._popular(ctx.model_copy(update={"degraded": True}), req.k, filters,
                                           req.context.age, "store_unavailable", timings, t3)
            fetches.append({"asked": n, "retrieved": len(cands.article_ids), "kept": ranked["n_after_filter"]})
            n = next_fetch(n, len(cands.article_ids), ranked["n_after_filter"], req.k, fcfg)
            if n is None:
                break
        self.metrics.stage_ms("retrieve", retrieve_s * 1000)
        self.metrics.stage_ms("filter_rank", rank_s * 1000)
        self._count(ranked)
        timings |= {"retrieve_ms": round(retrieve_s * 1000, 2), "filter_rank_ms": round(rank_s * 1000, 2),
                    "rank_stage_ms": ranked["stage_ms"]} | ({"rank_batch": ranked["batch"]} if "batch" in ranked else {})
        details = {**timings, "n_retrieved": ranked["n_candidates"], "n_after_filter": ranked["n_after_filter"],
                   "n_ranked": ranked["n_ranked"], "filter_removed": ranked["removed"], "fetches": fetches,
                   "known_customer": ctx.known_customer}
        if req.debug:  # what retrieval searched with, to rerun or compare it
            details["query_vector"] = [round(float(x), 6) for x in ctx.vector]
        return {"items": ranked["items"], "source": "ranked", "degraded": False,
                "candidates": ranked.get("candidates")}, details

    async def _popular(self, ctx: QueryContext, k: int, filters: dict[str, Any] | None, age: int | None,
                       reason: str, timings: dict[str, float], t_start: float):
        self.metrics.fallback(reason)
        pop = await self.calls.popular(ctx, k, filters, age)
        ms = (time.perf_counter() - t_start) * 1000
        self.metrics.stage_ms("popular", ms)
        self._count(pop)
        details = {**timings, "popular_ms": round(ms, 2), "fallback": reason, "age_group": pop.get("age_group"),
                   "n_retrieved": pop["n_candidates"], "n_after_filter": pop["n_after_filter"], "n_ranked": 0,
                   "filter_removed": pop["removed"], "known_customer": ctx.known_customer}
        return {"items": pop["items"], "source": "popular", "degraded": bool(ctx.degraded or pop["degraded"])}, details

    def _count(self, out: dict[str, Any]) -> None:
        self.metrics.candidates("retrieved", out.get("n_candidates", 0))
        self.metrics.candidates("after_filter", out.get("n_after_filter", 0))
        for rule, n in (out.get("removed") or {}).items():
            self.metrics.filtered(rule, n)

    async def search(self, req: SearchRequest) -> tuple[dict[str, Any], dict[str, Any]]:
        t0 = time.perf_counter()
        day = req.context.date or dt.date.today()
        channel = req.context.sales_channel or 2
        if req.customer_id:
            ctx = await self._encode(req.customer_id, day, channel)
        else:
            ctx = QueryContext(customer_id="", known_customer=False, customer=None, history=None, purchased=[],
                               vector=[], sales_channel=channel)
        if req.context.age is not None and ctx.customer is None:
            ctx = ctx.model_copy(update={"customer": {"age": float(req.context.age)}})
        t1 = time.perf_counter()
        pool = await self.calls.search_pool(req.query, ctx.vector or None, self.n_candidates)
        t2 = time.perf_counter()
        ranked = await self.calls.rank(pool, ctx, req.k, None, day) if pool.article_ids else {
            "items": [], "removed": {}, "n_candidates": 0, "n_after_filter": 0, "n_ranked": 0, "stage_ms": 0.0}
        t3 = time.perf_counter()
        degraded = ctx.degraded
        if "unavailable" in ranked:
            # Without article rows the stock and age rules cannot be checked: show nothing rather
            # than something the rules would have removed.
            self.metrics.fallback("store_unavailable")
            degraded = True
            ranked = {"items": [], "removed": {}, "n_candidates": len(pool.article_ids), "n_after_filter": 0,
                      "n_ranked": 0, "stage_ms": 0.0}
        for stage, a, b in (("encode", t0, t1), ("search", t1, t2), ("filter_rank", t2, t3)):
            self.metrics.stage_ms(stage, (b - a) * 1000)
        details = {"encode_ms": round((t1 - t0) * 1000, 2), "search_ms": round((t2 - t1) * 1000, 2),
                   "filter_rank_ms": round((t3 - t2) * 1000, 2), "n_retrieved": len(pool.article_ids),
                   "n_after_filter": ranked["n_after_filter"], "n_ranked": ranked["n_ranked"],
                   "filter_removed": ranked["removed"], "known_customer": ctx.known_customer}
        return {"items": ranked["items"], "source": "ranked", "degraded": degraded,
                "candidates": ranked.get("candidates")}, details


# ---------------------------------------------------------------------------------------------
# HTTP


api = FastAPI(title="rayrec", version="0.2.0",
              description="Real-time recommendations, search and events: retrieval, filtering and ranking on "
                          "Ray Serve. When an API key is configured, send it as `X-API-Key` (or `Authorization: "
                          "Bearer`, or as the password of HTTP Basic, what a browser opening these docs is asked "
                          "for).")
mount_ui(api)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with FastAPI's detail list plus one line naming each bad field."""
    errors = exc.errors()
    msg = _printable("; ".join(_error_line(e) for e in errors))
    return JSONResponse(status_code=422, content={"message": msg, "detail": jsonable(errors)})


def _error_line(e: dict[str, Any]) -> str:
    """`field: what is wrong`; a body that is no JSON has no field, only a position in the text."""
    if e.get("type") == "json_invalid":
        pos = e["loc"][-1] if len(e["loc"]) > 1 else 0
        return f"body: invalid JSON at character {pos}: {(e.get('ctx') or {}).get('error', e['msg'])}"
    return f"{_field(e['loc'])}: {e['msg']}"


def _field(loc: tuple | list) -> str:
    """`body.context.date` -> `context.date`: the location kind is not part of the field's name."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(str(p) for p in parts) or "body"


def jsonable(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validation errors as JSON can carry them: inputs and field names as text that UTF-8 holds."""
    def text(v: Any) -> Any:
        return v if isinstance(v, int) else _printable(str(v))

    return [{k: ([text(p) for p in v] if k == "loc" else v if k in ("msg", "type") else text(v)) for k, v in e.items()}
            for e in errors]


def _printable(s: str) -> str:
    """`s` with what UTF-8 cannot encode (a lone surrogate, which JSON's \\ud800 escape decodes
    to and pydantic then refuses) escaped, so that echoing a bad input cannot fail the 422."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


class Guard:
    """API key (all but the health checks and the page) and the body size limit, before any
    parsing. Plain ASGI: Starlette's `@app.middleware("http")` runs every request through a task
    group and a streamed response, a cost on each request of the hot path."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        IN_APP.n += 1  # what the stages' coalescers ask: may another request be on its way?
        gen = reload.RUNS.enter()  # what a hot reload waits for before it closes the run it replaced
        try:
            await self._guarded(scope, receive, send)
        finally:
            IN_APP.n -= 1
            reload.RUNS.leave(gen)

    async def _guarded(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        state, headers, path = scope["app"].state, Headers(scope=scope), scope["path"]
        if path not in EXEMPT_PATHS and not path.startswith(PUBLIC_PREFIXES):
            if not key_accepted(state, headers):
                challenge = 'Basic realm="rayrec", charset="UTF-8"' if path in DOCS_PATHS else "ApiKey"
                await JSONResponse(status_code=401, content={"message": "missing or wrong API key: send X-API-Key"},
                                   headers={"WWW-Authenticate": challenge})(scope, receive, send)
                return
        received = shedding.received_us(headers.get(shedding.RECEIVED_HEADER))
        if (refusal := _shed(state, received, path)) is not None:
            await refusal(scope, receive, send)
            return
        shedding.RECEIVED_US.set(received)  # (a module's attribute: Serve pickles the app, a ContextVar cannot be)
        limit, length = getattr(state, "max_body_bytes", None), headers.get("content-length")
        if limit and length is not None and length.isdigit() and int(length) > limit:
            await _too_large(f"request body of {length} bytes is over the limit of {limit} bytes")(scope, receive, send)
            return
        if limit and length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            body = await _read_body(receive, limit)  # chunked: read and measure, then hand it on
            if body is None:
                await _too_large(f"request body over the limit of {limit} bytes")(scope, receive, send)
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)


def _shedder(cfg: ServeConfig, delay_ms: float | None, interval_ms: float | None,
             current: shedding.QueueDelayShedder | None) -> shedding.QueueDelayShedder | None:
    """The replica's shedder for the config and the app's overrides (None: off); `current` is
    kept when the settings are the same (a hot reload keeps its state)."""
    delay = cfg.shed_delay_ms if delay_ms is None else delay_ms
    interval = cfg.shed_interval_ms if interval_ms is None else interval_ms
    if not delay:
        return None
    if current is not None and (current.delay_ms, current.interval_ms) == (delay, interval):
        return current
    return shedding.QueueDelayShedder(delay, interval)


def _shed(state: Any, received: int | None, path: str) -> Response | None:
    """A 503 for a request the replica's shedder refuses (ray_apps.shedding), else None."""
    shedder = getattr(state, "shedder", None)
    if shedder is None or received is None or path in EXEMPT_PATHS or shedder.admit(received, time.time()):
        return None
    state.metrics.request(path.rsplit("/", 1)[-1] or "root", "shed")
    return Response(shedding.MESSAGE, status_code=503, media_type="application/json",
                    headers={"Retry-After": str(state.retry_after_s), shedding.REFUSED_HEADER: shedding.REASON})


def _too_large(message: str) -> JSONResponse:
    return JSONResponse(status_code=413, content={"message": message})


async def _read_body(receive: Any, limit: int) -> bytes | None:
    """The whole request body, or None as soon as it passes `limit` bytes."""
    chunks, size = [], 0
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            return b"".join(chunks)  # the client went away: the handler sees an empty or cut body
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not msg.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Any) -> Any:
    """A `receive` that yields the already read body once, then defers to the real one."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


api.add_middleware(Guard)


def key_accepted(state: Any, headers: Headers) -> bool:
    """Whether the request may use the API: no key is configured, or it sent the key."""
    if not getattr(state, "api_key_sha256", None):
        return True
    given = headers.get("x-api-key") or _authorization_key(headers.get("authorization"))
    return bool(given) and hmac.compare_digest(_sha256(given), state.api_key_sha256)


def _authorization_key(value: str | None) -> str | None:
    """The key of an `Authorization` header: `Bearer <key>`, or HTTP Basic with the key as the
    password (the user name is not checked)."""
    scheme, _, credentials = (value or "").partition(" ")
    if scheme.lower() == "bearer":
        return credentials.strip() or None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2] or None
    return None


def _sha256(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


def _now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def _plain(feats: dict[str, Any] | None) -> dict[str, Any] | None:
    """Feature values as JSON numbers/strings (NaN -> None)."""
    if feats is None:
        return None
    out = {}
    for k, v in feats.items():
        if isinstance(v, float) and v != v:
            v = None
        elif hasattr(v, "item"):
            v = v.item()
        out[k] = v
    return out


def _close_later(rec: Recommender, delay_s: float) -> threading.Timer:
    """Close a run a stage replica no longer keeps once `delay_s` passed (a daemon timer)."""
    timer = threading.Timer(delay_s, rec.close)
    timer.daemon = True
    timer.start()
    return timer


@dataclass(frozen=True)
class LoadedRun:
    """A run loaded by an ingress replica, ready to be installed (`Ingress._install`)."""

    workdir: str
    cfg: ServeConfig
    manifest: Any
    rec: Recommender | None  # None in the split topology: the stage deployments hold the runs
    calls: Any


@serve.deployment
@serve.ingress(api)
class Ingress:
    """HTTP ingress; in the fused topology it also runs every stage."""

    def __init__(self, workdir: str, stages: dict[str, DeploymentHandle] | None, api_key_sha256: str | None,
                 n_candidates: int | None = None, article_cache_ttl_s: float | None = None,
                 fused_calls: str | None = None, shed_delay_ms: float | None = None,
                 shed_interval_ms: float | None = None):
        from ray_apps.metrics import ServeMetrics

        self.metrics = ServeMetrics()
        self.stages = stages
        self.rec: Recommender | None = None
        self.plog = None
        self.n_candidates = n_candidates
        self.article_cache_ttl_s = article_cache_ttl_s
        self.fused_calls = fused_calls
        self.shed_args = (shed_delay_ms, shed_interval_ms)
        api.state.api_key_sha256 = api_key_sha256
        api.state.metrics = self.metrics
        self._switch(workdir)

    def _switch(self, workdir: str) -> None:
        """Load a run and answer from it (at start: there is nothing to replace)."""
        self._install(self._load(workdir))
        settle_heap()

    def _load(self, workdir: str) -> LoadedRun:
        """Everything a run needs before it can answer; slow (models, index), so a reload runs it
        in a thread while the current run keeps answering."""
        wd = Workdir.at(workdir)
        cfg = load_config(wd.config_path).serve
        if self.stages is None:
            rec = Recommender(str(wd.root), self.metrics, n_candidates=self.n_candidates,
                              article_cache_ttl_s=self.article_cache_ttl_s)
            rec.warm()
            mode = self.fused_calls or cfg.fused_calls
            calls: LocalCalls | RemoteCalls = (
                LocalCalls(rec, self._encode_batch, self._rank_batch) if mode == "batched"
                else CoalescedCalls(rec) if mode == "coalesced" else InlineCalls(rec))
        else:
            rec = None
            calls = RemoteCalls(self.stages["encoder"], self.stages["retriever"], self.stages["ranker"],
                                str(wd.root), cfg.stage_timeout_s, cfg.stage_retries)
        return LoadedRun(str(wd.root), cfg, read_manifest(wd), rec, calls)

    def _install(self, run: LoadedRun) -> tuple[Recommender | None, Any]:
        """Answer from `run` from now on (no await: a request sees the old run or the new one, whole).
        Returns what it replaced, for the caller to close: the recommender once the requests that
        use it are done, the prediction log at once (a request logs through `self.plog` when it
        answers, with no await in between)."""
        from training.feedback import PredictionLog

        cfg = run.cfg
        api.state.max_body_bytes = cfg.max_body_bytes
        api.state.retry_after_s = max(1, round(cfg.retry_after_s))
        self.cfg: ServeConfig = cfg
        api.state.shedder = _shedder(cfg, *self.shed_args, getattr(api.state, "shedder", None))
        self.workdir = run.workdir
        self.manifest = run.manifest
        self.orch = Orchestrator(run.calls, self.n_candidates or cfg.n_candidates, self.metrics)
        old, self.rec = self.rec, run.rec
        old_log = self.plog
        self.plog = PredictionLog(Workdir.at(run.workdir).predictions_dir,
                                  **cfg.prediction_log_args()) if cfg.prediction_log else None
        return old, old_log

    # No batch wait: a batch is whatever queued while the previous one ran (one batch at a time
    # per stage), so batches still form under load, and an idle replica does not arm a 1 ms timer
    # per stage. Waking from such a timer costs ~0.25 ms of CPU on these VMs (serve_load.py,
    # "case": "wakeup_cost"); served at 70 req/s the timers cost 1-2 ms of CPU and 5 ms of p50
    # per request.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _encode_batch(self, customer_ids: list[str], months: list[int], channels: list[int]
                            ) -> list[QueryContext]:
        """Query encoding of every request waiting: one read per feature group, one forward pass."""
        return await asyncio.to_thread(self.rec.encode_many, list(zip(customer_ids, months, channels, strict=True)))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _rank_batch(self, cands: list[Candidates], ctxs: list[QueryContext], ks: list[int],
                          filters: list[dict[str, Any] | None], days: list[dt.date]) -> list[dict[str, Any]]:
        """Ranking of every request waiting: one articles read, one model call."""
        return await asyncio.to_thread(self.rec.rank_many, list(zip(cands, ctxs, ks, filters, days, strict=True)))

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Hot reload: `{workdir: PATH}` switches to that run once it is loaded."""
        target = user_config.get("workdir")
        if target and str(Workdir.at(target).root) != self.workdir:
            if self.stages is not None:  # warm one replica of each stage before switching
                await asyncio.gather(*[_await(h.call.remote(str(Workdir.at(target).root), "warm"))
                                       for h in self.stages.values()])
            run = await asyncio.to_thread(self._load, target)
            old, old_log = self._install(run)
            ended = reload.RUNS.advance()
            if old_log is not None:
                await asyncio.to_thread(old_log.close)  # writes what it holds: off the request loop
            if old is not None:
                if not await reload.RUNS.drained(ended, RETIRE_TIMEOUT_S):
                    logger.warning("hot reload: requests of the replaced run still in flight after %.0f s; "
                                   "closing it anyway", RETIRE_TIMEOUT_S)
                await asyncio.to_thread(old.close)
            settle_heap()

    def _model(self) -> dict[str, Any]:
        idx = self.manifest.index
        return {"run": self.manifest.run_name, "created_at": self.manifest.created_at,
                "index_version": idx.version if idx else None}

    def _log(self, request_id: str, endpoint: str, customer_id: str, result: dict[str, Any],
             details: dict[str, Any]) -> None:
        if self.plog is None:
            return
        self.plog.log({"request_id": request_id, "ts": _now_utc().isoformat(), "customer_id": customer_id,
                       "endpoint": endpoint, "model": self._model(), "index_version": self._model()["index_version"],
                       "source": result["source"], "degraded": result["degraded"],
                       "items": [{"article_id": it["article_id"], "position": i, "score": it["score"],
                                  "features": _plain(it.get("features"))} for i, it in enumerate(result["items"])],
                       "candidates": result.get("candidates"),  # every ranked candidate: [article_id, score]
                       "n_retrieved": details.get("n_retrieved"), "n_after_filter": details.get("n_after_filter")})

    def _warnings(self, k: int, result: dict[str, Any], details: dict[str, Any]) -> list[str]:
        out = []
        if result["degraded"]:
            out.append("the online store is unavailable: answered from the last good data or popularity")
        if len(result["items"]) < k:
            out.append(f"only {len(result['items'])} of k={k} articles passed the filters: retrieved "
                       f"{details.get('n_retrieved')}, removed {details.get('filter_removed')}")
        return out

    def _unavailable(self, endpoint: str) -> JSONResponse:
        self.metrics.request(endpoint, "timeout")
        return JSONResponse(status_code=503, content={"message": "a serving stage did not answer in time; retry"},
                            headers={"Retry-After": str(max(1, round(self.cfg.retry_after_s)))})

    @api.post("/v1/recommend", response_model=RecommendResponse)
    async def recommend(self, req: RecommendRequest) -> RecommendResponse | JSONResponse:
        t0 = time.perf_counter()
        received = shedding.RECEIVED_US.get()
        queued_ms = None if received is None else round(time.time() * 1000 - received / 1000, 2)
        try:
            result, details = await self.orch.recommend(req)
        except TimeoutError:
            return self._unavailable("recommend")
        rid = uuid.uuid4().hex
        self._log(rid, "recommend", req.customer_id, result, details)
        details["total_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        if queued_ms is not None:
            details["queued_ms"] = queued_ms
        self.metrics.stage_ms("recommend_total", details["total_ms"])
        self.metrics.request("recommend", "degraded" if result["degraded"] else "ok")
        return RecommendResponse(request_id=rid, customer_id=req.customer_id,
                                 items=[{"article_id": i["article_id"], "score": i["score"]} for i in result["items"]],
                                 source=result["source"], degraded=result["degraded"], model=self._model(),
                                 warnings=self._warnings(req.k, result, details), debug=details if req.debug else None)

    @api.post("/v1/search", response_model=SearchResponse)
    async def search(self, req: SearchRequest) -> SearchResponse | JSONResponse:
        t0 = time.perf_counter()
        try:
            result, details = await self.orch.search(req)
        except TimeoutError:
            return self._unavailable("search")
        rid = uuid.uuid4().hex
        self._log(rid, "search", req.customer_id or "", result, details)
        details["total_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        self.metrics.request("search", "degraded" if result["degraded"] else "ok")
        return SearchResponse(request_id=rid, customer_id=req.customer_id or "", query=req.query,
                              items=[{"article_id": i["article_id"], "score": i["score"]} for i in result["items"]],
                              source="ranked", degraded=result["degraded"], model=self._model(),
                              warnings=self._warnings(req.k, result, details) if result["degraded"] else [],
                              debug=details if req.debug else None)

    @api.get("/v1/items/{article_id}/similar", response_model=SimilarResponse)
    async def similar(self, article_id: str, k: int = Query(12, ge=1, le=100)) -> SimilarResponse | JSONResponse:
        try:
            cands = await self.orch.calls.similar(article_id, k)
        except UnknownArticle as e:
            self.metrics.request("similar", "not_found")
            return JSONResponse(status_code=404, content={"message": str(e)})
        except TimeoutError:
            return self._unavailable("similar")
        self.metrics.request("similar", "ok")
        return SimilarResponse(request_id=uuid.uuid4().hex, article_id=article_id, model=self._model(),
                               items=[{"article_id": a, "score": s} for a, s in zip(cands.article_ids, cands.scores,
                                                                                     strict=True)])

    @api.post("/v1/events", response_model=EventsResponse, response_model_exclude_none=True)  # "error" when set
    async def event(self, ev: Event) -> EventsResponse | JSONResponse:
        return await self._events([ev])

    @api.post("/v1/events/batch", response_model=EventsResponse, response_model_exclude_none=True)
    async def events(self, batch: EventBatch) -> EventsResponse | JSONResponse:
        if len(batch.events) > self.cfg.max_batch_events:
            return JSONResponse(status_code=422, content={
                "message": f"events: at most {self.cfg.max_batch_events} events per batch, got {len(batch.events)}"})
        return await self._events(batch.events)

    async def _events(self, events: list[Event]) -> EventsResponse | JSONResponse:
        ids = [e.event_id for e in events]
        if len(set(ids)) != len(ids):
            return JSONResponse(status_code=422, content={"message": "events: event_id repeated within the batch"})
        try:
            return await self._record(events)
        except TimeoutError:  # not acknowledged: the client retries, and event ids make that safe
            return self._unavailable("events")

    async def _record(self, events: list[Event]) -> EventsResponse | JSONResponse:
        known = await self.orch.calls.known_articles([e.article_id for e in events])
        unknown = sorted({e.article_id for e in events} - set(known))
        if unknown:
            self.metrics.request("events", "not_found")
            return JSONResponse(status_code=404, content={"message": f"unknown article_id {unknown[:5]}: not in the "
                                                                     "served catalogue; nothing was stored"})
        now = _now_utc()
        rows = [e.model_dump() | {"ts": (e.ts.astimezone(dt.UTC).replace(tzinfo=None) if e.ts and e.ts.tzinfo
                                         else (e.ts or now)).isoformat()} for e in events]
        results = await self.orch.calls.record_events(rows)
        self.metrics.request("events", "ok")
        return EventsResponse(results=results)

    @api.get("/v1/items")
    async def items(self, ids: str = Query(..., min_length=1, max_length=7000,
                                           description="Comma-separated article ids (at most 100)")) -> dict[str, Any]:
        """Display attributes of articles: name, type, colour, index group, price, stock."""
        wanted = [a.strip() for a in ids.split(",") if a.strip()]
        if len(wanted) > 100:
            return JSONResponse(status_code=422, content={"message": "ids: at most 100 article ids"})
        too_long = [a for a in wanted if len(a) > MAX_KEY_CHARS]
        if too_long:
            return JSONResponse(status_code=422, content={
                "message": f"ids: an article id has at most {MAX_KEY_CHARS} characters: {too_long[0][:80]!r}"})
        try:
            return {"items": await self.orch.calls.article_details(wanted)}
        except TimeoutError:
            return self._unavailable("items")

    @api.get("/v1/customers")
    async def customers(self, n: int = Query(20, ge=1, le=200)) -> dict[str, list[str]]:
        """Some customers to try (those with the most purchases)."""
        try:
            return {"customer_ids": await self.orch.calls.sample_customers(n)}
        except TimeoutError:
            return self._unavailable("customers")

    @api.get("/v1/customers/{customer_id}")
    async def customer(self, customer_id: str = PathParam(..., max_length=MAX_KEY_CHARS)) -> dict[str, Any]:
        """The customer's profile and recent purchases as serving sees them (for people, not models)."""
        ctx = await self.orch._encode(customer_id, dt.date.today(), 2)
        prof = ctx.customer or {}
        return {"customer_id": customer_id, "known": ctx.known_customer, "degraded": ctx.degraded,
                "profile": {k: prof.get(k) for k in ("age", "age_group", "club_member_status",
                                                     "fashion_news_frequency", "region") if k in prof},
                "purchased": ctx.purchased[:20], "n_purchases": (ctx.history or {}).get("n_purchases", 0)}

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self, request: Request) -> JSONResponse:
        """Ready or not for anyone (a load balancer's probe has no key); what failed, with the
        database's address in it, only for callers with the key when one is configured."""
        try:
            checks = await self.orch.calls.ready()
        except Exception as e:  # noqa: BLE001 - a stage that cannot answer is not ready
            checks = {"ready": False, "error": f"{type(e).__name__}: {e}"}
        if not key_accepted(request.app.state, request.headers):
            checks = {k: v for k, v in checks.items() if not k.endswith("error")}
        return JSONResponse(status_code=200 if checks.get("ready") else 503, content=checks | {"model": self._model()})


# ---------------------------------------------------------------------------------------------
# Split topology: one stage class, deployed three times


@serve.deployment
class Stage:
    """Runs `Recommender` methods for the run each call names (the two most recent kept)."""

    KEEP = 2

    def __init__(self, workdir: str, role: str, n_candidates: int | None = None,
                 article_cache_ttl_s: float | None = None):
        from ray_apps.metrics import ServeMetrics

        self.metrics = ServeMetrics()
        self.role = role
        self.n_candidates = n_candidates
        self.article_cache_ttl_s = article_cache_ttl_s
        self.runs: dict[str, Recommender] = {}
        self._get(workdir)

    def _get(self, workdir: str) -> Recommender:
        rec = self.runs.get(workdir)
        if rec is None:
            rec = Recommender(workdir, self.metrics, n_candidates=self.n_candidates,
                              article_cache_ttl_s=self.article_cache_ttl_s)
            rec.warm(self.role)
            self.runs[workdir] = rec
            while len(self.runs) > self.KEEP:
                # closed later: a request of that run may still be between two of its calls here
                _close_later(self.runs.pop(next(iter(self.runs))), RETIRE_TIMEOUT_S)
            settle_heap()
        return rec

    def call(self, workdir: str, method: str, *args: Any) -> Any:
        rec = self._get(workdir)
        if method == "warm":
            return None  # _get loaded it
        if method == "ready":
            return rec.ready(self.role)
        try:
            return getattr(rec, method)(*args)
        except UnknownArticle as e:
            return {"__error__": "unknown_article", "message": str(e)}

    # No batch wait, as in the fused Ingress: batches form from what queued meanwhile. Split,
    # 40 req/s (serve_load.py, two rounds each): p50 33-38 ms vs 44-48 ms with a 2 ms wait.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def encode(self, workdirs: list[str], customer_ids: list[str], months: list[int],
                     channels: list[int]) -> list[QueryContext]:
        """Query encoding for every request waiting, in one forward pass per run."""
        return self._per_run(workdirs, "encode_many", list(zip(customer_ids, months, channels, strict=True)))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def rank(self, workdirs: list[str], cands: list[Candidates], ctxs: list[QueryContext], ks: list[int],
                   filters: list[dict[str, Any] | None], days: list[dt.date]) -> list[dict[str, Any]]:
        """Ranking of every request waiting: one articles read and one model call per run."""
        return self._per_run(workdirs, "rank_many", list(zip(cands, ctxs, ks, filters, days, strict=True)))

    def _per_run(self, workdirs: list[str], method: str, rows: list[tuple]) -> list[Any]:
        """`Recommender.<method>(rows)` once per run named in a batch, results in request order."""
        out: list[Any] = [None] * len(rows)
        for wd in dict.fromkeys(workdirs):
            pos = [i for i, w in enumerate(workdirs) if w == wd]
            for i, r in zip(pos, getattr(self._get(wd), method)([rows[i] for i in pos]), strict=True):
                out[i] = r
        return out


# ---------------------------------------------------------------------------------------------
# Building the app


def deployment_options(s: ServeConfig, a: AppArgs, topology: str) -> dict[str, Any]:
    """Replica sizes, autoscaling and admission control (see ServeConfig). The split topology's
    four deployments start at one replica each unless the args say otherwise."""
    low = a.min_replicas or (s.min_replicas if topology == "fused" else 1)
    ongoing = a.max_ongoing_requests or s.max_ongoing_requests
    queued = a.max_queued_requests if a.max_queued_requests is not None else s.max_queued_requests
    if a.haproxy_admission and queued >= 0:
        # HAProxy counts a request done when its answer is out, before the replica does, and sends
        # the next one at once: up to `ongoing` of them can reach a replica that still counts its
        # answered ones. Without this slack the replica refused them itself, slowly, on the loop
        # that runs the stages (docs/scaling.md F32, F35). HAProxy still holds the bounds.
        queued += ongoing
    actor: dict[str, Any] = {"num_cpus": a.num_cpus or s.num_cpus}
    if (a.user_code_loop or s.user_code_loop) == "main":  # read by Serve when the replica's process starts
        actor["runtime_env"] = {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}}
    return {
        "ray_actor_options": actor,
        "autoscaling_config": {"min_replicas": low, "max_replicas": max(a.max_replicas or s.max_replicas, low),
                               "target_ongoing_requests": s.target_ongoing_requests},
        "max_ongoing_requests": ongoing,
        "max_queued_requests": queued,
        "max_surge_percent": s.rollout_surge_percent if a.rollout_surge_percent is None else a.rollout_surge_percent,
        "backpressure_config": {"status_code": 503, "retry_after_s": s.retry_after_s},
        "logging_config": {"enable_access_log": s.access_log if a.access_log is None else a.access_log},
    }


def api_key_hash(env: str) -> str | None:
    """SHA-256 of the API key in `$env` (None: no key). The key must be printable ASCII: HTTP
    clients put other characters of a header value on the wire as Latin-1 or UTF-8 as they see fit."""
    key = os.environ.get(env)
    if key and not (key.isascii() and key.isprintable()):
        raise ValueError(f"${env}: the API key must be printable ASCII characters")
    return _sha256(key) if key else None


def build_app(args: dict[str, Any]) -> serve.Application:
    """Build the graph from Serve config args (`workdir`, topology, sizes); validated up front.

    The API key is read here from the environment variable the run's config names and passed
    on only as its SHA-256, so the key itself is never part of a deployment's config.
    """
    a = AppArgs.model_validate(args)
    wd = Workdir.at(a.workdir)
    manifest = read_manifest(wd)  # fail here, not in a replica, when the run is incomplete
    if manifest.index is None or "ranker" not in manifest.models:
        raise ValueError(f"{wd.manifest_path}: run is incomplete (no index or ranker)")
    s = load_config(wd.config_path).serve
    topology = a.topology or s.topology
    key_hash = api_key_hash(s.api_key_env)
    opts = deployment_options(s, a, topology)
    workdir = str(wd.root)
    ingress_opts = opts | ({"user_config": a.user_config} if a.user_config else {})
    if topology == "fused":
        return Ingress.options(**ingress_opts).bind(workdir, None, key_hash, a.n_candidates, a.article_cache_ttl_s,
                                                    a.fused_calls, a.shed_delay_ms, a.shed_interval_ms)
    stage_opts = opts | {"max_queued_requests": -1}  # admission control happens once, at the ingress
    stages = {name: Stage.options(name=f"{name}_stage", **stage_opts).bind(workdir, name, a.n_candidates, a.article_cache_ttl_s)
              for name in ("encoder", "retriever", "ranker")}
    return Ingress.options(**ingress_opts).bind(workdir, stages, key_hash, a.n_candidates, a.article_cache_ttl_s,
                                                None, a.shed_delay_ms, a.shed_interval_ms)


def serve_config(workdir: Path, host: str, port: int, topology: str | None = None,
                 haproxy_admission: bool = False) -> dict[str, Any]:
    """A Serve config that `serve deploy` accepts, for this workdir (`haproxy_admission`: for a
    head whose HAProxy enforces the bounds, as `rayrec serve start` starts it).

    The run served is named twice: `args.workdir` builds the app, and the ingress deployment's
    `user_config.workdir` is the run it answers from. Hot reload changes only the latter: Serve
    then reconfigures the running replicas in place. A change to `args` is a new code version
    for Serve, which replaces every replica (README, "hot reload")."""
    args: dict[str, Any] = {"workdir": str(workdir)}
    if topology:
        args["topology"] = topology
    if haproxy_admission:
        args["haproxy_admission"] = True
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": host, "port": port},
        "applications": [
            {"name": APP_NAME, "route_prefix": "/", "import_path": "ray_apps.app:build_app", "args": args,
             "deployments": [{"name": INGRESS_NAME, "user_config": {"workdir": str(workdir)}}]}
        ],
    }
