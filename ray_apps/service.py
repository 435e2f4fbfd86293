"""One run's serving stages as a plain Python object (no Ray), and what protects them.

`Recommender` loads what the run's manifest names, each part on first use (a split-topology
deployment loads only the stage it runs): the query encoder, the live item index, the ranking
stage, the popularity lists, the online store. The fused deployment, the split graph's stage
deployments, batch tools and the in-process benchmark all call the same methods.

The online store sits behind a `StoreGuard`: a call waits at most the configured socket
timeout, and after a failure the store is skipped for `db_retry_s`, so while the database is
down every request falls back at once (to the last good rows of the customer, or popularity)
instead of each one waiting for a timeout; the first call after the pause tries again, so
recovery needs nobody.
"""
from __future__ import annotations

import datetime as dt
import pickle
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any, TypeVar

from common.artifacts import Manifest, read_manifest
from common.config import RayrecConfig, load_config
from common.workdir import Workdir
from ray_apps.metrics import Metrics, NullMetrics
from ray_apps.schemas import Candidates, QueryContext

T = TypeVar("T")
MAX_APPLY_ATTEMPTS = 3  # tries of a purchase whose online update fails while the store is up
MAX_REMEMBERED_INTERACTIONS = 100_000  # interaction event ids a replica remembers (the latest)


class StoreUnavailable(RuntimeError):
    """The online store failed or is paused after a failure; answer from fallbacks."""


class UnknownArticle(LookupError):
    """An article id the served index does not hold."""


class StoreGuard:
    """Runs online-store calls; after a failure, refuses them for `retry_s` (circuit breaker)."""

    def __init__(self, retry_s: float, clock: Callable[[], float] = time.monotonic):
        self.retry_s = retry_s
        self.clock = clock
        self.down_until = 0.0
        self.last_error: str | None = None
        self.failures = 0

    @property
    def open(self) -> bool:
        """True while calls are refused."""
        return self.clock() < self.down_until

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self.open:
            raise StoreUnavailable(f"online store paused after: {self.last_error}")
        try:
            return fn(*args, **kwargs)
        except (ConnectionError, TimeoutError, OSError) as e:
            self.trip(e)
            raise StoreUnavailable(str(e)) from e

    def trip(self, e: BaseException) -> None:
        self.failures += 1
        self.last_error = f"{type(e).__name__}: {e}"
        self.down_until = self.clock() + self.retry_s


class LastGood:
    """The most recent rows read for each key (bounded LRU), served while the store is down.

    Each value is kept pickled: as Python rows (dicts holding lists and dicts) a full cache is
    hundreds of thousands of objects that every full garbage collection of the replica walks
    while its requests wait; as bytes it is nothing to walk. With 50,000 customers' rows a full
    collection took 70-86 ms one way and 0.6-0.8 ms the other (serve_load.py, "case": "gc_full_collect",
    docs/scaling.md F31); a put costs ~8 us more, a get (only while the store is down) ~16 us."""

    def __init__(self, size: int = 50_000):
        self.size = size
        self._rows: OrderedDict[Any, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, key: Any, value: Any) -> None:
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            self._rows[key] = data
            self._rows.move_to_end(key)
            while len(self._rows) > self.size:
                self._rows.popitem(last=False)

    def get(self, key: Any) -> Any | None:
        with self._lock:
            data = self._rows.get(key)
        return None if data is None else pickle.loads(data)

    def __len__(self) -> int:
        return len(self._rows)


