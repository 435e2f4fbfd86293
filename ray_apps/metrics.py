"""Serving metrics: per-stage latency, candidates through each filter, fallbacks, errors, cache hits.

Inside Serve replicas they go through `ray.serve.metrics` and appear on Ray's Prometheus
endpoint (`ray start --metrics-export-port`, names prefixed `ray_`), aggregated across every
replica; ops/grafana/rayrec.json charts them. Outside Serve (tests, the in-process benchmark)
`NullMetrics` keeps the same calls free.
"""
from __future__ import annotations

from typing import Protocol

LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 30, 50, 75, 100, 200, 500, 1000, 2000]


class Metrics(Protocol):
    def stage_ms(self, stage: str, ms: float) -> None: ...
    def request(self, endpoint: str, status: str) -> None: ...
    def candidates(self, stage: str, n: int) -> None: ...
    def filtered(self, rule: str, n: int) -> None: ...
    def fallback(self, reason: str) -> None: ...
    def cache(self, group: str, hit: bool, n: int = 1) -> None: ...
    def event(self, kind: str, result: str) -> None: ...


class NullMetrics:
    """Metrics that go nowhere (no Ray needed)."""

    def stage_ms(self, stage: str, ms: float) -> None:
        pass

    def request(self, endpoint: str, status: str) -> None:
        pass

    def candidates(self, stage: str, n: int) -> None:
        pass

    def filtered(self, rule: str, n: int) -> None:
        pass

    def fallback(self, reason: str) -> None:
        pass

    def cache(self, group: str, hit: bool, n: int = 1) -> None:
        pass

    def event(self, kind: str, result: str) -> None:
        pass


class ServeMetrics:
    """`ray.serve.metrics` counters and histograms (one set per replica process)."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Histogram

        self._latency = Histogram("rayrec_stage_latency_ms", description="Latency of one serving stage",
                                  boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("stage",))
        self._requests = Counter("rayrec_requests", description="Answered requests by endpoint and status",
                                 tag_keys=("endpoint", "status"))
        self._candidates = Counter("rayrec_candidates", description="Candidates entering a stage",
                                   tag_keys=("stage",))
        self._filtered = Counter("rayrec_filter_removed", description="Candidates a business rule removed",
                                 tag_keys=("rule",))
        self._fallbacks = Counter("rayrec_fallbacks", description="Answers from popularity or last good data",
                                  tag_keys=("reason",))
        self._cache = Counter("rayrec_cache", description="Cache lookups: last-good customer rows, article rows", tag_keys=("group", "result"))
        self._events = Counter("rayrec_events", description="Events received", tag_keys=("type", "result"))

    def stage_ms(self, stage: str, ms: float) -> None:
        self._latency.observe(ms, tags={"stage": stage})

    def request(self, endpoint: str, status: str) -> None:
        self._requests.inc(tags={"endpoint": endpoint, "status": status})

    def candidates(self, stage: str, n: int) -> None:
        if n:
            self._candidates.inc(n, tags={"stage": stage})

    def filtered(self, rule: str, n: int) -> None:
        if n:
            self._filtered.inc(n, tags={"rule": rule})

    def fallback(self, reason: str) -> None:
        self._fallbacks.inc(tags={"reason": reason})

    def cache(self, group: str, hit: bool, n: int = 1) -> None:
        if n:
            self._cache.inc(n, tags={"group": group, "result": "hit" if hit else "miss"})

    def event(self, kind: str, result: str) -> None:
        """`result`: applied, duplicate (the event id was seen before), pending (the store is down) or
        failed (the online update failed while the store was up; the event is in the event log)."""
        self._events.inc(tags={"type": kind, "result": result})
