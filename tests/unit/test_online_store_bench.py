"""benchmarks/online_store.py's per-call server CPU (call_cpu_split): summed over every thread."""
from __future__ import annotations

import importlib.util
import os
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "online_store.py"


def _load():
    spec = importlib.util.spec_from_file_location("online_store_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _spin(seconds: float, done: threading.Event, release: threading.Event) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass
    done.set()
    release.wait()  # alive while read: an ended thread leaves /proc/<pid>/task (the server's threads stay)


def test_server_threads_cpu_counts_the_cpu_of_other_threads():
    bench = _load()
    before = bench.server_threads_cpu_ns(os.getpid())
    done, release = threading.Event(), threading.Event()
    worker = threading.Thread(target=_spin, args=(0.2, done, release))  # another thread's CPU, not the caller's
    worker.start()
    done.wait()
    spent = (bench.server_threads_cpu_ns(os.getpid()) - before) / 1e9
    release.set()
    worker.join()
    assert 0.2 <= spent < 2.0
