"""`rayrec recommend-batch`: the serving pipeline for every customer (or a list), with Ray Data.

Registered by `ray_apps.cli` through `add_batch_commands(subparsers)`; the work itself is
`training.batch.recommend_batch`, which tests call directly.
"""
from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def add_batch_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `recommend-batch` to the `rayrec` command."""
    p = subparsers.add_parser(
        "recommend-batch",
        help="retrieve -> filter -> rank for every customer (or a list) with Ray Data; writes Parquet",
        description="Writes customer_id, rank, article_id, score for each customer: the same pipeline "
                    "and online state as POST /v1/recommend.",
    )
    p.add_argument("--workdir", default=".rayrec/demo", help="the pipeline run (default %(default)s)")
    p.add_argument("--out", required=True, help="output Parquet file")
    p.add_argument("--k", type=_positive, default=100, help="articles per customer (default %(default)s)")
    p.add_argument("--customers", help="file with one customer id per line (default: every customer)")
    p.add_argument("--customer", action="append", help="a customer id (repeatable)")
    p.add_argument("--date", type=_date, help="the day the lists are for (default: today, as the HTTP API)")
    p.add_argument("--channel", type=int, choices=[1, 2], default=2, help="1 store, 2 online (default 2)")
    p.add_argument("--batch-size", type=_positive, default=256, help="customers per Ray Data batch")
    p.add_argument("--db-port", type=int, help="local database port (overrides the run's config)")
    p.set_defaults(func=cmd_recommend_batch)


def _customer_ids(args: argparse.Namespace) -> list[str] | None:
    ids: list[str] = list(args.customer or [])
    if args.customers:
        path = Path(args.customers)
        if not path.is_file():
            raise FileNotFoundError(f"--customers: no such file: {path}")
        ids += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return ids or None


def cmd_recommend_batch(args: argparse.Namespace) -> int:
    from common.config import load_config
    from common.workdir import Workdir
    from ray_apps.ray_auth import use_ray_token

    wd = Workdir.at(args.workdir)
    use_ray_token(wd)  # before Ray is imported: it reads RAY_AUTH_MODE once
    import ray

    from feature_store.local_db import LocalMariaDB
    from training.batch import recommend_batch

    if not wd.config_path.is_file():
        raise FileNotFoundError(f"no run at {wd.root}: run `rayrec pipeline --workdir {wd.root}` first")
    cfg = load_config(wd.config_path, {"database": {"port": args.db_port}} if args.db_port else None)
    if cfg.database.local:
        LocalMariaDB(wd, cfg.database).start()
    from training.ray_session import init_ray

    started = init_ray(wd)
    try:
        res = recommend_batch(wd, Path(args.out), k=args.k, customer_ids=_customer_ids(args), day=args.date,
                              channel=args.channel, database=cfg.database, batch_size=args.batch_size)
    finally:
        if started:
            ray.shutdown()
    print(f"[recommend-batch] {res.rows} rows for {res.customers} customers in {res.seconds:.1f}s -> {res.path}")
    return 0
