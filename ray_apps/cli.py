"""The `rayrec` command: a thin layer over functions that tests call directly."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.config import ConfigError, RayrecConfig, load_config
from common.workdir import Workdir

DEFAULT_WORKDIR = ".rayrec/demo"


def resolve_config(args: argparse.Namespace, wd: Workdir) -> RayrecConfig:
    """--config, else the run's saved config, else defaults; --db-port overrides the port."""
    over: dict = {}
    if getattr(args, "db_port", None):
        over["database"] = {"port": args.db_port}
    if args.config:
        return load_config(args.config, over)
    if wd.config_path.is_file():
        return load_config(wd.config_path, over)
    return load_config(None, {"name": wd.root.name, **over})


def cmd_db(args: argparse.Namespace) -> int:
    from feature_store.local_db import LocalMariaDB

    wd = Workdir.at(args.workdir)
    db = LocalMariaDB(wd, resolve_config(args, wd).database)
    if args.action == "start":
        print(json.dumps(db.start()))
    elif args.action == "stop":
        print("stopped" if db.stop() else "not running")
    else:
        print(json.dumps(db.status()))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from feature_store.sources import generate

    paths = generate(Path(args.out), seed=args.seed, customers=args.customers, articles=args.articles,
                     days=args.days, progress=True)
    for name, p in paths.items():
        print(f"{name}: {p}")
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from feature_store.dataset import check_columns, load_dataset_config
    from feature_store.sources import check_hm_files
    from ray_apps.ray_auth import use_ray_token

    if args.data and args.dataset:
        raise ValueError("give --data (a folder of H&M CSVs) or --dataset (a dataset config), not both")
    dataset = load_dataset_config(args.dataset) if args.dataset else None
    # a missing file or a wrong column name fails here, before the workdir, database or Ray
    if dataset is not None:
        check_columns(dataset)
    if args.data:
        check_hm_files(Path(args.data))
    wd = Workdir.at(args.workdir)
    cfg = resolve_config(args, wd)  # an invalid config fails here, before anything is written
    from feature_store.local_db import LocalMariaDB

    db = LocalMariaDB(wd, cfg.database) if cfg.database.local else None
    if db is not None:
        db.check_startable()  # a taken database port too
    use_ray_token(wd)  # the pipeline's own Ray instance keeps its token in the workdir too
    from feature_store.connect import open_online_store
    from training.pipeline import run_pipeline

    if db is not None:
        db.start()
    store = open_online_store(cfg.database, wd)
    try:
        run_pipeline(cfg, wd, Path(args.data) if args.data else None, store, dataset)
    finally:
        store.close()
    print(f"[pipeline] serve config: {write_serve_config(wd, cfg)}")
    return 0


def write_serve_config(wd: Workdir, cfg: RayrecConfig, working_dir: str | None = None,
                       proxy_location: str | None = None) -> Path:
    """Write the run's `serve_config.yaml`, which `serve deploy` takes.

    Args:
        working_dir: a code package for the app's runtime_env (`s3://bucket/rayrec-<sha>.zip`); None: the
            code installed on the nodes.
        proxy_location: Serve's HTTP proxies ("EveryNode" behind a load balancer on a cluster); None:
            the app's default.
    """
    import yaml

    from ray_apps.app import serve_config

    conf = serve_config(wd.root, cfg.serve.host, cfg.serve.port)
    if proxy_location is not None:
        conf["proxy_location"] = proxy_location
    if working_dir is not None:
        conf["applications"][0]["runtime_env"] = {"working_dir": working_dir}
    path = wd.root / "serve_config.yaml"
    path.write_text(yaml.safe_dump(conf, sort_keys=False))
    return path


