"""The item index: Ray Data embeds every article into a versioned LanceDB table.

Build (`build_index`): Ray Data reads the articles feature group, runs the item tower (and
all-MiniLM-L6-v2 over the article text) in one `map_batches` actor pool, and streams the rows
into the `articles` table in one commit. Then it adds the indexes: scalar indexes on the
filter attributes, full-text (BM25) indexes on prod_name and detail_desc, and, from
ANN_MIN_ROWS rows on, an ANN index whose parameters come from the table size and whose
nprobes / refine factor are calibrated against exact search to TARGET_RECALL. The last
version written is recorded in `builds.json` beside the table: only recorded versions can be
promoted, so no reader ever pins a version whose indexes are still being built.

Read (`ItemIndex`): a reader checks out one table version (immutable), so a new build or a
promote never changes what it returns. Its engine is exact (numpy over the version's vectors,
held in memory) or ANN (Lance IVF); the build measures both and records the one serving
should use (`choose_engine`).
`LiveItemIndex` follows the manifest for serving: promote and rollback swap the pinned
version atomically while queries keep running on the version they started with.
"""
from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from common import locations
from common.artifacts import IndexRef, read_manifest, write_manifest
from common.workdir import Workdir

TABLE_NAME = "articles"
VECTOR_COLUMN = "vector"
TEXT_VECTOR_COLUMN = "text_vector"
FTS_COLUMNS = ("prod_name", "detail_desc")
BUILDS_FILE = "builds.json"
BUILDS_FORMAT = 1

# Below this many rows no ANN index is built: a flat scan is as fast and exact.
ANN_MIN_ROWS = 50_000
EXACT_SEARCH_MAX_ROWS = ANN_MIN_ROWS  # the name callers knew
# The exact engine holds the vectors in memory; above this it is never chosen.
EXACT_ENGINE_MAX_BYTES = 512 * 2**20
SQ_MAX_BYTES = 2**30  # IVF_SQ codes (1 byte a dimension) up to 1 GiB, then IVF_PQ
TEXT_CACHE_SIZE = 4096  # query texts whose MiniLM vector serving keeps (ItemIndex._text_vector)
POOL_CACHE_SIZE = 1024  # query texts whose fused search pool serving keeps (ItemIndex._text_pool)
TARGET_RECALL = 0.95
CALIBRATION_QUERIES = 100
CALIBRATION_K = 100
CALIBRATION_MARGIN = 0.01  # probe queries are a guess at serving's: aim a little higher
MASK_CACHE_SIZE = 128  # filter clauses whose row mask the exact engine keeps (ItemIndex._mask)
PRICE_BANDS = 5
RRF_K = 60

STRING_ATTRIBUTES = ("prod_name", "product_type_name", "product_group_name", "index_group_name",
                     "garment_group_name", "colour_group_name", "department_name", "detail_desc")
# Optional article columns and what a row gets without them (tests and benchmarks build
# tables from minimal frames); every other column of item_schema is required.
OPTIONAL_DEFAULTS: dict[str, Any] = {"product_group_name": "", "department_name": "", "detail_desc": "",
                                     "regions": None}
BITMAP_COLUMNS = ("index_group_name", "garment_group_name", "product_type_name", "price_band", "in_stock")
ATTRIBUTE_COLUMNS = [*STRING_ATTRIBUTES, "price", "price_band", "in_stock", "min_age", "regions"]

AnnType = Literal["IVF_SQ", "IVF_PQ", "IVF_HNSW_SQ"]
Engine = Literal["exact", "ann"]


@dataclass(frozen=True)
class IndexColumns:
    """The item table's attribute columns: H&M's by default, a dataset config's via `index_columns`.

    strings: attribute columns kept for prefilters and display; bitmap: those given a bitmap
    index; fts: full-text (BM25) columns; text: the columns whose MiniLM vector is stored (None:
    H&M's `article_text`; empty: no text vector)."""

    strings: tuple[str, ...] = STRING_ATTRIBUTES
    bitmap: tuple[str, ...] = BITMAP_COLUMNS
    fts: tuple[str, ...] = FTS_COLUMNS
    text: tuple[str, ...] | None = None

    @property
    def is_hm(self) -> bool:
        return self == HM_INDEX

    def text_of(self, frame: pd.DataFrame) -> list[str]:
        """The text embedded per article."""
        from training.text_embed import article_text

        if self.text is None:
            return article_text(frame)
        parts = [frame[c].fillna("").astype(str).str.strip() for c in self.text]
        return [". ".join(x for x in row if x) for row in zip(*parts, strict=True)] if parts else [""] * len(frame)

    def text_inputs(self) -> list[str]:
        from training.text_embed import TEXT_FIELDS

        return list(TEXT_FIELDS) if self.text is None else list(self.text)


HM_INDEX = IndexColumns()


def index_columns(roles: Any = None) -> IndexColumns:
    """The item table for a dataset's roles (`feature_store.dataset.Roles`; None or H&M: HM_INDEX)."""
    if roles is None or roles.is_hm:
        return HM_INDEX
    strings = tuple(dict.fromkeys([*roles.item_categorical, *roles.item_text]))
    bitmap = (roles.type_column,) if roles.type_column else ()
    return IndexColumns(strings, (*bitmap, "price_band", "in_stock"), tuple(roles.item_text), tuple(roles.item_text))


# ---------------------------------------------------------------------------------------------
# The table, declared once


def item_schema(dim: int, text_dim: int | None = None, strings: Sequence[str] = STRING_ATTRIBUTES) -> pa.Schema:
    """The LanceDB item table: id, attributes for prefilters and display, the item-tower vector
    and (when built with text) the MiniLM text vector.

    regions: where the article is sold; null when the data has no regional table (sold
    everywhere). in_stock: stock > 0, or stock unknown. price_band: 0 (cheapest) ..
    PRICE_BANDS-1 by price quantiles of the build. min_age: 0 when unrestricted.
    """
    fields = [pa.field("article_id", pa.string(), nullable=False)]
    fields += [pa.field(c, pa.string()) for c in strings]
    fields += [
        pa.field("price", pa.float64()),
        pa.field("price_band", pa.int32()),
        pa.field("in_stock", pa.bool_()),
        pa.field("min_age", pa.int32()),
        pa.field("regions", pa.list_(pa.string())),
        pa.field(VECTOR_COLUMN, pa.list_(pa.float32(), dim)),
    ]
    if text_dim:
        fields.append(pa.field(TEXT_VECTOR_COLUMN, pa.list_(pa.float32(), text_dim)))
    return pa.schema(fields)


