"""Top-100 retrieval over random unit vectors: the LanceDB table serving uses vs exact numpy.

Usage: python benchmarks/retrieval.py [--items 1500 20000] [--dim 64] [--queries 200]
Prints one JSON line per (items, engine); recall_at_100 is measured against exact numpy.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, json_lines_only, timed_ms  # noqa: E402

from training.evaluate import top_k_exact  # noqa: E402
from training.index import TABLE_NAME, ItemIndex, to_index_rows  # noqa: E402


def build(tmp: str, n: int, dim: int, rng: np.random.Generator) -> tuple[ItemIndex, np.ndarray]:
    import lancedb

    vecs = rng.normal(size=(n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    frame = pd.DataFrame({"article_id": [f"{i:010d}" for i in range(n)], "prod_name": "x",
                          "product_type_name": "t", "index_group_name": "g", "garment_group_name": "g",
                          "colour_group_name": "c", "price": 0.01, "stock": 1, "min_age": 0})
    tbl = lancedb.connect(tmp).create_table(TABLE_NAME, data=to_index_rows(frame, vecs), mode="overwrite")
    return ItemIndex(tmp, TABLE_NAME, tbl.version), vecs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, nargs="+", default=[1500, 20000])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=200)
    a = ap.parse_args()
    json_lines_only()
    rng = np.random.default_rng(0)
    for n in a.items:
        measure(n, a.dim, a.queries, rng)


def measure(n: int, dim: int, queries: int, rng: np.random.Generator) -> None:
    """Latency of both engines on the same queries, and the index's recall against exact."""
    with tempfile.TemporaryDirectory(prefix="rayrec-bench-") as tmp:
        index, vecs = build(tmp, n, dim, rng)
        qs = vecs[rng.integers(0, n, queries)] + rng.normal(0, 0.1, (queries, dim)).astype(np.float32)
        exact = top_k_exact(qs, vecs, 100)[0]
        recall = np.mean([len({f"{j:010d}" for j in exact[i]} & set(index.search(qs[i], 100)[0])) / 100
                          for i in range(queries)])
        it = iter(range(10**9))
        lat_np = timed_ms(lambda: top_k_exact(qs[next(it) % queries][None], vecs, 100), queries)
        lat_db = timed_ms(lambda: index.search(qs[next(it) % queries], 100), queries)
        for engine, lat, rec in (("numpy_exact", lat_np, 1.0), ("lancedb_flat", lat_db, recall)):
            emit("retrieval_top100", engine=engine, items=n, dim=dim, p50_ms=float(np.median(lat)),
                 p99_ms=float(np.percentile(lat, 99)), recall_at_100=float(rec),
                 ratio_vs_numpy_exact=float(np.median(lat) / np.median(lat_np)))

if __name__ == "__main__":
    main()
