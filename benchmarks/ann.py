"""The item index at catalogue scale: build time, top-100 latency and recall, ANN vs exact.

Usage: python benchmarks/ann.py [--items 105542 1000000] [--dim 64] [--queries 200]
                                [--index auto IVF_PQ ...] [--data clustered|random]

Per item count it writes a LanceDB table of the real item-table schema (synthetic vectors and
attributes), builds the indexes the way `rayrec index build` does (attribute + full-text
indexes, then each ANN index asked for, calibrated to recall 0.95), and queries it through
`ItemIndex` (what serving calls), unfiltered and with the prefilter
`index_group_name = 'Ladieswear' AND in_stock` (about a third of the items). The reference is
exact brute force in this script: numpy matmul + top-k over all vectors (filtered: over the
rows the filter keeps, computed here from the attributes, not by LanceDB).

One JSON line per (items, index, filtered): p50/p99 of one top-100 query, recall@100 against
the reference, the reference's own p50, and `serving_engine`, what `ItemIndex(engine="auto")`
uses for that build (the faster of exact and ANN as measured by the build). The "exact" lines
are ItemIndex's exact engine (numpy over the pinned version's vectors, filter masks cached).

data: clustered (default) draws vectors from 2,000 Gaussian clusters (sigma 0.6 around
unit-variance centres), a stand-in for learned item embeddings, which cluster by product type
and style; random draws i.i.d. Gaussian directions, the worst case for any IVF index.
Queries: `probe_queries` (an item vector plus noise of norm ~0.5: customer vectors sit near
what they buy), drawn independently of the build's calibration queries. Filtered ANN queries
probe more partitions (`filtered_nprobes`).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, json_lines_only  # noqa: E402

from training.index import (  # noqa: E402
    TABLE_NAME,
    VECTOR_COLUMN,
    BuildRecord,
    ItemIndex,
    choose_ann,
    choose_engine,
    create_attribute_indexes,
    create_vector_index,
    price_band_edges,
    probe_queries,
    record_build,
    to_index_rows,
)

INDEX_GROUPS = ["Ladieswear", "Menswear", "Divided", "Baby/Children", "Sport"]
GROUP_WEIGHTS = [0.4, 0.2, 0.2, 0.15, 0.05]
FILTER = "index_group_name = 'Ladieswear' AND in_stock"
CHUNK = 100_000


def catalogue(n: int, dim: int, data: str, rng: np.random.Generator) -> np.ndarray:
    if data == "random":
        x = rng.normal(size=(n, dim)).astype(np.float32)
    else:
        centres = rng.normal(size=(2000, dim)).astype(np.float32)
        x = centres[rng.integers(0, 2000, n)]
        x += rng.normal(0, 0.6, size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def attributes(n: int, rng: np.random.Generator) -> pd.DataFrame:
    types = ["Dress", "Trousers", "Sweater", "Socks", "T-shirt", "Jacket"]
    t = rng.integers(0, len(types), n)
    return pd.DataFrame({
        "article_id": [f"{i:010d}" for i in range(n)],
        "prod_name": [f"{types[j]} {i}" for i, j in enumerate(t)],
        "product_type_name": [types[j] for j in t],
        "index_group_name": rng.choice(INDEX_GROUPS, n, p=GROUP_WEIGHTS),
        "garment_group_name": rng.choice(["Jersey", "Knitwear", "Trousers", "Outdoor"], n),
        "colour_group_name": rng.choice(["Black", "White", "Red", "Blue"], n),
        "detail_desc": [f"A {types[j].lower()} in soft cotton" for j in t],
        "price": rng.gamma(2.0, 0.015, n),
        "stock": np.where(rng.random(n) < 0.15, 0.0, 5.0),
        "min_age": np.where(rng.random(n) < 0.05, 18, 0),
        "regions": rng.choice(['["north","south","east","west"]', '["north"]', '["south","east"]'], n),
    })


def write_table(uri: str, x: np.ndarray, attrs: pd.DataFrame):
    import lancedb

    edges = price_band_edges(attrs["price"])
    first = to_index_rows(attrs.iloc[:CHUNK], x[:CHUNK], price_edges=edges)

    def batches():
        yield from first.to_batches()
        for s in range(CHUNK, len(x), CHUNK):
            yield from to_index_rows(attrs.iloc[s:s + CHUNK], x[s:s + CHUNK], price_edges=edges).to_batches()

    reader = pa.RecordBatchReader.from_batches(first.schema, batches())
    return lancedb.connect(uri).create_table(TABLE_NAME, data=reader, mode="overwrite"), edges


def exact_reference(x: np.ndarray, qs: np.ndarray, k: int, mask: np.ndarray | None) -> list[set[int]]:
    """Brute force: numpy matmul + top-k (per 50 queries, to bound memory)."""
    out = []
    for s in range(0, len(qs), 50):
        scores = qs[s:s + 50] @ x.T
        if mask is not None:
            scores[:, ~mask] = -np.inf
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        out += [set(r.tolist()) for r in top]
    return out


def exact_one(x: np.ndarray, q: np.ndarray, k: int, mask: np.ndarray | None) -> np.ndarray:
    scores = x @ q
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    top = np.argpartition(-scores, k - 1)[:k]
    return top[np.argsort(-scores[top])]


def interleaved_ms(fn, ref, qs: np.ndarray, block: int = 20, warmup: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Latency of `fn` and of the reference `ref` on the same queries, alternating in blocks of
    `block` queries: both see the same drifting load of a shared machine, and neither runs
    right after the other's cache sweep (an exact query streams the whole matrix) or in its
    BLAS threads' spin-down, except at block starts."""
    for q in qs[:warmup]:
        fn(q), ref(q)
    out = np.empty((len(qs), 2))
    for s in range(0, len(qs), block):
        for j, f in enumerate((fn, ref)):
            for i in range(s, min(s + block, len(qs))):
                t0 = time.perf_counter()
                f(qs[i])
                out[i, j] = (time.perf_counter() - t0) * 1000
    return out[:, 0], out[:, 1]


