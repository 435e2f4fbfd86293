"""Filter + feature fetch + ranking latency per request, with the online store on a local MariaDB.

What one request costs between retrieval and the response, as `RankerDeployment.rank` runs it
(`ray_apps.stages.ranking.OnlineRanker.rank`): one articles-group query for the candidates
(plus the customer's recent purchases), the business rules, vectorisation, CatBoost and the
diversity rule. The customer's own rows are inputs (the query encoder read them before).

Self-contained by default: starts its own MariaDB in a temp folder, generates H&M-shaped data,
writes the feature groups through the feature store and fits a ranker with the default config
(a popularity stand-in for retrieval). With --workdir it uses a pipeline run instead: its
ranker, its online tables (the run's database must be running) and its retrieval index.

Prints one JSON line per candidate count:
    {"bench": "rank", "candidates": 200, "p50_ms": .., "p99_ms": .., "fetch_p50_ms": ..,
     "stage_p50_ms": .., "kept": .., "cores": 2}
and, for the largest candidate count, the model call paced like serving (50 per second):
    {"bench": "rank", "case": "paced_predict", "rows": .., "cpu_ms": .., "default_pool_cpu_ms": ..,
     "ratio_vs_default_pool": .., "full_model_cpu_ms": .., "ratio_vs_full_model": ..,
     "row_major_cpu_ms": .., "ratio_vs_row_major": ..}
`default_pool_cpu_ms` builds the Pool with catboost's default thread count, which wakes its TBB
worker on every call (the worker then spins); `full_model_cpu_ms` builds it on one thread but
scores with the model as loaded, whose training parameters catboost parses on every call;
`row_major_cpu_ms` builds the Pool from the numeric block in row-major order (catboost copies
it column by column); `cpu_ms` is `RankerModel.predict` as serving runs it (one thread, the
parameters left out, the numeric block column-major).

Usage: python benchmarks/rank.py [--candidates 100 200 500] [--requests 300] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import datetime as dt
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, json_lines_only, paced_cpu_s, timed_ms  # noqa: E402

from common.artifacts import new_manifest, read_manifest  # noqa: E402
from common.config import DatabaseConfig, FilterConfig, RankerConfig, load_config  # noqa: E402
from common.workdir import Workdir  # noqa: E402
from feature_store.local_db import LocalMariaDB  # noqa: E402
from feature_store.online.mysql import MySQLOnlineStore  # noqa: E402
from feature_store.sources import generate, load_hm  # noqa: E402
from feature_store.store import FeatureStore, read_online  # noqa: E402
from feature_store.transforms import article_features, customer_features, customer_history  # noqa: E402
from ray_apps.schemas import Candidates  # noqa: E402
from ray_apps.stages.ranking import OnlineRanker, ranking_stage  # noqa: E402
from training.ranker import RankingStage, build_ranking_data, fit_ranker  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synthetic_run(tmp: Path, store: MySQLOnlineStore, n_max: int):
    """Generated data in the store, a ranker fitted with the default config; the candidate
    source is recent popularity (the same list order for everyone, minus what they bought)."""
    data_dir = tmp / "data"
    generate(data_dir, seed=0, customers=2000, articles=max(1500, 2 * n_max), days=60)
    hm = load_hm(data_dir)
    tx = hm.transactions
    fs = FeatureStore(Workdir.at(tmp), store)
    manifest = new_manifest("bench")
    frames = {"customers": customer_features(hm.customers, hm.extras.get("postal_regions")),
              "articles": article_features(hm.articles, tx, None, hm.extras),
              "customer_history": customer_history(tx, hm.articles, None)}
    for name, frame in frames.items():
        manifest.feature_groups[name] = fs.write(name, frame, progress=False)
    popular = tx["article_id"].value_counts().index.tolist()
    cfg = RankerConfig(max_train_customers=600)

    def candidates(cids, hist, as_of, n=cfg.n_candidates):
        counts = tx[tx["t_dat"] < as_of]["article_id"].value_counts()
        bought = dict(zip(hist["customer_id"], hist["purchased"], strict=True))
        out_ids, out_scores = [], []
        for c in cids:
            seen = set(bought.get(c, []))
            top = [a for a in counts.index if a not in seen][:n]
            out_ids.append(top)
            out_scores.append(counts.loc[top].to_numpy(np.float64) / counts.iloc[0])
        return out_ids, out_scores

    channel = {c: 2 for c in frames["customers"]["customer_id"]}
    t0 = time.time()
    model = fit_ranker(build_ranking_data(hm.articles, tx, frames["customers"], hm.extras, candidates, cfg, channel,
                                          progress=False), cfg, progress=False)
    emit("rank", case="setup", ranker_fit_s=round(time.time() - t0, 1), iterations=cfg.iterations,
         depth=cfg.depth, articles=len(popular))

    def stage_for(n: int) -> RankingStage:
        return RankingStage(model, cfg, FilterConfig(), n)

    def cands_for(customer_id: str, n: int) -> Candidates:
        ids = popular[:n]
        return Candidates(article_ids=ids, scores=list(np.linspace(0.9, 0.1, len(ids))))

    cids = frames["customer_history"]["customer_id"].tolist()
    return manifest, stage_for, cands_for, cids, tx["t_dat"].max().date() + dt.timedelta(days=1)


def workdir_run(wd: Workdir, store: MySQLOnlineStore):
    """A pipeline run: its ranker and online tables; candidates from its retrieval index."""
    from training.index import ItemIndex

    manifest = read_manifest(wd)
    cfg = load_config(wd.config_path)
    ref = manifest.index
    index = ItemIndex(wd.from_ref(ref.uri), ref.table, ref.version)
    ids, vecs = index.vectors()
    base = ranking_stage(wd, manifest, cfg)
    rng = np.random.default_rng(0)

    def stage_for(n: int) -> RankingStage:
        return RankingStage(base.model, base.cfg, base.filters, n, base.item_vectors)

    def cands_for(customer_id: str, n: int) -> Candidates:
        q = vecs[rng.integers(len(ids))]  # a query near some article: realistic neighbours
        got, sims = index.search(q, n)
        return Candidates(article_ids=got, scores=[float(s) for s in sims])

    hist_path = wd.resolve(manifest.feature_groups["customer_history"].offline_path)
    cids = pd.read_parquet(hist_path, columns=["customer_id"])["customer_id"].tolist()
    return manifest, stage_for, cands_for, cids, dt.date.today()


def measure(store, manifest, stage_for, cands_for, cids, day, sizes, requests) -> None:
    rng = np.random.default_rng(1)
    refs = manifest.feature_groups
    sample = [cids[i] for i in rng.choice(len(cids), size=min(64, len(cids)), replace=False)]
    customers = read_online(store, refs["customers"], "customers", sample)
    histories = read_online(store, refs["customer_history"], "customer_history", sample)
    for n in sizes:
        stage = stage_for(n)
        ranker = OnlineRanker(store, manifest, stage)
        cases = [(c, cands_for(c, n)) for c in sample]
        it = iter(range(10**9))

        def one(ranker=ranker, cases=cases, it=it):
            c, cands = cases[next(it) % len(cases)]
            return ranker.rank(cands, customers.get(c), histories.get(c), channel=2, now=day, k=12)

        total = timed_ms(one, requests, warmup=20)
        cols = stage.article_columns()

        def fetch(cases=cases, it=it, stage=stage, cols=cols):
            c, cands = cases[next(it) % len(cases)]
            return read_online(store, refs["articles"], "articles", stage.article_keys(cands.article_ids,
                                                                                      histories.get(c)), cols)

        fetch_ms = timed_ms(fetch, requests, warmup=5)
        rows = {c: fetch(cases=[(c, cands)]) for c, cands in cases}

        def run(cases=cases, it=it, stage=stage, rows=rows):
            c, cands = cases[next(it) % len(cases)]
            return stage.run(customers.get(c), histories.get(c), cands.article_ids, cands.scores, rows[c],
                             channel=2, now=day, k=12)

        stage_ms = timed_ms(run, requests, warmup=5)
        kept = np.mean([run().n_after_filter for _ in range(len(cases))])
        if n == max(sizes):
            c, cands = cases[0]
            prep = stage.prepare(customers.get(c), histories.get(c), cands.article_ids, cands.scores, rows[c],
                                 channel=2, now=day)
            emit("rank", case="paced_predict", rows=len(prep.block), **paced_predict(stage.model, prep.block))
        emit("rank", candidates=n, requests=requests, p50_ms=float(np.median(total)),
             p99_ms=float(np.percentile(total, 99)), mean_ms=float(total.mean()),
             fetch_p50_ms=float(np.median(fetch_ms)), fetch_p99_ms=float(np.percentile(fetch_ms, 99)),
             stage_p50_ms=float(np.median(stage_ms)), stage_p99_ms=float(np.percentile(stage_ms, 99)),
             kept=float(kept), columns=len(cols))


def paced_predict(model, block, rate: float = 50.0, n: int = 150) -> dict:
    """Process CPU per model call at `rate` calls per second: `RankerModel.predict` (its Pool on
    one thread) first, then the same call with a Pool on catboost's default thread count."""
    from catboost import CatBoost, FeaturesData, Pool

    def default_pool():
        data = Pool(FeaturesData(num_feature_data=block.num, cat_feature_data=block.cat))
        return CatBoost.predict(model.model, data, prediction_type="RawFormulaVal", thread_count=1)

    def cpu_ms(fn) -> float:
        for _ in range(10):
            fn()
        return paced_cpu_s(lambda _: fn(), n, rate) / n * 1000

    def full_model():
        data = Pool(FeaturesData(num_feature_data=block.num, cat_feature_data=block.cat), thread_count=1)
        return CatBoost.predict(model.model, data, prediction_type="RawFormulaVal", thread_count=1)

    def row_major():  # RankerModel.predict before its numeric block went in column-major
        data = Pool(FeaturesData(num_feature_data=np.array(block.num, order="C"), cat_feature_data=block.cat.copy()),
                    thread_count=1)
        return CatBoost.predict(model._scoring_model(), data, prediction_type="RawFormulaVal", thread_count=1)

    # ours and row-major twice each, in opposite orders (this machine's speed drifts)
    ours_1, row_1, row_2, ours_2 = (cpu_ms(f) for f in (lambda: model.predict(block), row_major, row_major,
                                                         lambda: model.predict(block)))
    ours, row = (ours_1 + ours_2) / 2, (row_1 + row_2) / 2
    default = cpu_ms(default_pool)
    full = cpu_ms(full_model)
    return {"rate": rate, "cpu_ms": round(ours, 3), "default_pool_cpu_ms": round(default, 3),
            "ratio_vs_default_pool": round(ours / default, 3), "full_model_cpu_ms": round(full, 3),
            "ratio_vs_full_model": round(ours / full, 3), "row_major_cpu_ms": round(row, 3),
            "ratio_vs_row_major": round(ours / row, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", type=int, nargs="+", default=[100, 200, 500])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--workdir", help="a pipeline run to measure (its database must be running)")
    ap.add_argument("--db-port", type=int, help="port of the benchmark's own MariaDB (default: a free one)")
    a = ap.parse_args()
    json_lines_only()
    if a.workdir:
        from feature_store.connect import open_online_store

        wd = Workdir.at(a.workdir)
        store = open_online_store(load_config(wd.config_path).database, wd)
        try:
            measure(store, *workdir_run(wd, store), a.candidates, a.requests)
        finally:
            store.close()
        return
    with tempfile.TemporaryDirectory(prefix="rayrec-bench-") as tmp:
        cfg = DatabaseConfig(port=a.db_port or free_port(), database="bench", user="bench",
                             password_env="RAYREC_BENCH_UNSET")
        db = LocalMariaDB(Workdir.at(tmp), cfg)
        db.start()
        try:
            store = MySQLOnlineStore.from_config(cfg, db.password())
            measure(store, *synthetic_run(Path(tmp), store, max(a.candidates)), a.candidates, a.requests)
            store.close()
        finally:
            db.stop()


if __name__ == "__main__":
    main()
