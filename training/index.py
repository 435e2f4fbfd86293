"""The item index: Ray Data embeds every article with the item tower into a LanceDB table.

Each build overwrites the table as a new LanceDB version; the manifest records that
version and readers check it out, so a reader never sees a half-written build. Below
EXACT_SEARCH_MAX_ROWS the search is exact (a flat scan beats an ANN index at that size).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

TABLE_NAME = "articles"
EXACT_SEARCH_MAX_ROWS = 50_000
ATTRIBUTE_COLUMNS = ["prod_name", "product_type_name", "index_group_name", "garment_group_name",
                     "colour_group_name", "price", "in_stock", "min_age"]


class ItemEmbedder:
    """Callable for Ray Data `map_batches`: loads the item tower once per actor."""

    def __init__(self, model_dir: str):
        import torch

        from training.two_tower.model import load_item_tower

        torch.set_num_threads(1)
        self.tower, self.vocab = load_item_tower(Path(model_dir))

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        from training.features import encode_items

        vecs = self.tower.embed(encode_items(self.vocab, batch)).astype(np.float32)
        return to_index_rows(batch, vecs)


def to_index_rows(batch: pd.DataFrame, vecs: np.ndarray) -> pa.Table:
    """Article ids, attributes for prefilters, and the vector as a fixed-size list."""
    stock = pd.to_numeric(batch["stock"], errors="coerce")
    cols = {
        "article_id": pa.array(batch["article_id"].astype(str).tolist(), pa.string()),
        "prod_name": pa.array(batch["prod_name"].astype(str).tolist(), pa.string()),
        "product_type_name": pa.array(batch["product_type_name"].astype(str).tolist(), pa.string()),
        "index_group_name": pa.array(batch["index_group_name"].astype(str).tolist(), pa.string()),
        "garment_group_name": pa.array(batch["garment_group_name"].astype(str).tolist(), pa.string()),
        "colour_group_name": pa.array(batch["colour_group_name"].astype(str).tolist(), pa.string()),
        "price": pa.array(pd.to_numeric(batch["price"], errors="coerce").astype("float64").tolist(), pa.float64()),
        "in_stock": pa.array((stock.isna() | (stock > 0)).tolist(), pa.bool_()),
        "min_age": pa.array(pd.to_numeric(batch["min_age"]).fillna(0).astype("int64").tolist(), pa.int64()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel(), pa.float32()), vecs.shape[1]),
    }
    return pa.table(cols)


@dataclass(frozen=True)
class IndexBuild:
    uri: str
    table: str
    version: int
    n_rows: int
    dim: int
    seconds: float


def build_index(articles_path: Path, model_dir: Path, uri: Path, progress: bool = True) -> IndexBuild:
    """Embed the articles (offline feature group Parquet) with Ray Data and write a new table version."""
    import lancedb
    import ray

    t0 = time.time()
    ds = ray.data.read_parquet(str(articles_path))
    # Fractional CPUs: on a 2-CPU node a 1-CPU actor starves Ray Data's read tasks (STACK.md).
    ds = ds.map_batches(ItemEmbedder, fn_constructor_args=(str(model_dir),), batch_format="pandas",
                        batch_size=2048, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5)
    db = lancedb.connect(str(uri))
    tbl, n = None, 0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=4096):
        if tbl is None:
            tbl = db.create_table(TABLE_NAME, data=batch, mode="overwrite")
        else:
            tbl.add(batch)
        n += batch.num_rows
        if progress:
            rate = n / max(time.time() - t0, 1e-9)
            print(f"[index] {n} articles embedded ({rate:.0f} rows/s)", flush=True)
    if tbl is None:
        raise ValueError(f"no articles to index in {articles_path}")
    if n > EXACT_SEARCH_MAX_ROWS:
        tbl.create_index(metric="cosine", vector_column_name="vector", index_type="IVF_HNSW_SQ",
                         num_partitions=max(1, n // 4096))
    dim = tbl.schema.field("vector").type.list_size
    return IndexBuild(str(uri), TABLE_NAME, int(tbl.version), n, int(dim), time.time() - t0)


class ItemIndex:
    """Read side used by serving and batch jobs: top-k by vector on a pinned table version."""

    def __init__(self, uri: str, table: str, version: int):
        import lancedb

        self.table = lancedb.connect(uri).open_table(table)
        self.table.checkout(version)
        self.version = version

    def search(self, vector: np.ndarray, k: int, where: str | None = None) -> tuple[list[str], np.ndarray]:
        """Article ids and cosine similarities of the top-k items, best first."""
        q = self.table.search(np.asarray(vector, dtype=np.float32), vector_column_name="vector")
        q = q.distance_type("cosine").limit(k).select(["article_id"])
        if where:
            q = q.where(where, prefilter=True)
        res = q.to_arrow()
        return res["article_id"].to_pylist(), 1.0 - res["_distance"].to_numpy()

    def vectors(self) -> tuple[list[str], np.ndarray]:
        """All article ids and vectors (for exact batch evaluation)."""
        t = self.table.to_arrow().select(["article_id", "vector"])
        vecs = t["vector"].combine_chunks().flatten().to_numpy().reshape(t.num_rows, -1)
        return t["article_id"].to_pylist(), vecs.astype(np.float32)
