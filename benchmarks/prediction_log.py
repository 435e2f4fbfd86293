"""Prediction log: CPU per logged request, the serving replica's share of logging.

Serving logs one record per answered request (the shown articles with their ranker features,
about 10 KB of JSON for k=12). The record is handed to `training.feedback.PredictionLog`,
whose background thread encodes and appends it. This measures, at a serving-like pace
(--rate records per second for --seconds), the process CPU per record of:

    case "prediction_log"  the log as serving uses it (pydantic-core encoding, one append per
                           batch of what arrived within flush_s)
    case "per_record"      the baseline in the same run: json.dumps per record and a thread woken
                           for each record, appending it alone (the log before session 7)

and prints one JSON line per case: {"bench": "prediction_log", "case": .., "records": ..,
"cpu_us_per_record": .., "appends": .., "ratio_vs_per_record": ..}. Also `encode_us` for the
two encoders alone on the same record.

Usage: python benchmarks/prediction_log.py [--rate 100] [--seconds 3]
"""
from __future__ import annotations

import argparse
import fcntl
import json
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import emit, json_lines_only, paced_cpu_s  # noqa: E402
from pydantic_core import to_json  # noqa: E402

from training.feedback import PredictionLog  # noqa: E402
from training.ranking_features import HM_FEATURES  # noqa: E402


def record(i: int, k: int = 12) -> dict:
    """A request's record as serving logs it: k shown items with every ranker feature."""
    feats = {n: 0.123456789 * (j + 1) for j, n in enumerate(HM_FEATURES.numeric)}
    feats.update({n: f"{n} value" for n in HM_FEATURES.categorical})
    return {"request_id": f"{i:032x}", "ts": "2020-09-22T10:00:00.123456", "customer_id": f"c{i:08d}",
            "endpoint": "recommend", "model": {"run": "bench", "created_at": "2020-09-22", "index_version": 3},
            "index_version": 3, "source": "ranked", "degraded": False,
            "items": [{"article_id": f"{a:010d}", "position": a, "score": 1.0 / (a + 1), "features": dict(feats)}
                      for a in range(k)], "n_retrieved": 368, "n_after_filter": 271}


class PerRecordLog:
    """Baseline: a thread woken for each record, json.dumps, one locked append per record."""

    def __init__(self, folder: Path):
        self.folder, self.appends = folder, 0
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def log(self, rec: dict) -> None:
        self._q.put(dict(rec))

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (rec := self._q.get()) is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(self.folder / "day.jsonl", "a", encoding="utf-8") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                f.write(json.dumps(rec, separators=(",", ":"), default=str) + "\n")
                f.flush()
                fcntl.flock(f, fcntl.LOCK_UN)
            self.appends += 1


def paced(log, rate: float, seconds: float) -> tuple[int, float]:
    """Log records at `rate` per second for `seconds`; (records, process CPU seconds incl. the close)."""
    n = int(rate * seconds)
    recs = [record(i) for i in range(n)]
    cpu = paced_cpu_s(lambda i: log.log(recs[i]), n, rate)
    c0 = time.process_time()
    log.close()
    return n, cpu + time.process_time() - c0


def encode_us(fn, rec: dict, n: int = 2000) -> float:
    t0 = time.process_time()
    for _ in range(n):
        fn(rec)
    return (time.process_time() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=100.0, help="records per second")
    ap.add_argument("--seconds", type=float, default=3.0)
    a = ap.parse_args()
    json_lines_only()
    rec = record(0)
    emit("prediction_log", case="encode", record_bytes=len(to_json(rec)),
         json_dumps_us=encode_us(lambda r: json.dumps(r, separators=(",", ":"), default=str), rec),
         pydantic_core_us=encode_us(lambda r: to_json(r, fallback=str, inf_nan_mode="null"), rec))
    with tempfile.TemporaryDirectory(prefix="rayrec-plog-") as tmp:
        base = PerRecordLog(Path(tmp) / "base")
        n, cpu_base = paced(base, a.rate, a.seconds)
        emit("prediction_log", case="per_record", rate=a.rate, records=n, appends=base.appends,
             cpu_us_per_record=cpu_base / n * 1e6)
        log = PredictionLog(Path(tmp) / "log")
        n, cpu = paced(log, a.rate, a.seconds)
        assert log.written == n, f"{log.written} of {n} records written"
        emit("prediction_log", case="prediction_log", rate=a.rate, records=n, appends=log.batches,
             cpu_us_per_record=cpu / n * 1e6, ratio_vs_per_record=round(cpu / cpu_base, 3))


if __name__ == "__main__":
    main()
