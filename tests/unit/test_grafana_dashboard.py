"""The Grafana dashboard charts metrics the app really exports (names from ray_apps/metrics.py)."""
import json
import re
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[2] / "ops" / "grafana" / "rayrec.json"
METRICS_SRC = Path(__file__).resolve().parents[2] / "ray_apps" / "metrics.py"


def _declared() -> set[str]:
    """Metric names declared in ServeMetrics (Counter/Histogram first argument)."""
    return set(re.findall(r'(?:Counter|Histogram)\(\s*"(rayrec_[a-z_]+)"', METRICS_SRC.read_text()))


def test_dashboard_queries_only_exported_metrics():
    dash = json.loads(DASHBOARD.read_text())
    declared = _declared()
    assert {"rayrec_stage_latency_ms", "rayrec_requests", "rayrec_filter_removed", "rayrec_fallbacks",
            "rayrec_cache", "rayrec_events", "rayrec_candidates"} <= declared
    used = set()
    for p in dash["panels"]:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            for name in re.findall(r"ray_(rayrec_[a-z_]+?)(?:_bucket|_total)?\b", t["expr"]):
                used.add(name)
                assert name in declared, f"panel {p['title']!r} queries {name}, which the app does not export"
    assert used == declared  # every metric we export is charted