def cmd_serve(args: argparse.Namespace) -> int:
    from ray_apps.ray_auth import use_ray_token

    wd = Workdir.at(args.workdir)
    if args.action == "config":
        from common.artifacts import read_manifest

        read_manifest(wd)  # a run must exist
        print(write_serve_config(wd, resolve_config(args, wd), args.working_dir, args.proxy_location))
        return 0
    if args.action == "stop":
        use_ray_token(wd)  # before Ray is imported: it reads RAY_AUTH_MODE once
        from ray_apps import local

        print("serving stopped" if local.stop(wd) else "serving was not running")
        return 0
    from common.artifacts import read_manifest

    cfg = resolve_config(args, wd)  # a bad config or a missing run fails before anything is written
    read_manifest(wd)
    from feature_store.local_db import LocalMariaDB

    db = LocalMariaDB(wd, cfg.database) if cfg.database.local else None
    if db is not None:
        db.check_startable()
    use_ray_token(wd)
    from ray_apps import local

    local.check_deployable(cfg, wd)  # a busy Serve port too, before the database starts
    if db is not None:
        db.start()
    url = local.deploy(cfg, wd)
    print(f"[serve] app {local.APP_NAME!r} at {url} (OpenAPI: {url}/docs)")
    sample = _sample_customers(wd, 3)
    if sample:
        for resp in local.sample_requests(url, sample):
            items = ", ".join(f"{i['article_id']} ({i['score']:.2f})" for i in resp["items"][:5])
            print(f"customer {resp['customer_id'][:12]}...: {items}, ... [{len(resp['items'])} items]")
        print("more:\n  " + local.curl_line(url, sample[0]))
    return 0


def _sample_customers(wd: Workdir, n: int) -> list[str]:
    """Customers with purchases, from the run's online history group (offline copy)."""
    import pandas as pd

    from common.artifacts import read_manifest

    ref = read_manifest(wd).feature_groups.get("customer_history")
    if ref is None:
        return []
    hist = pd.read_parquet(wd.resolve(ref.offline_path), columns=["customer_id", "n_purchases"])
    return hist.sort_values("n_purchases", ascending=False)["customer_id"].head(n).tolist()


def cmd_stop(args: argparse.Namespace) -> int:
    """Stop serving, Ray and the local database of the workdir."""
    from feature_store.local_db import LocalMariaDB
    from ray_apps.ray_auth import use_ray_token

    wd = Workdir.at(args.workdir)
    use_ray_token(wd)
    from ray_apps import local

    print("serving stopped" if local.stop(wd) else "serving was not running")
    print("database stopped" if LocalMariaDB(wd, resolve_config(args, wd).database).stop() else "database was not running")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rayrec", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--workdir", default=DEFAULT_WORKDIR, help="run directory (default %(default)s)")
        sp.add_argument("--config", help="YAML config (default: the run's saved config, else defaults)")
        sp.add_argument("--db-port", type=int, help="local database port (overrides the config)")

    db = sub.add_parser("db", help="local MariaDB: start | stop | status")
    db.add_argument("action", choices=["start", "stop", "status"])
    common(db)
    db.set_defaults(func=cmd_db)

    data = sub.add_parser("data", help="data tools")
    dsub = data.add_subparsers(dest="data_command", required=True)
    gen = dsub.add_parser("generate", help="write H&M-shaped synthetic data")
    gen.add_argument("--out", required=True)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--customers", type=int, default=4000)
    gen.add_argument("--articles", type=int, default=1500)
    gen.add_argument("--days", type=int, default=120)
    gen.set_defaults(func=cmd_data)

    pipe = sub.add_parser("pipeline", help="data -> features -> models -> index -> metrics")
    common(pipe)
    pipe.add_argument("--data", help="folder with the H&M CSVs (default: generate into WORKDIR/data)")
    pipe.add_argument("--dataset", help="dataset config YAML mapping your files to roles (see configs/datasets/)")
    pipe.set_defaults(func=cmd_pipeline)

    srv = sub.add_parser("serve", help="serve a run locally: start | stop; config: write serve_config.yaml")
    srv.add_argument("action", choices=["start", "stop", "config"])
    common(srv)
    srv.add_argument("--working-dir", help="config: code package URI for the app's runtime_env (s3://.../x.zip)")
    srv.add_argument("--proxy-location", choices=["HeadOnly", "EveryNode", "Disabled"],
                     help="config: where Serve runs HTTP proxies (default: the app's, HeadOnly)")
    srv.set_defaults(func=cmd_serve)

    stop = sub.add_parser("stop", help="stop serving, Ray and the local database")
    common(stop)
    stop.set_defaults(func=cmd_stop)

    from ray_apps.batch_cli import add_batch_commands
    from ray_apps.features_cli import add_features_commands
    from ray_apps.index_cli import add_index_commands  # these import DEFAULT_WORKDIR from here

    add_features_commands(sub)
    add_index_commands(sub)
    add_batch_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, LookupError, FileNotFoundError, RuntimeError) as e:
        print(f"rayrec: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