class Recommender:
    """The stages of one pipeline run, in this process. Thread-safe for concurrent requests
    except where noted (the online store serialises its own calls)."""

    def __init__(self, workdir: str, metrics: Metrics | None = None, follow_index: bool = True,
                 n_candidates: int | None = None, article_cache_ttl_s: float | None = None):
        self.wd = Workdir.at(workdir)
        self.manifest: Manifest = read_manifest(self.wd)
        cfg = load_config(self.wd.config_path)
        # candidates ranked per request and article-cache seconds, instead of the run's settings
        update = {k: v for k, v in (("n_candidates", n_candidates), ("article_cache_ttl_s", article_cache_ttl_s))
                  if v is not None}
        if update:
            cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update=update)})
        self.cfg: RayrecConfig = cfg
        self.metrics: Metrics = metrics or NullMetrics()
        self.guard = StoreGuard(self.cfg.serve.db_retry_s)
        self.customers = LastGood()
        self._follow_index = follow_index
        self._store = None
        self._store_lock = threading.Lock()
        self._ranker = None
        self._fs = None
        self._pending: list[Any] = []  # purchases logged but not yet applied online (store was down)
        self._apply_failures: dict[str, int] = {}  # event id -> failed applies not due to the store being down
        self._events_lock = threading.Lock()  # one event batch at a time: the pending list is shared
        self._retry_thread: threading.Thread | None = None
        # interaction event ids this replica logged, newest last: a retry is acknowledged, not logged again
        self._logged_interactions: OrderedDict[str, None] = OrderedDict()

    # --- parts, loaded on first use -------------------------------------------------------------
    def store(self):
        """The online store, connected on first use (a database down at start-up is not fatal)."""
        if self._store is None:
            with self._store_lock:
                if self._store is None:
                    from feature_store.connect import open_online_store

                    s = self.cfg.serve
                    self._store = self.guard.call(open_online_store, self.cfg.database, self.wd,
                                                  connect_timeout=min(s.db_timeout_s * 2, 5),
                                                  read_timeout=s.db_timeout_s, write_timeout=s.db_timeout_s * 4)
        return self._store

    @cached_property
    def encoder(self):
        from ray_apps.stages.encoder import QueryEncoder

        return QueryEncoder(self.wd.two_tower_dir, self.cfg.two_tower.history_len)

    @cached_property
    def index(self):
        from training.index import LiveItemIndex

        return LiveItemIndex(str(self.wd.root), poll_s=2.0 if self._follow_index else 0)

    @cached_property
    def stage(self):
        from ray_apps.stages.ranking import ranking_stage

        return ranking_stage(self.wd, self.manifest, self.cfg)

    def ranker(self):
        if self._ranker is None:
            from ray_apps.stages.ranking import OnlineRanker

            s = self.cfg.serve
            self._ranker = OnlineRanker(self.store(), self.manifest, self.stage, s.article_cache_ttl_s,
                                        s.article_cache_entries, self._count_article_cache)
        return self._ranker

    def _count_article_cache(self, hits: int, misses: int) -> None:
        self.metrics.cache("articles", True, hits)
        self.metrics.cache("articles", False, misses)

    @cached_property
    def popularity(self) -> dict[str, Any]:
        from training.popularity import load_popularity

        rel = self.manifest.models.get("popularity")
        if rel is not None:
            return load_popularity(self.wd.resolve(rel))
        return self._popularity_from_articles()

    def _popularity_from_articles(self) -> dict[str, Any]:
        """Runs built before popularity.json: the articles group's 7-day sales."""
        arts = self.article_snapshot_frame()
        order = arts.sort_values(["sales_7d", "sales_total"], ascending=False)["article_id"].astype(str)
        return {"as_of": None, "days": 7, "overall": list(order[:300]), "by_age_group": {}}

    def _articles_group(self):
        from feature_store.store import FeatureStore

        return FeatureStore(self.wd, None).get_feature_group("articles", self.manifest.feature_groups["articles"].version)

    def article_snapshot_frame(self):
        """The articles group's latest offline rows (what the pipeline last wrote online)."""
        return self._articles_group().read(latest=True)

    @cached_property
    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Article rows of the popular articles as the pipeline wrote them: what the business
        rules read when the online store is down (stale stock, but ages and regions hold)."""
        from feature_store.store import to_online_rows

        pop = self.popularity
        wanted = set(pop.get("overall", [])).union(*[set(v) for v in pop.get("by_age_group", {}).values()])
        arts = self.article_snapshot_frame()
        arts = arts[arts["article_id"].astype(str).isin(wanted)]
        return {str(r["article_id"]): r for r in to_online_rows(self._articles_group().group, arts)}

    def warm(self, role: str = "all") -> None:
        """Load the parts a role uses now (replica start-up), so no request pays for loading:
        "encoder" (query tower, store), "retriever" (index, text model), "ranker" (ranker,
        popularity, store) or "all"."""
        if role in ("all", "encoder"):
            _ = self.encoder
        if role in ("all", "retriever"):
            try:
                self.index.index.semantic_search("warm up", 1)  # loads the text model search uses
            except ValueError:
                pass  # an index built without text vectors: search is BM25 only
        if role in ("all", "ranker"):
            _ = self.stage, self.popularity, self.snapshot
        if role in ("all", "encoder", "ranker"):
            try:
                self.ranker() if role != "encoder" else self.store()
            except StoreUnavailable as e:
                print(f"[serve] online store not reachable yet ({e}); answering degraded until it is", flush=True)
        if role in ("all", "encoder") and self.cfg.serve.replay_events_s > 0:
            threading.Thread(target=self.replay_logged_purchases, daemon=True, name="replay-events").start()

    def replay_logged_purchases(self) -> int:
        """Apply the recently logged purchases that no replica applied online: a replica killed
        after the durable log write (and its 2xx) but before the online transaction leaves such
        an event behind. Applying is idempotent by event id, so replicas replaying together, or
        racing a live request, count each purchase once. While the store is unreachable the
        events wait in the pending list like any other. Returns how many were queued."""
        from feature_store.events import logged_purchases, unapplied_events
        from feature_store.store import FeatureStore

        events = logged_purchases(self.wd, self.cfg.serve.replay_events_s)
        if not events:
            return 0
        try:
            missing = self.guard.call(lambda: unapplied_events(FeatureStore(self.wd, self.store()), events))
        except StoreUnavailable:
            missing = events  # cannot tell yet: the idempotent apply decides once the store is back
        if missing:
            print(f"[serve] applying {len(missing)} logged purchase(s) not yet applied online", flush=True)
            with self._events_lock:
                self._pending += [e for e in missing if e not in self._pending]
                self._record_events([])
        return len(missing)

    # --- stages ----------------------------------------------------------------------------------
    def encode(self, customer_id: str, month: int, channel: int) -> QueryContext:
        """Read the customer's rows online and encode the query; from the last good rows (or
        as an unknown customer) flagged `degraded` when the store is unavailable."""
        return self.encode_many([(customer_id, month, channel)])[0]

    def encode_many(self, requests: Sequence[tuple[str, int, int]]) -> list[QueryContext]:
        """`encode` for several requests: one read per feature group, one forward pass of the
        query tower (what @serve.batch hands over)."""
        from feature_store.views import query_row
        from ray_apps.stages.online import OnlineFeatures
        from training.features import as_columns, encode_queries

        ids = list(dict.fromkeys(r[0] for r in requests))
        degraded = False
        try:
            found = self.guard.call(lambda: OnlineFeatures(self.store(), self.manifest).customers(ids))
            for c, rows in found.items():
                self.customers.put(c, rows)
        except StoreUnavailable:
            degraded = True
            kept = {c: self.customers.get(c) for c in ids}
            for c in ids:
                self.metrics.cache("customers", kept[c] is not None)
            found = {c: row or (None, None) for c, row in kept.items()}
        rows, ctxs = [], []
        for customer_id, month, channel in requests:
            customer, history = found[customer_id]
            purchased = list((history or {}).get("purchased") or [])
            rows.append(query_row(customer, customer_id, purchased[: self.encoder.history_len], month, channel))
            ctxs.append((customer_id, customer, history, purchased, channel, degraded))
        enc = self.encoder
        vecs = enc.tower.embed(encode_queries(enc.vocab, as_columns(rows), enc.history_len))
        return [QueryContext(customer_id=c, known_customer=cu is not None, customer=cu, history=h, purchased=p,
                             vector=v.tolist(), sales_channel=ch, degraded=d)
                for (c, cu, h, p, ch, d), v in zip(ctxs, vecs, strict=True)]

    def retrieve(self, vector: Sequence[float], n: int) -> Candidates:
        ids, scores = self.index.search(vector, n)
        return Candidates(article_ids=ids, scores=[float(s) for s in scores])

    def fetch_policy(self) -> dict[str, Any]:
        return self.cfg.filters.model_dump()

    def rank(self, cands: Candidates, ctx: QueryContext, k: int, filters: dict[str, Any] | None,
             day: dt.date) -> dict[str, Any]:
        """Business rules, features, ranker, diversity. `unavailable` when the store failed."""
        return self.rank_many([(cands, ctx, k, filters, day)])[0]

    def rank_many(self, requests: Sequence[tuple[Candidates, QueryContext, int, dict[str, Any] | None, dt.date]]
                  ) -> list[dict[str, Any]]:
        """`rank` for several requests: one articles read and one model call for all of them
        (what @serve.batch hands over)."""
        from ray_apps.stages.ranking import RankRequest
        from training.filters import RequestFilters

        t0 = time.perf_counter()
        batch = [RankRequest(cands, ctx.customer, ctx.history, ctx.sales_channel, day, k,
                             RequestFilters.from_dict(filters)) for cands, ctx, k, filters, day in requests]
        try:
            results = self.guard.call(lambda: self.ranker().rank_many(batch))
        except StoreUnavailable as e:
            ms = round((time.perf_counter() - t0) * 1000, 2)
            return [{"unavailable": str(e), "items": [], "removed": {}, "n_candidates": len(r.cands.article_ids),
                     "n_after_filter": 0, "n_ranked": 0, "stage_ms": ms} for r in batch]
        ms = round((time.perf_counter() - t0) * 1000, 2)
        return [{"items": [{"article_id": a, "score": s, "features": f}
                           for a, s, f in zip(out.article_ids, out.scores, feats, strict=True)],
                 "removed": out.removed, "n_candidates": out.n_candidates, "n_after_filter": out.n_after_filter,
                 "n_ranked": out.n_ranked, "candidates": out.candidates, "stage_ms": ms} for out, feats in results]

    def popular(self, ctx: QueryContext | None, k: int, filters: dict[str, Any] | None,
                age: float | None = None) -> dict[str, Any]:
        """Popular articles for the customer's (or the request's) age group, through the same
        business rules; article rows read online, or the pipeline's snapshot when the store is
        unavailable (then `degraded`)."""
        from feature_store.store import read_online
        from training.filters import RequestFilters
        from training.popularity import popular_ids, popular_ranked

        customer = ctx.customer if ctx else None
        history = ctx.history if ctx else None
        if age is not None and customer is None:
            customer = {"age": float(age)}
        request = RequestFilters.from_dict(filters)
        ids = popular_ids(self.popularity, customer)
        degraded = False
        try:
            rows = self.guard.call(lambda: read_online(self.store(), self.manifest.feature_groups["articles"],
                                                       "articles", ids, self.stage.article_columns(request)))
        except StoreUnavailable:
            degraded = True
            rows = self.snapshot
        out = popular_ranked(self.popularity, customer, history, rows, self.cfg.filters, k, request)
        return out | {"degraded": degraded}

    def similar(self, article_id: str, k: int) -> Candidates:
        try:
            ids, scores = self.index.similar(article_id, k)
        except KeyError as e:
            raise UnknownArticle(f"article {article_id!r} is not in the served index "
                                 f"(version {self.index.version})") from e
        return Candidates(article_ids=ids, scores=[float(s) for s in scores])

    def search_pool_cached(self, query: str, n: int) -> bool:
        """Whether `search_pool(query, _, n)` finds the query's fused pool cached (see `hybrid`)."""
        return self.index.has_text_pool(query, n)

    def search_pool(self, query: str, vector: Sequence[float] | None, n: int) -> Candidates:
        """Hybrid text + semantic matches, re-ordered toward the customer's query vector."""
        ids, scores = self.index.hybrid(query, n, vector, candidates=n)
        return Candidates(article_ids=ids, scores=[float(s) for s in scores])

    # --- events ----------------------------------------------------------------------------------
    def record_events(self, events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Durably log, then apply online. Each event is fsync'ed to the workdir's event log
        before it is applied or acknowledged, so an acknowledged event survives a crash of this
        process; purchases then update the online rows (idempotent by event id). When the store
        is unavailable the purchases are kept pending and applied on the next call that reaches it.

        Returns: per event {event_id, type, applied (False: seen before), pending}.
        """
        with self._events_lock:
            return self._record_events(events)

    def _record_events(self, events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        from feature_store.events import PurchaseEvent, append_interactions, append_log_lines, event_log_dir

        purchases = [e for e in events if e["type"] == "purchase"]
        others = [e for e in events if e["type"] != "purchase"]
        prices = self._prices([e["article_id"] for e in purchases if e.get("price") is None])
        pevents = [PurchaseEvent(e["event_id"], e["customer_id"], e["article_id"],
                                 float(e["price"] if e.get("price") is not None else prices.get(e["article_id"], 0.0)),
                                 e["ts"], int(e.get("sales_channel") or 2)) for e in purchases]
        for pe in pevents:
            pe.check()
        fresh = [e for e in others if e["event_id"] not in self._logged_interactions]
        if fresh:
            append_interactions(self.wd, [{k: e[k] for k in ("event_id", "customer_id", "article_id", "type")}
                                          | {"ts": str(e["ts"])} for e in fresh], durable=True)
            self._remember_interactions([e["event_id"] for e in fresh])
        if pevents:
            append_log_lines(event_log_dir(self.wd), [(pe.timestamp, pe.to_dict()) for pe in pevents], durable=True)
        new_ids = {e["event_id"] for e in fresh}
        out = {e["event_id"]: {"event_id": e["event_id"], "type": e["type"], "applied": e["event_id"] in new_ids,
                               "pending": False} for e in others}
        pending = self._pending + pevents
        self._pending = []
        for pe in pending:
            error = None
            try:
                res = self.guard.call(self._apply, pe)
                applied, still = res.applied, False
                self._apply_failures.pop(pe.event_id, None)
            except StoreUnavailable:
                applied, still = False, True
            except Exception as e:  # not the store being down (a lock wait, a server error): this event only
                applied, still, error = False, True, f"{type(e).__name__}: {e}"
                tries = self._apply_failures[pe.event_id] = self._apply_failures.get(pe.event_id, 0) + 1
                if tries >= MAX_APPLY_ATTEMPTS:
                    still = False
                    self._apply_failures.pop(pe.event_id, None)
                print(f"[serve] purchase {pe.event_id!r}: the online update failed ({error}); "
                      + ("it stays pending" if still else f"gave up after {tries} tries: it is in the event log, "
                         "which the next pipeline run reads"), flush=True)
            if still:
                self._pending.append(pe)
                self._retry_pending_later()
            self.metrics.event("purchase", "pending" if still else "failed" if error else "applied" if applied
                               else "duplicate")
            if applied and self._ranker is not None:
                self._ranker.forget([pe.article_id])  # its stock and sales changed: read it again
            out[pe.event_id] = {"event_id": pe.event_id, "type": "purchase", "applied": applied, "pending": still} | (
                {"error": error} if error else {})
        for e in others:
            self.metrics.event(e["type"], "applied" if e["event_id"] in new_ids else "duplicate")
        return [out[e["event_id"]] for e in events]

    def _remember_interactions(self, event_ids: list[str]) -> None:
        """Keep the latest MAX_REMEMBERED_INTERACTIONS ids (a retry comes soon after its first try;
        the log's readers keep one row per event id in any case, `read_interactions`)."""
        seen = self._logged_interactions
        for i in event_ids:
            seen[i] = None
        while len(seen) > MAX_REMEMBERED_INTERACTIONS:
            seen.popitem(last=False)

    def _retry_pending_later(self) -> None:
        """Apply the pending purchases from a background thread once the store is back: requests
        may all go to other replicas, so this replica must not wait for its next event call."""
        if self._retry_thread is not None and self._retry_thread.is_alive():
            return

        def loop() -> None:
            while True:
                time.sleep(self.cfg.serve.db_retry_s)
                with self._events_lock:
                    if not self._pending:
                        return
                    self._record_events([])

        self._retry_thread = threading.Thread(target=loop, daemon=True, name="pending-events")
        self._retry_thread.start()

    def _apply(self, event):
        from feature_store.events import apply_purchase_event
        from feature_store.store import FeatureStore

        if self._fs is None:
            self._fs = FeatureStore(self.wd, self.store())
        return apply_purchase_event(self._fs, self.manifest.feature_groups, event, log=False,
                                    type_column=self.type_column)

    @cached_property
    def type_column(self) -> str | None:
        """The article attribute purchases are counted and dated by: the run's dataset roles'."""
        from feature_store.dataset import Roles

        return Roles.from_dict((self.manifest.extra.get("dataset") or {}).get("roles")).type_column

    def _prices(self, article_ids: list[str]) -> dict[str, float]:
        """Current mean prices of articles (purchase events that did not say what was paid)."""
        if not article_ids:
            return {}
        from feature_store.store import read_online

        try:
            rows = self.guard.call(lambda: read_online(self.store(), self.manifest.feature_groups["articles"],
                                                       "articles", article_ids, ["price"]))
        except StoreUnavailable:
            rows = {a: r for a, r in self.snapshot.items() if a in set(article_ids)}
        return {a: float(r["price"]) for a, r in rows.items() if r.get("price") is not None}

    DETAIL_COLUMNS = ("prod_name", "product_type_name", "colour_group_name", "index_group_name",
                      "garment_group_name", "price", "stock", "min_age", "detail_desc")

    def article_details(self, article_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Display attributes of articles (for people: the web page, debugging)."""
        from feature_store.store import read_online

        ids = list(dict.fromkeys(article_ids))
        cols = self.detail_columns
        try:
            return self.guard.call(lambda: read_online(self.store(), self.manifest.feature_groups["articles"],
                                                       "articles", ids, cols))
        except StoreUnavailable:
            return {a: {c: r.get(c) for c in cols} for a, r in self.snapshot.items() if a in set(ids)}

    @cached_property
    def detail_columns(self) -> list[str]:
        """The display columns this run's articles group has (bring-your-own data has its own)."""
        group = self._articles_group().group
        have = set(group.columns) - {group.key}
        wanted = [c for c in self.DETAIL_COLUMNS if c in have]
        return wanted or sorted(have)

    def sample_customers(self, n: int) -> list[str]:
        """Customers with purchases (most purchases first), from the run's offline history group."""
        from feature_store.store import FeatureStore

        ref = self.manifest.feature_groups["customer_history"]
        hist = FeatureStore(self.wd, None).get_feature_group("customer_history", ref.version).read(latest=True)
        return hist.sort_values("n_purchases", ascending=False)["customer_id"].astype(str).head(n).tolist()

    def known_articles(self, article_ids: Sequence[str]) -> set[str]:
        """Which of these ids the served index holds."""
        have = set()
        for a in dict.fromkeys(article_ids):
            try:
                self.index.index.vector_of(a)
                have.add(a)
            except KeyError:
                pass
        return have

    # --- health ----------------------------------------------------------------------------------
    def ready(self, role: str = "all") -> dict[str, Any]:
        """Models loaded, index open, database reachable (each a bool, plus details), for the
        parts a role uses (see `warm`)."""
        checks: dict[str, Any] = {}
        try:
            if role in ("all", "encoder"):
                _ = self.encoder
            if role in ("all", "ranker"):
                _ = self.stage
            checks["models"] = True
        except Exception as e:  # noqa: BLE001 - readiness reports, never raises
            checks["models"], checks["models_error"] = False, str(e)
        try:
            checks["index"] = self.index.version is not None
        except Exception as e:  # noqa: BLE001
            checks["index"], checks["index_error"] = False, str(e)
        try:
            if role != "retriever":
                self.guard.call(lambda: self.store().ping())
            checks["database"] = True
        except StoreUnavailable as e:
            checks["database"], checks["database_error"] = False, str(e)
        checks["ready"] = bool(checks["models"] and checks["index"] and checks["database"])
        checks["pending_events"] = len(self._pending)
        return checks

    def close(self) -> None:
        if "index" in self.__dict__:
            self.index.close()
        if self._store is not None:
            self._store.close()
