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


def paced_cpu_s(fn: Callable[[int], object], n: int, rate: float) -> float:
    """Process CPU seconds of fn(0..n-1) called `rate` times per second (sleeping in between,
    as serving's work arrives): what each call costs with the wake-ups that pacing brings."""
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        time.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
        fn(i)
    return time.process_time() - c0


def emit(bench: str, **fields: object) -> None:
    """Print one case as a JSON line, with the machine's core count."""
    row = {"bench": bench, **fields, "cores": os.cpu_count()}
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
