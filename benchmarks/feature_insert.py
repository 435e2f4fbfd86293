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
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import emit  # noqa: E402
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


def timed_insert(fs: FeatureStore, group, frame) -> tuple[float, object]:
    fgv = fs.create_feature_group(group)
    t0 = time.perf_counter()
    fgv.insert(frame, validation="strict", event_time="2020-09-22")
    return time.perf_counter() - t0, fgv


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
    ap.add_argument("--group", choices=("articles", "customers"), default="articles")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    group = ARTICLES if a.group == "articles" else CUSTOMERS
    frame = synthetic_articles(article_ids(a.rows), rng) if a.group == "articles" else synthetic_customers(a.rows, rng)
    with tempfile.TemporaryDirectory(prefix="rayrec-bench-") as tmp:
        cfg = DatabaseConfig(port=free_port(), database="bench", user="bench", password_env="RAYREC_BENCH_UNSET")
        db = LocalMariaDB(Workdir.at(tmp), cfg, buffer_pool_size="2G")
        db.start()
        store = MySQLOnlineStore.from_config(cfg, db.password())
        try:
            engine = store.server_info()["engine"]
            cases = {"one_transaction": a.rows, "transactions": a.txn_rows}
            times: dict[str, list[float]] = {c: [] for c in cases}
            for _ in range(a.repeats):
                for case, txn_rows in cases.items():
                    seconds, _fgv = timed_insert(FeatureStore(Workdir.at(tmp), store, max_txn_rows=txn_rows), group,
                                                 frame)
                    times[case].append(seconds)
            base = float(np.mean(times["one_transaction"]))
            for case, txn_rows in cases.items():
                mean = float(np.mean(times[case]))
                emit("feature_insert", case=case, group=a.group, rows=a.rows, max_txn_rows=txn_rows,
                     transactions=-(-a.rows // txn_rows), engine=engine, insert_s=round(mean, 2),
                     insert_runs_s=[round(t, 2) for t in times[case]], rows_per_s=round(a.rows / mean),
                     ratio_vs_one_transaction=round(mean / base, 3))
            done = finish_after_failure(store, tmp, group, frame, a.txn_rows)
            emit("feature_insert", case="finish_after_failure", group=a.group, rows=a.rows, max_txn_rows=a.txn_rows, engine=engine,
                 **done, ratio_vs_one_transaction=round(done["recover_s"] / base, 3))
        finally:
            store.close()
            db.stop()


if __name__ == "__main__":
    main()
