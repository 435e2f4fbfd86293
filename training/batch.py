"""Batch recommendations: the serving pipeline for many customers at once, with Ray Data.

For every customer (or a given list) the same steps as an HTTP request, by the same code:
query encoding of the online customer rows, top-n retrieval from the served index version,
the business rules, the ranker and the diversity rule (`training.ranker.RankingStage`), with
the same over-fetch rounds when too few candidates survive the rules. Each Ray Data batch
reads the online store once per feature group (articles once per fetch round), so a list
written here equals the HTTP answer for the same customer, request context and store state.

Output: one Parquet file with customer_id, rank (1 = best), article_id, score.
"""
from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from common.artifacts import read_manifest
from common.config import DatabaseConfig, load_config
from common.workdir import Workdir
from training.filters import bought_within, fetch_size, next_fetch
from training.popularity import is_cold, load_popularity, popular_ids, popular_ranked
from training.ranker import Ranked

OUTPUT_SCHEMA = pa.schema([("customer_id", pa.string()), ("rank", pa.int32()), ("article_id", pa.string()),
                           ("score", pa.float64())])
DEFAULT_CHANNEL = 2  # as the HTTP API when the request names none


class BatchRecommender:
    """Ray Data callable: loads the run's models once per actor, recommends for a batch."""

    def __init__(self, workdir: str, k: int, day: str, channel: int, database: dict[str, Any] | None = None):
        import torch

        from feature_store.connect import open_online_store
        from training.index import ItemIndex
        from training.ranker import RankerModel, RankingStage
        from training.two_tower.model import load_query_tower

        torch.set_num_threads(1)  # as the serving encoder: same kernels, same vectors
        wd = Workdir.at(workdir)
        manifest = read_manifest(wd)
        cfg = load_config(wd.config_path)
        db = DatabaseConfig.model_validate(database) if database is not None else cfg.database
        self.store = open_online_store(db, wd)
        self.refs = manifest.feature_groups
        self.tower, self.vocab = load_query_tower(wd.two_tower_dir)
        self.history_len = cfg.two_tower.history_len
        ref = manifest.index
        self.index = ItemIndex(wd.from_ref(ref.uri), ref.table, ref.version)
        vectors = None
        if cfg.ranker.diversity.rule == "mmr":
            ids, vecs = self.index.vectors()
            vectors = dict(zip(ids, vecs, strict=True))
        model = RankerModel.load(wd.resolve(manifest.models["ranker"]))
        self.stage = RankingStage(model, cfg.ranker, cfg.filters, cfg.serve.n_candidates, vectors)
        self.filters = cfg.filters
        self.popularity = load_popularity(wd.resolve(manifest.models["popularity"])) \
            if "popularity" in manifest.models else None
        self.n_rank = cfg.serve.n_candidates
        self.k = k
        self.day = dt.date.fromisoformat(day)
        self.channel = channel

    def encode(self, customer_id: str, customer: dict[str, Any] | None, history: dict[str, Any] | None) -> np.ndarray:
        """The query vector exactly as the serving encoder builds it (one row at a time)."""
        from feature_store.views import query_row
        from training.features import as_columns, encode_queries

        purchased = list((history or {}).get("purchased") or [])
        row = query_row(customer, customer_id, purchased[: self.history_len], self.day.month, self.channel)
        vec = self.tower.embed(encode_queries(self.vocab, as_columns([row]), self.history_len))[0]
        return np.asarray(vec.tolist(), dtype=np.float32)  # the float list serving passes between replicas

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from feature_store.store import read_online

        cids = [str(c) for c in batch["customer_id"]]
        customers = read_online(self.store, self.refs["customers"], "customers", cids)
        histories = read_online(self.store, self.refs["customer_history"], "customer_history", cids)
        columns = self.stage.article_columns()
        articles: dict[str, Any] = {}
        results = {}
        cold = [c for c in cids if self.popularity is not None and is_cold(customers.get(c), histories.get(c))]
        if cold:  # as serving: popular articles for a customer with nothing to personalise on
            ids = popular_ids(self.popularity, None)
            articles.update(read_online(self.store, self.refs["articles"], "articles", ids, columns))
            for c in cold:
                pop = popular_ranked(self.popularity, None, None, articles, self.filters, self.k)
                results[c] = Ranked([i["article_id"] for i in pop["items"]], [i["score"] for i in pop["items"]])
        warm = [c for c in cids if c not in results]
        vecs = {c: self.encode(c, customers.get(c), histories.get(c)) for c in warm}
        pending = {c: fetch_size(self.n_rank, len(bought_within(histories.get(c), self.filters.bought_lookback)),
                                 self.filters) for c in warm}
        while pending:  # fetch rounds, as the HTTP ingress does per request
            cands = {c: self.index.search(vecs[c], n) for c, n in pending.items()}
            need = {a for c, (ids, _) in cands.items() for a in self.stage.article_keys(ids, histories.get(c))}
            missing = [a for a in need if a not in articles]
            articles.update(read_online(self.store, self.refs["articles"], "articles", missing, columns))
            nxt = {}
            for c, (ids, scores) in cands.items():
                out = self.stage.run(customers.get(c), histories.get(c), ids, [float(s) for s in scores], articles,
                                     channel=self.channel, now=self.day, k=self.k)
                results[c] = out
                more = next_fetch(pending[c], len(ids), out.n_after_filter, self.k, self.filters)
                if more is not None:
                    nxt[c] = more
            pending = nxt
        rows = [(c, r + 1, a, s) for c in cids for r, (a, s) in
                enumerate(zip(results[c].article_ids, results[c].scores, strict=True))]
        return pd.DataFrame(rows, columns=OUTPUT_SCHEMA.names).astype({"rank": "int32", "score": "float64"})