def price_band_edges(prices: Sequence[float] | np.ndarray, bands: int = PRICE_BANDS) -> list[float]:
    """Inner quantile edges splitting the prices into `bands` bands."""
    p = pd.to_numeric(pd.Series(prices), errors="coerce").dropna().to_numpy(dtype=float)
    if len(p) == 0:
        return []
    return [float(x) for x in np.quantile(p, np.linspace(0, 1, bands + 1)[1:-1])]


def _regions(value: Any) -> list[str] | None:
    """A regions cell from the feature group (JSON text or a list) as a list, None if unknown."""
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):  # None, NaN, pd.NA
        return None
    if isinstance(value, str):
        value = json.loads(value) if value.strip() else None
        if value is None:
            return None
    return [str(r) for r in value]


def to_index_rows(batch: pd.DataFrame, vecs: np.ndarray, text_vecs: np.ndarray | None = None,
                  price_edges: Sequence[float] | None = None, columns: IndexColumns = HM_INDEX) -> pa.Table:
    """Rows of the item table for a frame of articles (articles feature group columns)."""
    required = ["article_id", "prod_name", "product_type_name", "index_group_name", "garment_group_name",
                "colour_group_name"] if columns.is_hm else ["article_id", *columns.strings]
    missing = [c for c in (*required, "price", "stock", "min_age") if c not in batch]
    if missing:
        raise ValueError(f"articles frame lacks column(s) {missing} needed by the item index")
    if len(vecs) != len(batch) or (text_vecs is not None and len(text_vecs) != len(batch)):
        raise ValueError(f"{len(batch)} articles but {len(vecs)} vectors")
    frame = batch.reset_index(drop=True)
    for col, default in OPTIONAL_DEFAULTS.items():
        if col not in frame and (col in columns.strings or col == "regions"):
            frame[col] = [default] * len(frame)
    price = pd.to_numeric(frame["price"], errors="coerce").astype("float64")
    edges = list(price_edges) if price_edges is not None else price_band_edges(price)
    stock = pd.to_numeric(frame["stock"], errors="coerce")
    cols: dict[str, pa.Array] = {"article_id": pa.array(frame["article_id"].astype(str).tolist(), pa.string())}
    for c in columns.strings:
        cols[c] = pa.array(frame[c].fillna("").astype(str).tolist(), pa.string())
    cols["price"] = pa.array(price.tolist(), pa.float64())
    cols["price_band"] = pa.array(np.searchsorted(np.asarray(edges, float), price.fillna(0).to_numpy(),
                                                  side="right").astype(np.int32), pa.int32())
    cols["in_stock"] = pa.array((stock.isna() | (stock > 0)).tolist(), pa.bool_())
    cols["min_age"] = pa.array(pd.to_numeric(frame["min_age"]).fillna(0).astype("int32").tolist(), pa.int32())
    cols["regions"] = pa.array([_regions(v) for v in frame["regions"]], pa.list_(pa.string()))
    vecs = np.ascontiguousarray(vecs, dtype=np.float32)
    cols[VECTOR_COLUMN] = pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel(), pa.float32()), vecs.shape[1])
    text_dim = None
    if text_vecs is not None:
        tv = np.ascontiguousarray(text_vecs, dtype=np.float32)
        cols[TEXT_VECTOR_COLUMN] = pa.FixedSizeListArray.from_arrays(pa.array(tv.ravel(), pa.float32()), tv.shape[1])
        text_dim = tv.shape[1]
    return pa.table(cols, schema=item_schema(vecs.shape[1], text_dim, columns.strings))


# ---------------------------------------------------------------------------------------------
# Filters


def sql_str(value: str) -> str:
    """A SQL string literal."""
    return "'" + str(value).replace("'", "''") + "'"


@dataclass(frozen=True)
class ItemFilter:
    """A typed prefilter over the item table's attributes; `where()` gives the SQL."""

    index_groups: Sequence[str] = ()
    garment_groups: Sequence[str] = ()
    product_types: Sequence[str] = ()
    price_bands: Sequence[int] = ()
    in_stock_only: bool = False
    region: str | None = None          # sold in this region (articles with unknown regions pass)
    customer_age: float | None = None  # drop articles whose min_age is above it
    exclude_ids: Sequence[str] = ()

    def where(self) -> str | None:
        parts = []
        for col, values in (("index_group_name", self.index_groups), ("garment_group_name", self.garment_groups),
                            ("product_type_name", self.product_types)):
            if values:
                parts.append(f"{col} IN ({', '.join(sql_str(v) for v in values)})")
        if self.price_bands:
            parts.append(f"price_band IN ({', '.join(str(int(b)) for b in self.price_bands)})")
        if self.in_stock_only:
            parts.append("in_stock")
        if self.region is not None:
            parts.append(f"(regions IS NULL OR array_has(regions, {sql_str(self.region)}))")
        if self.customer_age is not None:
            parts.append(f"min_age <= {int(self.customer_age)}")
        if self.exclude_ids:
            parts.append(f"article_id NOT IN ({', '.join(sql_str(a) for a in self.exclude_ids)})")
        return " AND ".join(parts) or None


def _where(where: str | ItemFilter | None) -> str | None:
    return where.where() if isinstance(where, ItemFilter) else (where or None)


def _normalised(query_text: str) -> str:
    """The text with its whitespace collapsed, which both searches and the text model tokenise
    alike: the key of every search cache."""
    return " ".join(query_text.split())


def _pool_key(query_text: str, candidates: int, clause: str | None, rrf_k: int) -> tuple[str, int, str | None, int]:
    """A fused pool's cache key."""
    return _normalised(query_text), candidates, clause, rrf_k


# ---------------------------------------------------------------------------------------------
# ANN plan: index type and parameters from the table size, query knobs calibrated


@dataclass(frozen=True)
class AnnPlan:
    index_type: AnnType
    num_partitions: int
    num_sub_vectors: int | None = None
    nprobes: int = 20
    refine_factor: int | None = None
    ef: int | None = None

    def config(self, distance: str = "cosine") -> Any:
        from lancedb.index import HnswSq, IvfPq, IvfSq

        if self.index_type == "IVF_SQ":
            return IvfSq(distance_type=distance, num_partitions=self.num_partitions)
        if self.index_type == "IVF_PQ":
            return IvfPq(distance_type=distance, num_partitions=self.num_partitions,
                         num_sub_vectors=self.num_sub_vectors)
        return HnswSq(distance_type=distance, num_partitions=self.num_partitions)


