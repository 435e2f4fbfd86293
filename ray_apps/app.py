"""The Serve application: ingress -> query encoder -> retriever -> filter -> ranker.

`build_app(args)` is the only place that knows the graph's shape. Deployments are thin: they
load artifacts named in the run's manifest and call the plain stage classes in `stages/`.
"""

import datetime as dt
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from common.artifacts import Manifest, read_manifest
from common.config import load_config
from common.workdir import Workdir
from ray_apps.schemas import Candidates, QueryContext, RecommendRequest, RecommendResponse

APP_NAME = "rayrec"


class AppArgs(BaseModel):
    """Arguments of `build_app`, as given in the Serve config YAML."""

    model_config = ConfigDict(extra="forbid")
    workdir: str = Field(..., description="The pipeline run to serve (holds manifest.json)")
    num_cpus: float = Field(0.25, gt=0, description="CPUs per replica of each deployment")
    max_replicas: int = Field(2, ge=1)


def _load(workdir: str) -> tuple[Workdir, Manifest]:
    wd = Workdir.at(workdir)
    return wd, read_manifest(wd)


def _online(wd: Workdir):
    from feature_store.connect import open_online_store

    return open_online_store(load_config(wd.config_path).database, wd)


@serve.deployment
class QueryEncoderDeployment:
    """Reads the customer's profile and history online and encodes the query."""

    def __init__(self, workdir: str):
        from ray_apps.stages.encoder import QueryEncoder
        from ray_apps.stages.online import OnlineFeatures

        wd, manifest = _load(workdir)
        cfg = load_config(wd.config_path)
        self.features = OnlineFeatures(_online(wd), manifest)
        self.encoder = QueryEncoder(wd.two_tower_dir, cfg.two_tower.history_len)

    def encode(self, customer_id: str, month: int, channel: int) -> QueryContext:
        customer, history = self.features.customer(customer_id)
        purchased = list((history or {}).get("purchased") or [])
        vec = self.encoder.encode(customer_id, customer, purchased, month, channel)
        return QueryContext(customer_id=customer_id, known_customer=customer is not None, customer=customer,
                            history=history, purchased=purchased, vector=vec.tolist(), sales_channel=channel)


@serve.deployment
class RetrieverDeployment:
    """Top-n articles by vector from the index version named in the manifest."""

    def __init__(self, workdir: str):
        from training.index import ItemIndex

        wd, manifest = _load(workdir)
        ref = manifest.index
        self.index = ItemIndex(str(wd.resolve(ref.uri)), ref.table, ref.version)

    def retrieve(self, vector: list[float], n: int) -> Candidates:
        ids, scores = self.index.search(vector, n)
        return Candidates(article_ids=ids, scores=[float(s) for s in scores])


@serve.deployment
class FilterDeployment:
    """Business rules over candidates; today: drop what the customer already bought."""

    def apply(self, cands: Candidates, purchased: list[str]) -> Candidates:
        from ray_apps.stages.filters import drop_purchased

        return drop_purchased(cands, purchased)


@serve.deployment
class RankerDeployment:
    """Reads candidate article features online (one query) and orders them with CatBoost."""

    def __init__(self, workdir: str):
        from ray_apps.stages.online import OnlineFeatures
        from ray_apps.stages.ranking import Ranker

        wd, manifest = _load(workdir)
        self.features = OnlineFeatures(_online(wd), manifest)
        self.ranker = Ranker(wd.resolve(manifest.models["ranker"]))

    def rank(self, cands: Candidates, ctx: QueryContext, k: int) -> list[dict[str, Any]]:
        articles = self.features.articles(cands.article_ids)
        items = self.ranker.rank(cands, ctx.customer, ctx.history, articles, ctx.sales_channel, k)
        return [i.model_dump() for i in items]


api = FastAPI(title="rayrec", version="0.1.0",
              description="Real-time recommendations: retrieval, filtering and ranking on Ray Serve.")


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with FastAPI's detail list plus one line naming each bad field."""
    errors = exc.errors()
    msg = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in errors)
    return JSONResponse(status_code=422, content={"message": msg, "detail": jsonable(errors)})


def jsonable(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: (v if k in ("loc", "msg", "type") else str(v)) for k, v in e.items()} for e in errors]


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, encoder: DeploymentHandle, retriever: DeploymentHandle, filt: DeploymentHandle,
                 ranker: DeploymentHandle, n_candidates: int):
        self.encoder, self.retriever, self.filt, self.ranker = encoder, retriever, filt, ranker
        self.n_candidates = n_candidates

    @api.post("/v1/recommend", response_model=RecommendResponse)
    async def recommend(self, req: RecommendRequest) -> RecommendResponse:
        t = [time.perf_counter()]
        day = req.context.date or dt.date.today()
        channel = req.context.sales_channel or 2
        ctx: QueryContext = await self.encoder.encode.remote(req.customer_id, day.month, channel)
        t.append(time.perf_counter())
        # Ask for enough candidates that k remain after the already-bought filter.
        n = min(self.n_candidates + len(ctx.purchased), 2000)
        cands: Candidates = await self.retriever.retrieve.remote(ctx.vector, n)
        t.append(time.perf_counter())
        kept: Candidates = await self.filt.apply.remote(cands, ctx.purchased)
        kept = Candidates(article_ids=kept.article_ids[: self.n_candidates], scores=kept.scores[: self.n_candidates])
        t.append(time.perf_counter())
        items = await self.ranker.rank.remote(kept, ctx, req.k)
        t.append(time.perf_counter())
        debug = None
        if req.debug:
            stages = ["encode_ms", "retrieve_ms", "filter_ms", "rank_ms"]
            debug = {s: round((b - a) * 1000, 2) for s, a, b in zip(stages, t, t[1:], strict=False)}
            debug.update(n_retrieved=len(cands.article_ids), n_after_filter=len(kept.article_ids),
                         known_customer=ctx.known_customer)
        return RecommendResponse(request_id=uuid.uuid4().hex, customer_id=req.customer_id, items=items, debug=debug)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}


def build_app(args: dict[str, Any]) -> serve.Application:
    """Build the graph from Serve config args (`workdir`, sizes); validated up front."""
    a = AppArgs.model_validate(args)
    wd, manifest = _load(a.workdir)  # fail here, not in a replica, when the run is incomplete
    if manifest.index is None or "ranker" not in manifest.models:
        raise ValueError(f"{wd.manifest_path}: run is incomplete (no index or ranker)")
    cfg = load_config(wd.config_path)
    workdir = str(wd.root)
    opts = {"ray_actor_options": {"num_cpus": a.num_cpus},
            "autoscaling_config": {"min_replicas": 1, "max_replicas": a.max_replicas,
                                   "target_ongoing_requests": 4}}
    return Ingress.options(**opts).bind(
        QueryEncoderDeployment.options(**opts).bind(workdir),
        RetrieverDeployment.options(**opts).bind(workdir),
        FilterDeployment.options(**opts).bind(),
        RankerDeployment.options(**opts).bind(workdir),
        cfg.serve.n_candidates,
    )


def serve_config(workdir: Path, host: str, port: int) -> dict[str, Any]:
    """A Serve config that `serve deploy` accepts, for this workdir."""
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": host, "port": port},
        "applications": [
            {"name": APP_NAME, "route_prefix": "/", "import_path": "ray_apps.app:build_app",
             "args": {"workdir": str(workdir)}}
        ],
    }