@dataclass(frozen=True)
class BatchSummary:
    path: Path
    customers: int
    rows: int
    seconds: float


def all_customer_ids(wd: Workdir) -> list[str]:
    """Every customer of the served customers group (offline copy of the same version)."""
    ref = read_manifest(wd).feature_groups["customers"]
    return pd.read_parquet(wd.resolve(ref.offline_path), columns=["customer_id"])["customer_id"].astype(str).tolist()


def recommend_batch(
    wd: Workdir,
    out: Path,
    k: int = 100,
    customer_ids: Sequence[str] | None = None,
    day: dt.date | None = None,
    channel: int = DEFAULT_CHANNEL,
    database: DatabaseConfig | None = None,
    batch_size: int = 256,
    actors: int = 1,
    progress: bool = True,
) -> BatchSummary:
    """Recommend `k` articles to each customer (all when `customer_ids` is None) and write one
    Parquet file. Ray must be initialised; `day` defaults to today, as the HTTP API."""
    import pyarrow.parquet as pq
    import ray

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if channel not in (1, 2):
        raise ValueError(f"channel must be 1 (store) or 2 (online), got {channel}")
    read_manifest(wd)  # a clear error before any actor starts
    ids = list(dict.fromkeys(customer_ids)) if customer_ids is not None else all_customer_ids(wd)
    if not ids:
        raise ValueError("no customers to recommend for")
    day = day or dt.date.today()
    t0 = time.time()
    # from_items builds the blocks in this process: no task that would wait for a free CPU
    # (next to a running Serve app, a 2-CPU node has none to spare).
    ds = ray.data.from_items([{"customer_id": c} for c in ids],
                             override_num_blocks=max(1, math.ceil(len(ids) / batch_size)))
    # Fractional CPUs: a 1-CPU actor can starve the rest on a 2-CPU node (see STACK.md).
    ds = ds.map_batches(BatchRecommender, batch_size=batch_size, batch_format="pandas",
                        fn_constructor_args=(str(wd.root), k, day.isoformat(), channel,
                                             database.model_dump() if database is not None else None),
                        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=0.5)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    n_rows, done = 0, set()
    with pq.ParquetWriter(tmp, OUTPUT_SCHEMA) as writer:
        for part in ds.iter_batches(batch_format="pandas", batch_size=None):
            table = pa.Table.from_pandas(part, schema=OUTPUT_SCHEMA, preserve_index=False)
            writer.write_table(table)
            n_rows += table.num_rows
            done.update(part["customer_id"].unique())
            if progress:
                print(f"[recommend-batch] {len(done)}/{len(ids)} customers, {n_rows} rows "
                      f"({time.time() - t0:.0f}s)", flush=True)
    tmp.replace(out)
    return BatchSummary(out, len(ids), n_rows, time.time() - t0)
