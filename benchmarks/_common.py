"""Shared helpers for benchmarks: percentiles and the one-JSON-line-per-case output."""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

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


CALIBRATION_LOOP = 200_000  # multiply-adds of the reference loop


def calibration_loop_ms(repeats: int = 3) -> float:
    """Milliseconds this machine takes for a fixed pure-Python loop, the best of `repeats`.

    The shared 2-vCPU VMs these benchmarks run on change speed from one hour to the next (the
    same code measured 2-3x apart on different days; docs/scaling.md F39): a figure from one run
    is compared with another's only next to this one."""
    best = float("inf")
    for _ in range(repeats):
        t0, s = time.perf_counter(), 0
        for i in range(CALIBRATION_LOOP):
            s += i * i
        best = min(best, (time.perf_counter() - t0) * 1000)
    return best


_json_out: TextIO | None = None  # where emit writes once json_lines_only() ran (else sys.stdout)


def json_lines_only() -> None:
    """Keep this process's stdout for `emit`'s JSON lines and send everything else written to it
    to stderr: the progress lines of a pipeline a benchmark builds, the worker logs Ray forwards
    to its driver, CatBoost's, those of subprocesses and C code (file descriptor 1 itself is
    pointed at stderr). Without it `make bench > out.jsonl` held 74 lines that were not JSON.
    Call it first in a benchmark's main(), never in an imported module (tests import this one)."""
    global _json_out
    if _json_out is not None:
        return
    sys.stdout.flush()
    _json_out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr


def emit(bench: str, **fields: object) -> None:
    """Print one case as a JSON line, with the machine's core count and its speed as the line is
    printed (`calibration_loop_ms`)."""
    row = {"bench": bench, **fields, "calibration_loop_ms": calibration_loop_ms(), "cores": os.cpu_count()}
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}),
          file=_json_out or sys.stdout, flush=True)


def rss_mb() -> float:
    """This process's resident memory now (/proc/self/status VmRSS), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@contextmanager
def rss_peak(every_s: float = 0.02) -> Iterator[dict[str, float]]:
    """Sample this process's RSS every `every_s` while the block runs; the dict it yields gets
    `rss_before_mb` and, after the block, `peak_rss_mb` and `peak_rss_growth_mb` (the peak over
    the start: what the block itself held at most, which ru_maxrss cannot tell per case)."""
    out = {"rss_before_mb": rss_mb()}
    peak = [out["rss_before_mb"]]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(every_s):
            peak[0] = max(peak[0], rss_mb())

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield out
    finally:
        stop.set()
        t.join()
        peak[0] = max(peak[0], rss_mb())
        out["peak_rss_mb"] = round(peak[0], 1)
        out["peak_rss_growth_mb"] = round(peak[0] - out["rss_before_mb"], 1)
        out["rss_before_mb"] = round(out["rss_before_mb"], 1)
