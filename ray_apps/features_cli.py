"""`rayrec features build | describe | validate`: the feature store from the command line.

    rayrec features build    --workdir DIR [--data DIR | --dataset CONFIG.yaml] [--config C] [--db-port P]
                             [--backfill-weeks N]
        compute the feature groups from the raw data (H&M files, or any files a dataset config
        maps onto roles) and write each as a new version (offline Parquet + online tables);
        prints the new versions' references as JSON. With --backfill-weeks N the snapshot
        groups are also written as of each of the data's last N weeks, so that point-in-time
        training data over them sees the values each label's week saw
    rayrec features describe --workdir DIR [--json]
        every group and version: online table, rows offline and online, last insert, freshness
    rayrec features validate --workdir DIR [--data DIR | --dataset CONFIG.yaml] [--group NAME ...]
        compute the groups and check them against their expectations without writing;
        exit status 1 when a rule fails
    rayrec features retire   --workdir DIR [--keep 2 | --version V] [--group NAME ...] [--dry-run] [--json]
        drop the online tables of all but the newest --keep versions of each group (or of one
        --version), never a version the workdir's manifest serves; their Parquet files stay

Registered by `ray_apps.cli` with `add_features_commands(subparsers)`; each command is a thin
layer over a function tests call directly (`build_features`, `describe_features`, `validate_features`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from common.config import RayrecConfig
from common.workdir import Workdir
from feature_store.dataset import DatasetConfig
from feature_store.groups import FeatureGroup
from feature_store.transforms import SERVING_GROUPS

DEFAULT_WORKDIR = ".rayrec/demo"
GROUP_ORDER = SERVING_GROUPS


def add_features_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `features build|describe|validate|retire` to the `rayrec` parser."""
    p = subparsers.add_parser("features", help="feature store: build | describe | validate | retire")
    sub = p.add_subparsers(dest="features_command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--workdir", default=DEFAULT_WORKDIR, help="run directory (default %(default)s)")
        sp.add_argument("--config", help="YAML config (default: the run's saved config, else defaults)")
        sp.add_argument("--db-port", type=int, help="local database port (overrides the config)")

    build = sub.add_parser("build", help="compute the feature groups and write new versions")
    common(build)
    build.add_argument("--data", help="folder with the H&M CSVs (default: WORKDIR/data, generated when missing)")
    build.add_argument("--dataset", help="dataset config YAML mapping your files to roles (see configs/datasets/)")
    build.add_argument("--group", action="append", choices=GROUP_ORDER, help="only these groups (repeatable)")
    build.add_argument("--validation", choices=["strict", "always"], default="strict",
                       help="strict: a failed rule writes nothing (default); always: write and report")
    build.add_argument("--backfill-weeks", type=int, default=0, metavar="N",
                       help="also write the snapshot groups as of each of the data's last N weeks (default 0)")
    build.set_defaults(func=cmd_build)

    desc = sub.add_parser("describe", help="groups, versions, row counts and freshness")
    common(desc)
    desc.add_argument("--json", action="store_true", help="one JSON object per group version")
    desc.set_defaults(func=cmd_describe)

    val = sub.add_parser("validate", help="check computed groups against their expectations (no writes)")
    common(val)
    val.add_argument("--data", help="folder with the H&M CSVs (default: WORKDIR/data)")
    val.add_argument("--dataset", help="dataset config YAML mapping your files to roles (see configs/datasets/)")
    val.add_argument("--group", action="append", choices=GROUP_ORDER, help="only these groups (repeatable)")
    val.set_defaults(func=cmd_validate)

    ret = sub.add_parser("retire", help="drop old versions' online tables (their Parquet files stay)")
    common(ret)
    which = ret.add_mutually_exclusive_group()
    which.add_argument("--keep", type=int, default=2,
                       help="newest versions of each group left online (default %(default)s: the served one and "
                            "the one before, which an app not yet reloaded may still read)")
    which.add_argument("--version", type=int, help="retire this one version (needs one --group)")
    ret.add_argument("--group", action="append", help="only these groups (repeatable; default: all)")
    ret.add_argument("--dry-run", action="store_true", help="list what would be retired; change nothing")
    ret.add_argument("--json", action="store_true", help="one JSON object per version")
    ret.set_defaults(func=cmd_retire)


# ---------------------------------------------------------------------------------------------
# functions (tested directly)


def compute_groups(source: Path | DatasetConfig, names: list[str] | None = None
                   ) -> tuple[dict[str, pd.DataFrame], dict[str, FeatureGroup]]:
    """The feature-group frames computed from the raw files, as of the end of the data, and the
    groups' definitions for the dataset's roles. `source`: a folder of H&M CSVs or a dataset config."""
    from feature_store.transforms import serving_frames

    data, groups = _load(source)
    return serving_frames(data, names), groups


