"""What writing a large insert online in several transactions costs, and finishing one that stopped.

A feature-group insert of more keys than `database.max_txn_rows` goes online in transactions of
that many rows (the commit marker with the last; feature_store/README.md, "Large inserts"). This
inserts H&M-shaped article rows (benchmarks/online_store.py's `synthetic_articles`) into new
versions of the articles group on the benchmark's own MariaDB, alternating one transaction
(`max_txn_rows` = rows) with transactions of `--txn-rows`, and then an insert whose online write
fails after its first transaction, finished by `FeatureGroupVersion.recover()` from its staged
files. The whole insert is timed (validation, packing, Parquet staging, online write, publish).

    python benchmarks/feature_insert.py [--rows 100000] [--txn-rows 20000] [--repeats 2]
    python benchmarks/feature_insert.py --group customers --rows 1371980   # H&M's customer count

One JSON line per case: {"bench": "feature_insert", "case": "one_transaction" | "transactions" |
"finish_after_failure", "rows", "max_txn_rows", "insert_s", "rows_per_s", "ratio_vs_one_transaction", ...}.
The insert cases also give the frame's own size (`frame_mb`, pandas' deep memory usage) and the
most the process's RSS grew during one insert (`peak_rss_growth_mb`, sampled every 20 ms; the
largest of the repeats): the memory an insert needs beyond the frame it is given. Each timed insert
runs in a fresh process, so that no insert inherits memory an earlier one left with the allocator.
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import emit, json_lines_only, rss_peak  # noqa: E402
from online_store import article_ids, free_port, synthetic_articles  # noqa: E402

from common.config import DatabaseConfig  # noqa: E402
from common.workdir import Workdir  # noqa: E402
from feature_store.groups import (  # noqa: E402
    AGE_GROUPS,
    ARTICLES,
    CLUB_MEMBER_STATUSES,
    CUSTOMERS,
    FASHION_NEWS_FREQUENCIES,
    POSTAL_BUCKETS,
)
from feature_store.local_db import LocalMariaDB  # noqa: E402
from feature_store.online.mysql import MySQLOnlineStore  # noqa: E402
from feature_store.store import FeatureStore  # noqa: E402


def synthetic_customers(n: int, rng: np.random.Generator) -> pd.DataFrame:
    """H&M-shaped customer rows (64-character hex ids, as in the Kaggle files)."""
    age = rng.integers(16, 90, n).astype(float)
    pick = lambda values: np.array(values, dtype=object)[rng.integers(0, len(values), n)]  # noqa: E731
    return pd.DataFrame({
        "customer_id": [f"{i:064x}" for i in range(n)], "age": age,
        "age_group": np.array(AGE_GROUPS, dtype=object)[np.searchsorted([18, 25, 35, 45, 55, 65], age)],
        "club_member_status": pick(CLUB_MEMBER_STATUSES), "fashion_news_frequency": pick(FASHION_NEWS_FREQUENCIES),
        "FN": rng.integers(0, 2, n).astype(float), "Active": rng.integers(0, 2, n).astype(float),
        "postal_code": [f"{i:064x}" for i in rng.integers(0, 350_000, n)],
        "postal_bucket": rng.integers(0, POSTAL_BUCKETS, n), "region": pick(("north", "south", "east", "west")),
    })


GROUPS = {"articles": ARTICLES, "customers": CUSTOMERS}


def make_frame(group_name: str, rows: int) -> pd.DataFrame:
    """The benchmark's rows, the same on every call (seed 0), so that each child process builds its own."""
    rng = np.random.default_rng(0)
    return synthetic_articles(article_ids(rows), rng) if group_name == "articles" else synthetic_customers(rows, rng)


def insert_once(root: str, cfg: DatabaseConfig, password: str, group_name: str, rows: int,
                txn_rows: int) -> tuple[float, float]:
    """Seconds of one insert into a new version and the most RSS grew over it, in MB. Runs in a
    fresh process per insert (`in_fresh_process`): memory an earlier insert freed but the allocator
    kept would otherwise hide what the next one needs."""
    frame = make_frame(group_name, rows)
    store = MySQLOnlineStore.from_config(cfg, password)
    try:
        fgv = FeatureStore(Workdir.at(root), store, max_txn_rows=txn_rows).create_feature_group(GROUPS[group_name])
        with rss_peak() as mem:
            t0 = time.perf_counter()
            fgv.insert(frame, validation="strict", event_time="2020-09-22")
            seconds = time.perf_counter() - t0
        return seconds, mem["peak_rss_growth_mb"]
    finally:
        store.close()