def choose_ann(n_rows: int, dim: int, index_type: AnnType | Literal["auto"] = "auto") -> AnnPlan | None:
    """The ANN index for a table of `n_rows` vectors of size `dim`, None when exact search pays.

    auto: IVF_SQ while its 8-bit codes (n x dim bytes) stay under SQ_MAX_BYTES: SQ loses
    almost no recall, so a refinement pass (a random read of the full vectors, 4-6 ms a query
    in Lance 14 on 2 cores) buys nothing. Beyond that, IVF_PQ with dim/8 sub-vectors (8x
    smaller codes), whose coarse distances calibration may refine. The partition count grows
    with the table (about 1,000 rows a partition). IVF_HNSW_SQ only on request: at 1M x 64
    it took 411 s to build on 2 cores and was slower than IVF_SQ at equal recall.
    """
    if n_rows < ANN_MIN_ROWS:
        return None
    parts = int(2 ** round(math.log2(max(n_rows / 1000, 16))))
    parts = min(max(parts, 16), 4096)
    kind = index_type if index_type != "auto" else ("IVF_SQ" if n_rows * dim <= SQ_MAX_BYTES else "IVF_PQ")
    if kind == "IVF_PQ":
        sub = next(s for s in (dim // 8, dim // 4, dim // 2, dim) if s and dim % s == 0)
        return AnnPlan("IVF_PQ", parts, num_sub_vectors=sub, refine_factor=None)
    if kind == "IVF_HNSW_SQ":
        return AnnPlan("IVF_HNSW_SQ", max(1, n_rows // 100_000), nprobes=1, ef=150)
    return AnnPlan("IVF_SQ", parts)


def _nprobes_ladder(parts: int) -> list[int]:
    steps = [4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
    return [s for s in steps if s < parts] + [parts]


def _param_ladder(plan: AnnPlan) -> list[AnnPlan]:
    """Query settings from cheap to expensive; calibration keeps the first that reaches the target."""
    from dataclasses import replace

    if plan.index_type == "IVF_HNSW_SQ":
        return [replace(plan, nprobes=p, ef=ef) for p in _nprobes_ladder(plan.num_partitions)
                for ef in (150, 300, 600)]
    out = [replace(plan, nprobes=p, refine_factor=None) for p in _nprobes_ladder(plan.num_partitions)]
    if plan.index_type == "IVF_PQ":  # PQ codes are coarse: refinement on full vectors buys recall
        out += [replace(plan, nprobes=p, refine_factor=rf) for rf in (2, 5)
                for p in _nprobes_ladder(plan.num_partitions)]
    return out


def _nearest(plan_or_none: AnnPlan | None, column: str, q: np.ndarray, k: int, *, nprobes: int | None = None,
             refine_factor: int | None = None, ef: int | None = None, use_index: bool = True) -> dict[str, Any]:
    d: dict[str, Any] = {"column": column, "q": q, "k": k, "metric": "cosine", "use_index": use_index}
    p = plan_or_none
    nprobes = nprobes if nprobes is not None else (p.nprobes if p else None)
    refine_factor = refine_factor if refine_factor is not None else (p.refine_factor if p else None)
    ef = ef if ef is not None else (p.ef if p else None)
    if nprobes:
        d["nprobes"] = int(nprobes)
    if refine_factor:
        d["refine_factor"] = int(refine_factor)
    if ef:
        d["ef"] = int(ef)
    return d


def filtered_nprobes(nprobes: int, partitions: int, selectivity: float) -> int:
    """Probes for a prefiltered query: a filter keeping a share s of the rows pushes the top-k
    out over more partitions, so probe 1/sqrt(s) times as many (capped at all of them)."""
    if selectivity <= 0:
        return nprobes
    return int(min(partitions, math.ceil(nprobes / math.sqrt(min(selectivity, 1.0)))))


def _exact_topk(mat: np.ndarray, q: np.ndarray, k: int, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Positions and inner products of the top-k rows of `mat` for one query, best first."""
    scores = mat @ q
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    part = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    order = part[np.argsort(-scores[part], kind="stable")]
    order = order[np.isfinite(scores[order])]
    return order, scores[order]


@dataclass(frozen=True)
class Calibration:
    plan: AnnPlan
    recall: float
    ann_p50_ms: float
    exact_p50_ms: float


def probe_queries(mat: np.ndarray, n: int, seed: int = 0, noise: float = 0.5) -> np.ndarray:
    """Customer-like query vectors: item vectors moved off the catalogue by Gaussian noise of
    norm ~`noise` (cosine ~0.9 to the item), normalised. Customers sit near what they buy but
    on no item; the farther a query is from every item, the more partitions its top-k spans."""
    rng = np.random.default_rng(seed)
    q = mat[rng.choice(len(mat), size=min(n, len(mat)), replace=False)]
    q = q + rng.normal(0, noise / math.sqrt(mat.shape[1]), q.shape).astype(np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def calibrate(ds: Any, column: str, mat: np.ndarray, rowids: np.ndarray, plan: AnnPlan,
              target: float = TARGET_RECALL, n_queries: int = CALIBRATION_QUERIES, k: int = CALIBRATION_K,
              time_queries: int = 50) -> Calibration:
    """The cheapest query settings of `plan` whose recall@k against exact search reaches `target`
    plus CALIBRATION_MARGIN on probe queries (else the best tried), with the p50 latency of one
    query for ANN and for the exact engine."""
    goal = min(0.995, target + CALIBRATION_MARGIN)
    qs = probe_queries(mat, n_queries)
    k = min(k, len(mat))
    truth = [set(rowids[_exact_topk(mat, q, k)[0]].tolist()) for q in qs]
    best: tuple[float, AnnPlan] | None = None
    for cand in _param_ladder(plan):
        got = ds.to_table(columns=["_distance"], nearest=_nearest(cand, column, qs, k), with_row_id=True)
        qi, rid = got["query_index"].to_numpy(), got["_rowid"].to_numpy()
        recall = float(np.mean([len(truth[i] & set(rid[qi == i].tolist())) / k for i in range(len(qs))]))
        if best is None or recall > best[0] + 1e-9:
            best = (recall, cand)
        if recall >= goal:
            break
    assert best is not None
    recall, chosen = best
    ann, exact = _median_ms(
        lambda q: ds.to_table(columns=["_distance"], nearest=_nearest(chosen, column, q, k), with_row_id=True),
        lambda q: _exact_topk(mat, q, k), qs[:time_queries])
    return Calibration(chosen, recall, ann, exact)


def _median_ms(fn: Any, ref: Any, queries: np.ndarray, block: int = 10, warmup: int = 3) -> tuple[float, float]:
    """Median latency of `fn` and `ref`, alternating in blocks of queries (both see the same load)."""
    for q in queries[:warmup]:
        fn(q), ref(q)
    lat = np.empty((len(queries), 2))
    for s in range(0, len(queries), block):
        for j, f in enumerate((fn, ref)):
            for i in range(s, min(s + block, len(queries))):
                t0 = time.perf_counter()
                f(queries[i])
                lat[i, j] = (time.perf_counter() - t0) * 1000
    return float(np.median(lat[:, 0])), float(np.median(lat[:, 1]))


def choose_engine(n_rows: int, dim: int, ann: AnnRecord | None) -> Engine:
    """Exact unless the ANN index is measured faster: exact holds the vectors in memory (up to
    EXACT_ENGINE_MAX_BYTES) and wins whenever the calibrated probes scan a quarter of the table."""
    if ann is None:
        return "exact"
    if n_rows * dim * 4 > EXACT_ENGINE_MAX_BYTES:
        return "ann"
    if ann.nprobes * 4 >= ann.num_partitions or ann.exact_p50_ms <= ann.ann_p50_ms:
        return "exact"
    return "ann"


# ---------------------------------------------------------------------------------------------
# Build records (builds.json beside the table)


class AnnRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    column: str
    index_type: str
    num_partitions: int
    num_sub_vectors: int | None = None
    nprobes: int
    refine_factor: int | None = None
    ef: int | None = None
    recall_at_100: float
    ann_p50_ms: float
    exact_p50_ms: float

    def plan(self) -> AnnPlan:
        return AnnPlan(self.index_type, self.num_partitions, self.num_sub_vectors, self.nprobes,  # type: ignore[arg-type]
                       self.refine_factor, self.ef)


class BuildRecord(BaseModel):
    """One complete build: the table version a manifest may pin, and how it was made."""

    model_config = ConfigDict(extra="forbid")
    version: int
    table: str = TABLE_NAME
    n_rows: int
    dim: int
    text_dim: int | None = None
    engine: Engine
    ann: AnnRecord | None = None
    text_ann: AnnRecord | None = None
    price_edges: list[float] = []
    fts_columns: list[str] = list(FTS_COLUMNS)
    built_at: str
    seconds: float
    rows_per_s: float
    item_tower_sha256: str | None = None


class BuildLog(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: int = BUILDS_FORMAT
    builds: list[BuildRecord] = []


def builds_path(uri: str | Path) -> str:
    """The build log next to the LanceDB tables (a local file or an object in the same bucket)."""
    return locations.join(uri, BUILDS_FILE)


def load_builds(uri: str | Path) -> BuildLog:
    p = builds_path(uri)
    text = locations.read_text(p)
    if text is None:
        return BuildLog()
    log = BuildLog.model_validate_json(text)
    if log.format != BUILDS_FORMAT:
        raise ValueError(f"{p}: unsupported builds format {log.format}")
    return log


def find_build(uri: str | Path, version: int, table: str = TABLE_NAME) -> BuildRecord | None:
    return next((b for b in load_builds(uri).builds if b.version == version and b.table == table), None)


def record_build(uri: str | Path, rec: BuildRecord) -> None:
    log = load_builds(uri)
    log.builds = [b for b in log.builds if not (b.version == rec.version and b.table == rec.table)] + [rec]
    log.builds.sort(key=lambda b: (b.table, b.version))
    locations.write_text(builds_path(uri), log.model_dump_json(indent=2) + "\n")


def file_sha256(path: str | Path) -> str | None:
    p = Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None


# ---------------------------------------------------------------------------------------------
# Build


class ItemEmbedder:
    """Callable for Ray Data `map_batches`: loads the item tower once per actor."""

    def __init__(self, model_dir: str, price_edges: Sequence[float] | None = None,
                 columns: IndexColumns = HM_INDEX):
        import torch

        from training.two_tower.model import load_item_tower

        torch.set_num_threads(1)
        self.tower, self.vocab = load_item_tower(Path(model_dir))
        self.price_edges = list(price_edges) if price_edges is not None else None
        self.columns = columns

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        from training.features import encode_items

        vecs = self.tower.embed(encode_items(self.vocab, batch)).astype(np.float32)
        return to_index_rows(batch, vecs, price_edges=self.price_edges, columns=self.columns)


class TextVectorizer:
    """Callable for Ray Data `map_batches`: adds the MiniLM vector of each article's text."""

    def __init__(self, threads: int = 2, columns: IndexColumns = HM_INDEX):
        from training.text_embed import TextEmbedder

        self.embedder = TextEmbedder(threads=threads)
        self.columns = columns

    def __call__(self, batch: pa.Table) -> pa.Table:
        frame = batch.select(self.columns.text_inputs()).to_pandas()
        tv = self.embedder.encode(self.columns.text_of(frame))
        col = pa.FixedSizeListArray.from_arrays(pa.array(tv.ravel(), pa.float32()), tv.shape[1])
        return batch.append_column(pa.field(TEXT_VECTOR_COLUMN, col.type), col)


class ItemRowBuilder:
    """Callable for Ray Data `map_batches`: the index rows of a batch of articles, item vector and
    (with `text`) MiniLM vector, in one actor. One actor instead of one per model: each actor is a
    process that imports torch and loads its model (about 5 s on 2 cores), which for a small catalogue
    costs more than the embedding itself."""

    def __init__(self, model_dir: str, price_edges: Sequence[float] | None = None,
                 columns: IndexColumns = HM_INDEX, text: bool = True, threads: int = 2):
        self.items = ItemEmbedder(model_dir, price_edges, columns)
        self.text = TextVectorizer(threads, columns) if text else None

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        rows = self.items(batch)
        return self.text(rows) if self.text is not None else rows


@dataclass(frozen=True)
class IndexBuild:
    uri: str
    table: str
    version: int
    n_rows: int
    dim: int
    seconds: float
    engine: Engine = "exact"
    record: BuildRecord | None = field(default=None, compare=False)


def build_index(articles_path: Path, model_dir: Path, uri: str | Path, progress: bool = True, *, text: bool = True,
                ann: AnnType | Literal["auto", "none"] = "auto", target_recall: float = TARGET_RECALL,
                batch_size: int = 2048, columns: IndexColumns = HM_INDEX) -> IndexBuild:
    """Embed the articles (offline feature group Parquet) with Ray Data into a new table version,
    index it, and record the build. Serving is not switched: promote the returned version.
    `columns`: the table's attributes (a dataset without text columns gets no text vector)."""
    import lancedb
    import pyarrow.parquet as pq
    import ray

    t0 = time.time()
    say = (lambda msg: print(f"[index] {msg}", flush=True)) if progress else (lambda msg: None)
    price_edges = price_band_edges(pq.read_table(str(articles_path), columns=["price"])["price"].to_numpy())
    ds = ray.data.read_parquet(str(articles_path))
    # Fractional CPUs: on a 2-CPU node a 1-CPU actor starves Ray Data's read tasks (STACK.md).
    text = text and columns.text != ()
    ds = ds.map_batches(ItemRowBuilder, fn_constructor_args=(str(model_dir), price_edges, columns, text),
                        # MiniLM takes far longer per row than the item tower: smaller batches keep progress moving
                        batch_format="pandas", batch_size=min(batch_size, 512) if text else batch_size,
                        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5)
    counter = {"n": 0}
    batches = _stream(ds, counter, t0, say)
    first = next(batches, None)
    if first is None:
        raise ValueError(f"no articles to index in {articles_path}")
    schema = first.schema
    reader = pa.RecordBatchReader.from_batches(schema, _chain(first, batches))
    tbl = lancedb.connect(str(uri)).create_table(TABLE_NAME, data=reader, mode="overwrite")  # one commit
    n = counter["n"]
    t_embed = time.time() - t0
    say(f"{n} articles written in {t_embed:.1f}s ({n / max(t_embed, 1e-9):.0f} rows/s); indexing")
    dim = schema.field(VECTOR_COLUMN).type.list_size
    text_dim = schema.field(TEXT_VECTOR_COLUMN).type.list_size if TEXT_VECTOR_COLUMN in schema.names else None
    create_attribute_indexes(tbl, columns)
    ann_rec = text_rec = None
    plan = None if ann == "none" else choose_ann(n, dim, ann)
    if plan is not None:
        ann_rec = create_vector_index(tbl, VECTOR_COLUMN, plan, target_recall)
        say(f"{plan.index_type} on {VECTOR_COLUMN}: nprobes {ann_rec.nprobes}, refine {ann_rec.refine_factor}, "
            f"recall@100 {ann_rec.recall_at_100:.3f}, p50 {ann_rec.ann_p50_ms:.2f} ms (exact {ann_rec.exact_p50_ms:.2f} ms)")
    if text_dim and ann != "none":
        tplan = choose_ann(n, text_dim, "auto")
        if tplan is not None:
            text_rec = create_vector_index(tbl, TEXT_VECTOR_COLUMN, tplan, target_recall)
    engine = choose_engine(n, int(dim), ann_rec)
    secs = time.time() - t0
    rec = BuildRecord(version=int(tbl.version), n_rows=n, dim=int(dim), text_dim=text_dim, engine=engine,
                      ann=ann_rec, text_ann=text_rec, price_edges=price_edges, fts_columns=list(columns.fts),
                      built_at=datetime.now(UTC).isoformat(timespec="seconds"), seconds=round(secs, 2),
                      rows_per_s=round(n / max(t_embed, 1e-9), 1),
                      item_tower_sha256=file_sha256(Path(model_dir) / _item_tower_file()))
    record_build(uri, rec)
    say(f"version {rec.version}: {n} rows, dim {dim}, engine {engine}, {secs:.1f}s")
    return IndexBuild(str(uri), TABLE_NAME, rec.version, n, int(dim), secs, engine, rec)


def _item_tower_file() -> str:
    from training.two_tower.model import ITEM_TOWER_FILE

    return ITEM_TOWER_FILE


def _stream(ds: Any, counter: dict[str, int], t0: float, say: Any) -> Iterator[pa.RecordBatch]:
    last = 0.0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=4096):
        counter["n"] += batch.num_rows
        now = time.time()
        if now - last >= 2.0:
            say(f"{counter['n']} articles embedded ({counter['n'] / max(now - t0, 1e-9):.0f} rows/s)")
            last = now
        yield from batch.to_batches()


def _chain(first: pa.RecordBatch, rest: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    yield first
    for b in rest:
        yield b if b.schema == first.schema else b.cast(first.schema)


def create_attribute_indexes(tbl: Any, columns: IndexColumns = HM_INDEX) -> None:
    """Scalar indexes for prefilters and id lookups, and BM25 full-text indexes."""
    from lancedb.index import FTS, Bitmap, BTree, LabelList

    tbl.create_index("article_id", config=BTree())
    for col in columns.bitmap:
        tbl.create_index(col, config=Bitmap())
    tbl.create_index("min_age", config=BTree())
    tbl.create_index("regions", config=LabelList())
    for col in columns.fts:
        tbl.create_index(col, config=FTS())


def create_vector_index(tbl: Any, column: str, plan: AnnPlan, target_recall: float = TARGET_RECALL) -> AnnRecord:
    """Build the ANN index of `plan` on `column`, then calibrate its query settings."""
    tbl.create_index(column, config=plan.config())
    ds = tbl.to_lance()
    t = ds.to_table(columns=[column], with_row_id=True)
    mat = _matrix(t[column])
    cal = calibrate(ds, column, mat, t["_rowid"].to_numpy(), plan, target_recall)
    p = cal.plan
    return AnnRecord(column=column, index_type=p.index_type, num_partitions=p.num_partitions,
                     num_sub_vectors=p.num_sub_vectors, nprobes=p.nprobes, refine_factor=p.refine_factor, ef=p.ef,
                     recall_at_100=round(cal.recall, 4), ann_p50_ms=round(cal.ann_p50_ms, 3),
                     exact_p50_ms=round(cal.exact_p50_ms, 3))


def _matrix(col: pa.ChunkedArray | pa.Array, normalise: bool = True) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    dim = arr.type.list_size
    mat = arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), dim).astype(np.float32, copy=False)
    if normalise:
        norms = np.linalg.norm(mat, axis=1, keepdims=True)
        mat = mat / np.where(norms > 0, norms, 1.0)
    return np.ascontiguousarray(mat, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Read


class TextEncoder(Protocol):
    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


K = TypeVar("K")
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """A thread-safe least-recently-used map of at most `size` entries that counts hits and misses.

    `get(key, compute)` computes a missing value outside the lock, so a slow computation (a LanceDB
    query, a transformer pass) never blocks readers of other keys; two threads missing the same key
    at once both compute it, which is harmless for the pure functions cached here."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.hits = self.misses = 0
        self._data: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        """Whether `key` is held now (not counted as a hit or a miss; the answer may be stale by the
        time the caller acts on it, which only costs a computation)."""
        with self._lock:
            return key in self._data

    def get(self, key: K, compute: Callable[[], V]) -> V:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
        value = compute()
        with self._lock:
            self._data[key] = value
            while len(self._data) > self.size:
                self._data.popitem(last=False)
            self.misses += 1
        return value


class ItemIndex:
    """Read side used by serving and batch jobs, on one pinned (immutable) table version.

    engine: "auto" (what the build measured faster; without a build record, ANN when the
    version has a vector index), "exact" or "ann". nprobes / refine_factor / ef override the
    calibrated query settings for every query; `search` also takes them per query.
    """

    def __init__(self, uri: str, table: str, version: int, *, engine: Engine | Literal["auto"] = "auto",
                 nprobes: int | None = None, refine_factor: int | None = None, ef: int | None = None,
                 text_encoder: TextEncoder | None = None):
        import lancedb

        self.uri, self.table_name, self.version = str(uri), table, int(version)
        self.table = lancedb.connect(self.uri).open_table(table)
        self.table.checkout(self.version)
        self._ds = self.table.to_lance()
        self.record = find_build(self.uri, self.version, table)
        indexed = {c for i in self.table.list_indices() for c in i.columns}
        self.has_ann = VECTOR_COLUMN in indexed
        self._text_indexed = TEXT_VECTOR_COLUMN in indexed
        ann_rec = self.record.ann if self.record else None
        self._plan = ann_rec.plan() if ann_rec else None
        self._text_plan = self.record.text_ann.plan() if self.record and self.record.text_ann else None
        self._overrides = {"nprobes": nprobes, "refine_factor": refine_factor, "ef": ef}
        if engine == "auto":
            engine = self.record.engine if self.record else ("ann" if self.has_ann else "exact")
        if engine not in ("exact", "ann"):
            raise ValueError(f"engine must be 'auto', 'exact' or 'ann', not {engine!r}")
        self.engine: Engine = engine
        self._text_encoder = text_encoder
        self._text_cache: BoundedCache[str, np.ndarray] = BoundedCache(TEXT_CACHE_SIZE)
        self._pool_cache: BoundedCache[tuple[Any, ...], tuple[tuple[str, float], ...]] = \
            BoundedCache(POOL_CACHE_SIZE)
        self._masks: BoundedCache[str, np.ndarray] = BoundedCache(MASK_CACHE_SIZE)
        self._shares: BoundedCache[str, float] = BoundedCache(1024)
        self._pos: dict[str, int] | None = None
        self._mat: np.ndarray | None = None
        # Ids and row ids in memory for both engines: mapping ANN hits (row ids) to article ids
        # here is ~3 ms a query cheaper at 1M rows than Lance fetching the id column per query.
        cols = ["article_id", VECTOR_COLUMN] if self.engine == "exact" else ["article_id"]
        t = self._ds.to_table(columns=cols, with_row_id=True)
        self._ids: pa.Array = t["article_id"].combine_chunks()
        self._rowids: np.ndarray = t["_rowid"].to_numpy()
        self._by_rowid = np.argsort(self._rowids, kind="stable")
        self._sorted_rowids = self._rowids[self._by_rowid]
        if self.engine == "exact":
            self._mat = _matrix(t[VECTOR_COLUMN])

    def _id_list(self, pos: np.ndarray) -> list[str]:
        return self._ids.take(pa.array(np.asarray(pos, dtype=np.int64))).to_pylist()

    def _positions(self, rowids: np.ndarray) -> np.ndarray:
        """Row positions (in the id / vector arrays) of Lance row ids of this version."""
        return self._by_rowid[np.searchsorted(self._sorted_rowids, rowids)]

    # -- exact engine ---------------------------------------------------------------------------
    def _mask(self, where: str) -> np.ndarray:
        """Rows passing `where` on this version (immutable, so cached per clause)."""
        return self._masks.get(where, lambda: self._compute_mask(where))

    def _compute_mask(self, where: str) -> np.ndarray:
        rid = self._ds.to_table(columns=[], filter=where, with_row_id=True)["_rowid"].to_numpy()
        mask = np.zeros(len(self._rowids), dtype=bool)
        mask[self._positions(rid)] = True
        return mask

    # -- queries --------------------------------------------------------------------------------
    def search(self, vector: np.ndarray | Sequence[float], k: int, where: str | ItemFilter | None = None, *,
               nprobes: int | None = None, refine_factor: int | None = None,
               ef: int | None = None) -> tuple[list[str], np.ndarray]:
        """Article ids and cosine similarities of the top-k items passing `where`, best first."""
        q = _unit(vector)
        clause = _where(where)
        if self._mat is not None:
            pos, sims = _exact_topk(self._mat, q, k, self._mask(clause) if clause else None)
            return self._id_list(pos), sims.astype(np.float32)
        return self._ann(VECTOR_COLUMN, self._plan, q, k, clause, nprobes=nprobes, refine_factor=refine_factor,
                         ef=ef)

    def search_batch(self, vectors: np.ndarray, k: int, where: str | ItemFilter | None = None
                     ) -> tuple[list[list[str]], list[np.ndarray]]:
        """`search` for many query vectors at once (batch jobs)."""
        qs = np.asarray(vectors, dtype=np.float32)
        qs = qs / np.maximum(np.linalg.norm(qs, axis=1, keepdims=True), 1e-12)
        clause = _where(where)
        if self._mat is not None:
            mask = self._mask(clause) if clause else None
            outs = [_exact_topk(self._mat, q, k, mask) for q in qs]
            return [self._id_list(p) for p, _ in outs], [s.astype(np.float32) for _, s in outs]
        res = self._ds.to_table(columns=["_distance"], filter=clause, prefilter=bool(clause), with_row_id=True,
                                nearest=_nearest(self._plan, VECTOR_COLUMN, qs, k, **self._knobs({})))
        qi = res["query_index"].to_numpy()
        pos = self._positions(res["_rowid"].to_numpy())
        sims = 1.0 - res["_distance"].to_numpy()
        return ([self._id_list(pos[qi == i]) for i in range(len(qs))],
                [sims[qi == i].astype(np.float32) for i in range(len(qs))])

    def _knobs(self, per_query: dict[str, int | None]) -> dict[str, int | None]:
        return {k: per_query.get(k) if per_query.get(k) is not None else v for k, v in self._overrides.items()}

    def _ann(self, column: str, plan: AnnPlan | None, q: np.ndarray, k: int, clause: str | None,
             use_index: bool = True, **knobs: int | None) -> tuple[list[str], np.ndarray]:
        knobs = self._knobs(knobs)
        if clause and plan is not None and knobs.get("nprobes") is None and plan.index_type != "IVF_HNSW_SQ":
            knobs["nprobes"] = filtered_nprobes(plan.nprobes, plan.num_partitions, self._selectivity(clause))
        res = self._ds.to_table(columns=["_distance"], filter=clause, prefilter=bool(clause), with_row_id=True,
                                nearest=_nearest(plan, column, q, k, use_index=use_index, **knobs))
        ids = self._id_list(self._positions(res["_rowid"].to_numpy()))
        return ids, (1.0 - res["_distance"].to_numpy()).astype(np.float32)

    def _selectivity(self, where: str) -> float:
        """Share of this version's rows passing `where` (cached per clause, like the masks)."""
        return self._shares.get(where, lambda: self._ds.count_rows(filter=where) / max(self._ds.count_rows(), 1))

    def vector_of(self, article_id: str) -> np.ndarray:
        """The item-tower vector of one article (KeyError when the version does not hold it)."""
        if self._mat is not None:
            if self._pos is None:
                self._pos = {a: i for i, a in enumerate(self._ids.to_pylist())}
            i = self._pos.get(str(article_id))
            if i is None:
                raise KeyError(f"article {article_id!r} is not in index version {self.version}")
            return self._mat[i]
        t = self._ds.to_table(columns=[VECTOR_COLUMN], filter=f"article_id = {sql_str(article_id)}")
        if t.num_rows == 0:
            raise KeyError(f"article {article_id!r} is not in index version {self.version}")
        return _matrix(t[VECTOR_COLUMN])[0]

    def similar(self, article_id: str, k: int, where: str | ItemFilter | None = None
                ) -> tuple[list[str], np.ndarray]:
        """Item-to-item: the k articles closest to `article_id` (itself excluded) passing `where`."""
        ids, sims = self.search(self.vector_of(article_id), k + 1, where)
        keep = [i for i, a in enumerate(ids) if a != str(article_id)][:k]
        return [ids[i] for i in keep], sims[keep]

    def text_search(self, query_text: str, k: int, where: str | ItemFilter | None = None
                    ) -> tuple[list[str], np.ndarray]:
        """BM25 full-text matches over the text columns (H&M: prod_name and detail_desc), best first."""
        from lancedb.query import MultiMatchQuery

        fts = self.record.fts_columns if self.record else list(FTS_COLUMNS)
        if not query_text.strip() or not fts:
            return [], np.zeros(0, np.float32)
        q = self.table.search(MultiMatchQuery(query_text, fts), query_type="fts")
        clause = _where(where)
        if clause:
            q = q.where(clause, prefilter=True)
        res = q.select(["article_id", "_score"]).limit(k).to_arrow()
        return res["article_id"].to_pylist(), res["_score"].to_numpy().astype(np.float32)

    def semantic_search(self, query_text: str, k: int, where: str | ItemFilter | None = None
                        ) -> tuple[list[str], np.ndarray]:
        """Articles whose MiniLM text vector is closest to the query text's, best first."""
        if TEXT_VECTOR_COLUMN not in self._ds.schema.names:
            raise ValueError(f"index version {self.version} has no text vectors: build it with text=True")
        qv = self._text_vector(query_text)
        return self._ann(TEXT_VECTOR_COLUMN, self._text_plan, qv, k, _where(where),
                         use_index=self._text_indexed)

    def hybrid(self, query_text: str, k: int, query_vector: np.ndarray | Sequence[float] | None = None,
               where: str | ItemFilter | None = None, *, candidates: int = 100, rrf_k: int = RRF_K,
               personal_weight: float = 1.0) -> tuple[list[str], np.ndarray]:
        """Full-text (BM25) and semantic matches of `query_text` fused by reciprocal rank; with a
        customer's `query_vector`, the fused pool is re-ordered by adding a reciprocal-rank term
        of each candidate's item-tower similarity to it (weight `personal_weight`)."""
        scores = dict(self._text_pool(query_text, candidates, _where(where), rrf_k))
        if query_vector is not None and scores:
            pool = list(scores)
            q = _unit(query_vector)
            sims = np.array([float(self.vector_of(a) @ q) for a in pool]) if self.engine == "exact" \
                else self._pool_sims(pool, q)
            for rank, i in enumerate(np.argsort(-sims, kind="stable")):
                scores[pool[i]] += personal_weight / (rrf_k + rank + 1)
        best = sorted(scores.items(), key=lambda kv: -kv[1])[:k]
        return [a for a, _ in best], np.array([s for _, s in best], dtype=np.float32)

    def _pool_sims(self, pool: list[str], q: np.ndarray) -> np.ndarray:
        t = self._ds.to_table(columns=["article_id", VECTOR_COLUMN],
                              filter=f"article_id IN ({', '.join(sql_str(a) for a in pool)})")
        by_id = dict(zip(t["article_id"].to_pylist(), _matrix(t[VECTOR_COLUMN]) @ q, strict=True))
        return np.array([by_id.get(a, -1.0) for a in pool])

    def _text_pool(self, query_text: str, candidates: int, clause: str | None, rrf_k: int
                   ) -> tuple[tuple[str, float], ...]:
        """The fused full-text and semantic matches of a query, (article_id, score) best first,
        from a bounded LRU: the two LanceDB queries are most of a search's CPU (several ms),
        search traffic repeats its head queries, and an index version is immutable
        (a new version is a new `ItemIndex`), so a pool never goes stale. Keyed like
        `_text_vector`, on the whitespace-normalised text, which both searches tokenise the same."""
        return self._pool_cache.get(_pool_key(query_text, candidates, clause, rrf_k),
                                    lambda: self._fused_pool(query_text, candidates, clause, rrf_k))

    def has_text_pool(self, query_text: str, candidates: int, where: str | ItemFilter | None = None,
                      rrf_k: int = RRF_K) -> bool:
        """Whether `hybrid` would find this query's fused pool cached: when not, it runs the text
        model and two LanceDB queries (tens of ms), which a serving loop should not wait on."""
        return _pool_key(query_text, candidates, _where(where), rrf_k) in self._pool_cache

    def _fused_pool(self, query_text: str, candidates: int, clause: str | None, rrf_k: int
                    ) -> tuple[tuple[str, float], ...]:
        fts_ids, _ = self.text_search(query_text, candidates, clause)
        sem_ids, _ = self.semantic_search(query_text, candidates, clause)
        return tuple(rrf_fuse([fts_ids, sem_ids], rrf_k).items())

    def _text_vector(self, query_text: str) -> np.ndarray:
        """The query text's unit MiniLM vector, from a bounded LRU: a transformer forward pass is the
        costliest step of a search (several ms on a CPU), and search traffic repeats its head queries.
        Keyed on the whitespace-normalised text, which the tokenizer would see the same way."""
        return self._text_cache.get(_normalised(query_text), lambda: self._encode_text(query_text))

    def _encode_text(self, query_text: str) -> np.ndarray:
        vec = _unit(self._encoder().encode([query_text])[0])
        vec.setflags(write=False)
        return vec

    def _encoder(self) -> TextEncoder:
        if self._text_encoder is None:
            from training.text_embed import TextEmbedder

            self._text_encoder = TextEmbedder()
        return self._text_encoder

    def vectors(self) -> tuple[list[str], np.ndarray]:
        """All article ids and vectors (for exact batch evaluation)."""
        t = self._ds.to_table(columns=["article_id", VECTOR_COLUMN])
        return t["article_id"].to_pylist(), _matrix(t[VECTOR_COLUMN], normalise=False)


def rrf_fuse(ranked_lists: Sequence[Sequence[str]], rrf_k: int = RRF_K) -> dict[str, float]:
    """Reciprocal rank fusion: sum over lists of 1 / (rrf_k + rank), rank from 1; insertion-ordered."""
    out: dict[str, float] = {}
    for ids in ranked_lists:
        for rank, a in enumerate(ids, start=1):
            out[a] = out.get(a, 0.0) + 1.0 / (rrf_k + rank)
    return out


def _unit(v: np.ndarray | Sequence[float]) -> np.ndarray:
    q = np.asarray(v, dtype=np.float32).ravel()
    n = float(np.linalg.norm(q))
    return q / n if n > 0 else q


# ---------------------------------------------------------------------------------------------
# Versions: promote, rollback, and the serving view that follows them


def index_uri(wd: Workdir) -> str:
    """The LanceDB location of a run (a folder or an object-store URI): the manifest's when it names
    one, else the workdir's `index/`."""
    ref = read_manifest(wd).index if wd.manifest_path.is_file() else None
    return wd.from_ref(ref.uri) if ref else str(wd.index_dir)


def table_versions(uri: str | Path, table: str = TABLE_NAME) -> list[int]:
    import lancedb

    return sorted(int(v["version"]) for v in lancedb.connect(str(uri)).open_table(table).list_versions())


def set_index_version(wd: Workdir, version: int, force: bool = False) -> IndexRef:
    """Point the manifest's index at a recorded build (one atomic manifest write)."""
    manifest = read_manifest(wd)
    uri = index_uri(wd)
    table = manifest.index.table if manifest.index else TABLE_NAME
    rec = find_build(uri, version, table)
    if rec is None:
        known = [b.version for b in load_builds(uri).builds if b.table == table]
        raise ValueError(f"version {version} of table {table!r} is not a complete build in {uri}; "
                         f"complete builds: {known}")
    if version not in table_versions(uri, table):
        raise ValueError(f"version {version} of table {table!r} no longer exists in {uri}")
    tower = manifest.models.get("item_tower")
    current = file_sha256(wd.resolve(tower)) if tower else None
    if not force and rec.item_tower_sha256 and current and rec.item_tower_sha256 != current:
        raise ValueError(f"version {version} was built with another item tower than the run's "
                         f"({tower}): its vectors do not match the query tower; use --force to switch anyway")
    manifest.index = IndexRef(uri=wd.to_ref(uri), table=table, version=version, dim=rec.dim, n_rows=rec.n_rows)
    write_manifest(wd, manifest)
    return manifest.index


def promote(wd: Workdir, version: int | None = None, force: bool = False) -> IndexRef:
    """Serve `version`, by default the newest complete build."""
    read_manifest(wd)  # a run must exist (names the missing manifest otherwise)
    builds = load_builds(index_uri(wd)).builds
    if version is None:
        if not builds:
            raise ValueError(f"no complete index builds in {index_uri(wd)}: run `rayrec index build` first")
        version = builds[-1].version
    return set_index_version(wd, version, force)


def rollback(wd: Workdir, version: int | None = None, force: bool = False) -> IndexRef:
    """Serve `version`, by default the newest complete build older than the one served now."""
    if version is None:
        ref = read_manifest(wd).index
        if ref is None:
            raise ValueError(f"{wd.manifest_path} names no index to roll back from")
        older = [b.version for b in load_builds(index_uri(wd)).builds if b.table == ref.table and b.version < ref.version]
        if not older:
            raise ValueError(f"no complete build older than version {ref.version} to roll back to")
        version = older[-1]
    return set_index_version(wd, version, force)


class LiveItemIndex:
    """Serving's index: the version the manifest names, re-read when the manifest changes.

    The new version is opened (and, for the exact engine, loaded) before it replaces the old
    one in a single reference assignment, so a query runs start to end on one version and
    never waits for a swap. `poll_s` > 0 checks the manifest from a daemon thread; `refresh()`
    checks now.
    """

    def __init__(self, workdir: str | Path, poll_s: float = 2.0, **index_kwargs: Any):
        self.wd = Workdir.at(workdir)
        self._kwargs = index_kwargs
        self._stamp: tuple[int, int] | None = None
        self._index = self._open()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if poll_s > 0:
            self._thread = threading.Thread(target=self._poll, args=(poll_s,), daemon=True, name="index-follow")
            self._thread.start()

    @property
    def index(self) -> ItemIndex:
        return self._index

    @property
    def version(self) -> int:
        return self._index.version

    def _open(self) -> ItemIndex:
        st = self.wd.manifest_path.stat()
        ref = read_manifest(self.wd).index
        if ref is None:
            raise ValueError(f"{self.wd.manifest_path} names no index")
        self._stamp = (st.st_mtime_ns, st.st_size)
        return ItemIndex(self.wd.from_ref(ref.uri), ref.table, ref.version, **self._kwargs)

    def refresh(self) -> bool:
        """Swap to the manifest's version if it changed; True when it swapped."""
        st = self.wd.manifest_path.stat()
        if (st.st_mtime_ns, st.st_size) == self._stamp:
            return False
        ref = read_manifest(self.wd).index
        cur = self._index
        if ref is None or (self.wd.from_ref(ref.uri), ref.table, ref.version) == (cur.uri, cur.table_name,
                                                                                   cur.version):
            self._stamp = (st.st_mtime_ns, st.st_size)
            return False
        new = ItemIndex(self.wd.from_ref(ref.uri), ref.table, ref.version, **self._kwargs)
        self._index, self._stamp = new, (st.st_mtime_ns, st.st_size)
        return True

    def _poll(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.refresh()
            except Exception as e:  # noqa: BLE001 - keep serving the current version
                print(f"[index] keeping version {self._index.version}: {e}", flush=True)

    def close(self) -> None:
        self._stop.set()

    def search(self, vector: np.ndarray | Sequence[float], k: int, where: str | ItemFilter | None = None,
               **kw: Any) -> tuple[list[str], np.ndarray]:
        return self._index.search(vector, k, where, **kw)

    def similar(self, article_id: str, k: int, where: str | ItemFilter | None = None) -> tuple[list[str], np.ndarray]:
        return self._index.similar(article_id, k, where)

    def hybrid(self, query_text: str, k: int, query_vector: np.ndarray | Sequence[float] | None = None,
               where: str | ItemFilter | None = None, **kw: Any) -> tuple[list[str], np.ndarray]:
        return self._index.hybrid(query_text, k, query_vector, where, **kw)

    def has_text_pool(self, query_text: str, candidates: int, where: str | ItemFilter | None = None) -> bool:
        return self._index.has_text_pool(query_text, candidates, where)