def _load(source: Path | DatasetConfig) -> tuple[Any, dict[str, FeatureGroup]]:
    from feature_store.dataset import hm_dataset_config, load_dataset
    from feature_store.groups import dataset_groups

    config = hm_dataset_config(source) if isinstance(source, Path) else source
    data = load_dataset(config)
    return data, dataset_groups(data.roles)


def build_features(fs, source: Path | DatasetConfig, names: list[str] | None = None, validation: str = "strict",
                   event_time: Any = None, backfill_weeks: int = 0,
                   event_log_max_gap_days: int | None = None) -> dict[str, Any]:
    """Write every group (or `names`) as a new version; returns name -> FeatureGroupRef.

    With `event_log_max_gap_days` (None: not), the purchases serving logged in the workdir join
    the transactions first (`add_logged_purchases`), so a rebuilt group keeps what they changed.

    Snapshot groups (no event-time column) get `event_time`, default: now. With
    `backfill_weeks`, each snapshot group is first written as of every `backfill_times` time
    (only the purchases before it count; a static group such as the customer profiles once,
    at the first), so point-in-time joins of earlier labels find the values of their week."""
    from feature_store.store import prepare_frame
    from feature_store.transforms import STATIC_GROUPS, backfill_times, serving_frames
    from feature_store.validation import ValidationFailed, validate

    data, groups = _load(source)
    if event_log_max_gap_days is not None:
        from dataclasses import replace

        from feature_store.events import add_logged_purchases, describe_added

        tx, counts = add_logged_purchases(data.transactions, data.customers, data.articles, fs.wd,
                                          event_log_max_gap_days)
        if counts["logged"]:
            print(f"[features] {describe_added(counts)}", flush=True)
        data = replace(data, transactions=tx)
    frames = serving_frames(data, names)
    when = pd.Timestamp(event_time) if event_time is not None else pd.Timestamp.now(tz="UTC")
    times = backfill_times(data.transactions, backfill_weeks)
    if times and (when.tz_convert(None) if when.tzinfo else when) <= times[-1]:
        raise ValueError(f"event_time {when} must be after the last backfill time {times[-1].date()}")
    snapshots = [n for n, f in frames.items() if groups[n].event_time not in f]
    writes = []  # (group, frame, event time, label): every frame is computed and checked before any is written
    for i, as_of in enumerate(times):
        wanted = [n for n in snapshots if i == 0 or n not in STATIC_GROUPS]
        writes += [(n, f, as_of, f"as of {as_of.date()}") for n, f in serving_frames(data, wanted, as_of).items()
                   if len(f)]
    writes += [(n, f, None if n not in snapshots else when, "") for n, f in frames.items()]
    if validation == "strict":
        for name, frame, t, _ in writes:
            report = validate(groups[name], prepare_frame(groups[name], frame, t), "always")[0]
            if not report.ok:
                raise ValidationFailed(report)
    fgvs = {name: fs.create_feature_group(groups[name]) for name in frames}
    for name, frame, t, label in writes:
        _insert(fgvs[name], frame, validation, t, label)
    return {name: fgv.ref for name, fgv in fgvs.items()}


def _insert(fgv, frame: pd.DataFrame, validation: str, event_time: Any, label: str) -> None:
    result = fgv.insert(frame, validation=validation, event_time=event_time)
    for line in result.report.summary_lines():
        print(f"[features] {line}{f' ({label})' if label else ''}", flush=True)


def describe_features(fs) -> list[dict[str, Any]]:
    return fs.describe()


def validate_features(source: Path | DatasetConfig, names: list[str] | None = None) -> dict[str, Any]:
    """name -> ValidationReport of the computed frame (nothing is written)."""
    from feature_store.validation import validate

    out = {}
    now = pd.Timestamp.now(tz="UTC").tz_localize(None)
    frames, groups = compute_groups(source, names)
    for name, frame in frames.items():
        group = groups[name]
        if group.event_time not in frame.columns:
            frame = frame.assign(**{group.event_time: now})
        for f in group.features:
            if f.optional and f.column not in frame.columns:
                frame = frame.assign(**{f.column: None})
        out[name] = validate(group, frame, "always")[0]
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    cols = ["group", "version", "online_table", "offline_rows", "online_rows", "commits", "pending_commits",
            "max_event_time", "last_insert_at", "freshness_s", "online_retired_at"]
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# commands


def _config(args: argparse.Namespace, wd: Workdir) -> RayrecConfig:
    from ray_apps.cli import resolve_config  # the CLI's one config rule (lazy: cli registers us)

    return resolve_config(args, wd)


