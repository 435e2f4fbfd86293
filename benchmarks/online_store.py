"""Online feature reads against a real local MariaDB: one batched IN query vs a loop of single-key reads.

Usage: python benchmarks/online_store.py [--rows 10000] [--keys 100] [--reads 300]
Prints one JSON line per case; `ratio_vs_per_key_loop` compares with the per-key baseline in this run.
"""
from __future__ import annotations

import argparse
import socket
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, timed_ms  # noqa: E402

from common.config import DatabaseConfig  # noqa: E402
from common.workdir import Workdir  # noqa: E402
from feature_store.local_db import LocalMariaDB  # noqa: E402
from feature_store.online.base import TableSpec  # noqa: E402
from feature_store.online.mysql import MySQLOnlineStore  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--keys", type=int, default=100)
    ap.add_argument("--reads", type=int, default=300)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rayrec-bench-") as tmp:
        cfg = DatabaseConfig(port=free_port(), database="bench", user="bench", password_env="RAYREC_BENCH_UNSET")
        db = LocalMariaDB(Workdir.at(tmp), cfg)
        db.start()
        try:
            run(MySQLOnlineStore.from_config(cfg, db.password()), a)
        finally:
            db.stop()


def run(store: MySQLOnlineStore, a: argparse.Namespace) -> None:
    spec = TableSpec("bench_articles", "article_id", {
        "article_id": "string", "price": "float64", "sales_7d": "int64", "sales_total": "int64",
        "product_type_name": "string", "index_group_name": "string", "regions": "json",
    })
    store.ensure_table(spec)
    ids = [f"{i:010d}" for i in range(a.rows)]
    rng = np.random.default_rng(0)
    rows = [{"article_id": k, "price": float(rng.random()), "sales_7d": int(rng.integers(100)),
             "sales_total": int(rng.integers(10_000)), "product_type_name": "Trousers",
             "index_group_name": "Ladieswear", "regions": ["north", "south"]} for k in ids]
    for i in range(0, len(rows), 2000):
        store.write_batch(spec, rows[i : i + 2000])
    batches = [list(rng.choice(ids, a.keys, replace=False)) for _ in range(64)]
    it = iter(range(10**9))

    def batched() -> None:
        store.read_batch(spec, batches[next(it) % 64])

    def per_key() -> None:
        for k in batches[next(it) % 64]:
            store.read_batch(spec, [k])

    base = timed_ms(per_key, max(20, a.reads // 10))
    fast = timed_ms(batched, a.reads)
    for name, lat in (("per_key_loop", base), ("batched_in_query", fast)):
        emit("online_store_read", case=name, rows=a.rows, keys=a.keys, p50_ms=float(np.median(lat)),
             p99_ms=float(np.percentile(lat, 99)), keys_per_s=float(a.keys / (np.mean(lat) / 1000)),
             ratio_vs_per_key_loop=float(np.median(base) / np.median(lat)))
    store.drop_table(spec)
    store.close()


if __name__ == "__main__":
    main()
