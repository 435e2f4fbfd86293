"""benchmarks/serve_load.py's CPU accounting: per-group CPU per request from /proc readings."""
from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_load.py"


def _load():
    spec = importlib.util.spec_from_file_location("serve_load_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_cpu_per_request_divides_each_groups_cpu_by_the_requests():
    sl = _load()
    got = sl.cpu_per_request({"serve_replicas": 10.0, "database": 2.0, "gone": 1.0},
                             {"serve_replicas": 10.5, "database": 2.1, "haproxy": 0.02, "other": 0.0}, 50)
    assert got == {"database": 2.0, "haproxy": 0.4, "serve_replicas": 10.0, "total": 12.4}


def test_this_process_is_counted_as_the_load_generator():
    sl = _load()
    before = sl.cpu_by_group()
    t_end = time.process_time() + 0.2
    while time.process_time() < t_end:  # burn CPU in this process
        sum(range(1000))
    after = sl.cpu_by_group()
    assert after["load_generator"] - before.get("load_generator", 0.0) >= 0.15