def _source(args: argparse.Namespace, wd: Workdir, cfg: RayrecConfig, generate_missing: bool
            ) -> Path | DatasetConfig:
    """What to compute the groups from: --dataset, --data, or the workdir's (generated) H&M data."""
    from feature_store.dataset import check_columns, load_dataset_config
    from feature_store.sources import FILES, check_hm_files, generate

    if args.data and args.dataset:
        raise ValueError("give --data (a folder of H&M CSVs) or --dataset (a dataset config), not both")
    if args.dataset:
        dataset = load_dataset_config(args.dataset)
        check_columns(dataset)  # a missing file or column fails here, before the database is touched
        return dataset
    if args.data:
        check_hm_files(Path(args.data))
        return Path(args.data)
    if not (wd.data_dir / FILES["transactions"]).exists():
        if not generate_missing:
            raise FileNotFoundError(f"no data in {wd.data_dir}: pass --data or run `rayrec features build` first")
        d = cfg.data
        generate(wd.data_dir, seed=d.seed, customers=d.customers, articles=d.articles, days=d.days, progress=True)
    return wd.data_dir


def _open_store(cfg: RayrecConfig, wd: Workdir, start_local: bool):
    from feature_store.connect import open_online_store
    from feature_store.local_db import LocalMariaDB

    if cfg.database.local:
        db = LocalMariaDB(wd, cfg.database)
        if start_local:
            db.start()
        elif not db.status()["running"]:
            return None
    return open_online_store(cfg.database, wd)


def cmd_build(args: argparse.Namespace) -> int:
    from feature_store.store import FeatureStore

    wd = Workdir.at(args.workdir)
    cfg = _config(args, wd)
    data = _source(args, wd, cfg, generate_missing=True)
    store = _open_store(cfg, wd, start_local=True)
    try:
        refs = build_features(FeatureStore(wd, store, max_txn_rows=cfg.database.max_txn_rows), data, args.group, args.validation,
                              backfill_weeks=args.backfill_weeks,
                              event_log_max_gap_days=cfg.data.event_log_max_gap_days if cfg.data.event_log else None)
    finally:
        if store is not None:
            store.close()
    print(json.dumps({n: r.model_dump() for n, r in refs.items()}, indent=2))
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    from feature_store.store import FeatureStore

    wd = Workdir.at(args.workdir)
    cfg = _config(args, wd)
    try:
        store = _open_store(cfg, wd, start_local=False)
    except (ConnectionError, RuntimeError) as e:
        print(f"[features] online store not reachable ({e}): offline figures only", file=sys.stderr)
        store = None
    if store is None:
        print("[features] online store not running: offline figures only", file=sys.stderr)
    try:
        rows = describe_features(FeatureStore(wd, store))
    finally:
        if store is not None:
            store.close()
    from feature_store.events import event_log_summary

    events = event_log_summary(wd)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        print(json.dumps({"event_log": events}))
        return 0
    print(format_table(rows) if rows else f"no feature groups in {wd.offline_dir}")
    if events["purchases"] or events["interactions"]:
        span = f" ({events['first_purchase']} .. {events['last_purchase']})" if events["purchases"] else ""
        print(f"event log: {events['purchases']} purchases{span}, {events['interactions']} views/clicks/add-to-carts; "
              "the next `rayrec pipeline` or `features build` here reads it (data.event_log)")
    return 0


def retire_features(fs, keep: int = 2, version: int | None = None, groups: list[str] | None = None,
                    dry_run: bool = False) -> list[dict[str, Any]]:
    """`FeatureStore.retire_online` (or `retire_version` with `version`), protecting every
    version the workdir's manifest names."""
    from common.artifacts import read_manifest

    protect = read_manifest(fs.wd).served_versions() if fs.wd.manifest_path.is_file() else set()
    if version is not None:
        if not groups or len(groups) != 1:
            raise ValueError("--version needs exactly one --group")
        return [fs.retire_version(groups[0], version, protect, dry_run)]
    return fs.retire_online(keep, protect, groups, dry_run)


def cmd_retire(args: argparse.Namespace) -> int:
    from feature_store.store import FeatureStore

    wd = Workdir.at(args.workdir)
    cfg = _config(args, wd)
    store = _open_store(cfg, wd, start_local=True)
    try:
        retired = retire_features(FeatureStore(wd, store), args.keep, args.version, args.group, args.dry_run)
    finally:
        if store is not None:
            store.close()
    if args.json:
        for r in retired:
            print(json.dumps({**r, "dry_run": args.dry_run}))
        return 0
    verb = "would drop" if args.dry_run else "dropped"
    for r in retired:
        print(f"[features] {r['group']} v{r['version']}: {verb} online table {r['online_table']} "
              f"({r['online_rows']:,} rows); its Parquet files stay")
    if not retired:
        print("[features] nothing to retire")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    wd = Workdir.at(args.workdir)
    cfg = _config(args, wd)
    reports = validate_features(_source(args, wd, cfg, generate_missing=False), args.group)
    for report in reports.values():
        for line in report.summary_lines():
            print(line)
    return 0 if all(r.ok for r in reports.values()) else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m ray_apps.features_cli features ...` (the same commands without `rayrec`)."""
    p = argparse.ArgumentParser(prog="rayrec")
    add_features_commands(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError, LookupError) as e:
        print(f"rayrec: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
