"""Shared helpers for benchmarks: percentiles and the one-JSON-line-per-case output."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import numpy as np


def timed_ms(fn: Callable[[], object], n: int, warmup: int = 5) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter()
        fn()
        out[i] = (time.perf_counter() - t0) * 1000
    return out


def emit(bench: str, **fields: object) -> None:
    """Print one case as a JSON line, with the machine's core count."""
    row = {"bench": bench, **fields, "cores": os.cpu_count()}
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
