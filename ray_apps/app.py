"""The Serve application: ingress -> query encoder -> retriever -> filter + ranker.

`build_app(args)` is the only place that knows the graph's shape. Deployments are thin: they
load artifacts named in the run's manifest and call the plain stage classes in `stages/`. The
business rules (training/filters.py) run in the ranking deployment, before the model, so both
share one batched read of the candidates' article features and the request saves a hop.
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
        from training.index import LiveItemIndex

        self.index = LiveItemIndex(workdir)  # follows `rayrec index promote|rollback` without a restart

    def retrieve(self, vector: list[float], n: int) -> Candidates:
        ids, scores = self.index.search(vector, n)
        return Candidates(article_ids=ids, scores=[float(s) for s in scores])


@serve.deployment
class RankerDeployment:
    """Business rules, features, CatBoost and diversity for one request's candidates.

    Reads the candidates' article rows online in one query, shared by the rules and the ranker
    (one hop instead of a filter hop plus a ranker hop: hops are what costs on small machines).
    """

    def __init__(self, workdir: str):
        from ray_apps.stages.ranking import OnlineRanker, ranking_stage

        wd, manifest = _load(workdir)
        self.cfg = load_config(wd.config_path)
        self.ranker = OnlineRanker(_online(wd), manifest, ranking_stage(wd, manifest, self.cfg))

    def fetch_policy(self) -> dict[str, Any]:
        """The run's filter settings, which decide how many candidates to retrieve."""
        return self.cfg.filters.model_dump()

    def rank(self, cands: Candidates, ctx: QueryContext, k: int, filters: dict[str, Any] | None,
             day: dt.date) -> dict[str, Any]:
        from training.filters import RequestFilters

        t0 = time.perf_counter()
        out = self.ranker.rank(cands, ctx.customer, ctx.history, channel=ctx.sales_channel, now=day, k=k,
                               request=RequestFilters.from_dict(filters))
        return {"items": [{"article_id": a, "score": s} for a, s in zip(out.article_ids, out.scores, strict=True)],
                "removed": out.removed, "n_candidates": out.n_candidates, "n_after_filter": out.n_after_filter,
                "n_ranked": out.n_ranked, "stage_ms": round((time.perf_counter() - t0) * 1000, 2)}


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
    def __init__(self, encoder: DeploymentHandle, retriever: DeploymentHandle,
                 ranker: DeploymentHandle, n_candidates: int):
        self.encoder, self.retriever, self.ranker = encoder, retriever, ranker
        self.n_candidates = n_candidates
        self.filter_cfg = None  # the run's FilterConfig, asked of the ranker on the first request

    @api.post("/v1/recommend", response_model=RecommendResponse)
    async def recommend(self, req: RecommendRequest) -> RecommendResponse:
        t = [time.perf_counter()]
        day = req.context.date or dt.date.today()
        channel = req.context.sales_channel or 2
        ctx: QueryContext = await self.encoder.encode.remote(req.customer_id, day.month, channel)
        t.append(time.perf_counter())
        # Retrieval over-fetches so that k candidates survive the business rules; the rules and the
        # ranker run fused in one call. Too few survivors: retrieve more, unless retrieval ran dry.
        from training.filters import bought_within, fetch_size, next_fetch

        if self.filter_cfg is None:
            from common.config import FilterConfig

            self.filter_cfg = FilterConfig.model_validate(await self.ranker.fetch_policy.remote())
        fcfg = self.filter_cfg
        filters = req.filters.model_dump() if req.filters is not None else None
        n = fetch_size(self.n_candidates, len(bought_within(ctx.history, fcfg.bought_lookback)), fcfg)
        retrieve_s, fetches = 0.0, []
        while True:
            t0 = time.perf_counter()
            cands: Candidates = await self.retriever.retrieve.remote(ctx.vector, n)
            retrieve_s += time.perf_counter() - t0
            ranked = await self.ranker.rank.remote(cands, ctx, req.k, filters, day)
            fetches.append({"asked": n, "retrieved": len(cands.article_ids), "kept": ranked["n_after_filter"]})
            n = next_fetch(n, len(cands.article_ids), ranked["n_after_filter"], req.k, fcfg)
            if n is None:
                break
        t.append(time.perf_counter())
        items = ranked["items"]
        warnings = []
        if len(items) < req.k:
            warnings.append(f"only {len(items)} of k={req.k} articles passed the filters: retrieved "
                            f"{ranked['n_candidates']}, removed {ranked['removed']}")
        debug = None
        if req.debug:
            total_ms = (t[2] - t[1]) * 1000
            debug = {"encode_ms": round((t[1] - t[0]) * 1000, 2), "retrieve_ms": round(retrieve_s * 1000, 2),
                     "filter_rank_ms": round(total_ms - retrieve_s * 1000, 2), "rank_stage_ms": ranked["stage_ms"],
                     "n_retrieved": ranked["n_candidates"], "n_after_filter": ranked["n_after_filter"],
                     "n_ranked": ranked["n_ranked"], "filter_removed": ranked["removed"], "fetches": fetches,
                     "known_customer": ctx.known_customer}
        return RecommendResponse(request_id=uuid.uuid4().hex, customer_id=req.customer_id, items=items,
                                 warnings=warnings, debug=debug)

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