def measure(n: int, dim: int, n_queries: int, index_types: list[str], data: str, k: int = 100) -> None:
    rng = np.random.default_rng(0)
    x = catalogue(n, dim, data, rng)
    attrs = attributes(n, rng)
    mask = (attrs["index_group_name"].to_numpy() == "Ladieswear") & (attrs["stock"].to_numpy() > 0)
    qs = probe_queries(x, n_queries, seed=12345)  # not the build's calibration draws (seed 0)
    with tempfile.TemporaryDirectory(prefix="rayrec-ann-") as tmp:
        t0 = time.time()
        tbl, edges = write_table(tmp, x, attrs)
        write_s = time.time() - t0
        t0 = time.time()
        create_attribute_indexes(tbl)
        attr_s = time.time() - t0
        refs = {False: exact_reference(x, qs, k, None), True: exact_reference(x, qs, k, mask)}
        common = dict(items=n, dim=dim, data=data, k=k, write_s=round(write_s, 2), attribute_index_s=round(attr_s, 2))
        for i, kind in enumerate(index_types):
            plan = choose_ann(n, dim, kind)  # type: ignore[arg-type]
            if plan is None:
                print(f"# {n} items: below the ANN size, exact search only", file=sys.stderr)
                rec = None
                ann_s = 0.0
            else:
                t0 = time.time()
                rec = create_vector_index(tbl, VECTOR_COLUMN, plan)
                ann_s = time.time() - t0
            engine = choose_engine(n, dim, rec)
            record_build(tmp, BuildRecord(version=int(tbl.version), n_rows=n, dim=dim, engine=engine, ann=rec,
                                          price_edges=edges, built_at="bench", seconds=ann_s, rows_per_s=0.0))
            engines = (["ann"] if rec is not None else []) + (["exact"] if i == 0 else [])
            for eng in engines:
                index = ItemIndex(tmp, TABLE_NAME, int(tbl.version), engine=eng)  # type: ignore[arg-type]
                for filtered in (False, True):
                    where = FILTER if filtered else None
                    got = [index.search(q, k, where)[0] for q in qs]
                    recall = float(np.mean([len({int(a) for a in g} & r) / k for g, r in zip(got, refs[filtered],
                                                                                            strict=True)]))
                    lat, ref_lat = interleaved_ms(lambda q, where=where, index=index: index.search(q, k, where),
                                                  lambda q, f=filtered: exact_one(x, q, k, mask if f else None), qs)
                    ex = float(np.median(ref_lat))
                    row = dict(common, filtered=filtered,
                               index=(f"{rec.index_type}" if eng == "ann" and rec else "exact"),
                               build_s=round(write_s + attr_s + (ann_s if eng == "ann" else 0.0), 2),
                               ann_index_s=round(ann_s, 2) if eng == "ann" else None,
                               p50_ms=float(np.median(lat)), p99_ms=float(np.percentile(lat, 99)),
                               recall_at_100=recall, exact_p50_ms=ex, exact_p99_ms=float(np.percentile(ref_lat, 99)),
                               speedup_vs_exact=ex / float(np.median(lat)), serving_engine=engine)
                    if eng == "ann" and rec:
                        row.update(num_partitions=rec.num_partitions, nprobes=rec.nprobes,
                                   refine_factor=rec.refine_factor, calibrated_recall=rec.recall_at_100)
                    emit("ann", **row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, nargs="+", default=[105_542])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--index", nargs="+", default=["auto"], choices=["auto", "IVF_SQ", "IVF_PQ", "IVF_HNSW_SQ"])
    ap.add_argument("--data", default="clustered", choices=["clustered", "random"])
    a = ap.parse_args()
    json_lines_only()
    for n in a.items:
        measure(n, a.dim, a.queries, a.index, a.data)


if __name__ == "__main__":
    main()