def in_fresh_process(*args: object) -> tuple[float, float]:
    """`insert_once` in a new spawned process, waited for."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(insert_once, *args).result()


def finish_after_failure(store: MySQLOnlineStore, root: str, group, frame, txn_rows: int) -> dict:
    """An insert whose second online transaction fails, then `recover()` timed."""
    fs = FeatureStore(Workdir.at(root), store, max_txn_rows=txn_rows)
    fgv = fs.create_feature_group(group)
    write, calls = store.write_batch, []

    def fail_second(spec, rows, **kwargs):
        if spec.name == fgv.spec.name:
            calls.append(len(rows))
            if len(calls) == 2:
                raise ConnectionError("benchmark: the online store went away")
        return write(spec, rows, **kwargs)

    store.write_batch = fail_second
    t0 = time.perf_counter()
    try:
        fgv.insert(frame, validation="strict", event_time="2020-09-22")
        raise AssertionError("the insert was meant to fail")
    except ConnectionError:
        failed_s = time.perf_counter() - t0
    finally:
        del store.write_batch
    online_before = fgv.stats()["online_rows"]
    t0 = time.perf_counter()
    published = fgv.recover()
    recover_s = time.perf_counter() - t0
    stats = fgv.stats()
    if published != [1] or stats["online_rows"] != len(frame) or stats["offline_rows"] != len(frame):
        raise AssertionError(f"recover() left {stats}")
    return {"failed_insert_s": round(failed_s, 2), "online_rows_before": online_before,
            "recover_s": round(recover_s, 2), "online_rows": stats["online_rows"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--txn-rows", type=int, default=DatabaseConfig().max_txn_rows)
    ap.add_argument("--repeats", type=int, default=2, help="inserts per case, the cases alternating")
    ap.add_argument("--group", choices=tuple(GROUPS), default="articles")
    a = ap.parse_args()
    json_lines_only()
    group = GROUPS[a.group]
    frame = make_frame(a.group, a.rows)
    frame_mb = round(float(frame.memory_usage(deep=True).sum()) / 2**20, 1)
    with tempfile.TemporaryDirectory(prefix="rayrec-bench-") as tmp:
        cfg = DatabaseConfig(port=free_port(), database="bench", user="bench", password_env="RAYREC_BENCH_UNSET")
        db = LocalMariaDB(Workdir.at(tmp), cfg, buffer_pool_size="2G")
        db.start()
        store = MySQLOnlineStore.from_config(cfg, db.password())
        try:
            engine = store.server_info()["engine"]
            cases = {"one_transaction": a.rows, "transactions": a.txn_rows}
            times: dict[str, list[float]] = {c: [] for c in cases}
            growth: dict[str, list[float]] = {c: [] for c in cases}
            for r in range(a.repeats):  # alternate the order: the first insert pays the cold start
                for case, txn_rows in (list(cases.items()) if r % 2 == 0 else list(cases.items())[::-1]):
                    seconds, grew_mb = in_fresh_process(tmp, cfg, db.password(), a.group, a.rows, txn_rows)
                    times[case].append(seconds)
                    growth[case].append(grew_mb)
            base = float(np.mean(times["one_transaction"]))
            for case, txn_rows in cases.items():
                mean = float(np.mean(times[case]))
                emit("feature_insert", case=case, group=a.group, rows=a.rows, max_txn_rows=txn_rows,
                     transactions=-(-a.rows // txn_rows), engine=engine, insert_s=round(mean, 2),
                     insert_runs_s=[round(t, 2) for t in times[case]], rows_per_s=round(a.rows / mean),
                     ratio_vs_one_transaction=round(mean / base, 3), frame_mb=frame_mb,
                     peak_rss_growth_mb=max(growth[case]), peak_rss_growth_runs_mb=growth[case],
                     ratio_peak_rss_growth_vs_one_transaction=round(max(growth[case]) / max(growth["one_transaction"]), 3))
            done = finish_after_failure(store, tmp, group, frame, a.txn_rows)
            emit("feature_insert", case="finish_after_failure", group=a.group, rows=a.rows, max_txn_rows=a.txn_rows, engine=engine,
                 **done, ratio_vs_one_transaction=round(done["recover_s"] / base, 3))
        finally:
            store.close()
            db.stop()


if __name__ == "__main__":
    main()
