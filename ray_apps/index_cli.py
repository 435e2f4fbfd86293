"""`rayrec index build | promote | rollback | list`: the item index's versions on a run's workdir.

build embeds the run's articles feature group with its item tower (Ray Data -> LanceDB), records
the new table version and, unless --no-promote, points the manifest at it. promote / rollback
point the manifest at another complete build in one atomic write; a serving `LiveItemIndex`
picks the change up without a restart, finishing running queries on the version they began on.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from common.artifacts import read_manifest
from common.workdir import Workdir
from ray_apps.cli import DEFAULT_WORKDIR


def cmd_index(args: argparse.Namespace) -> int:
    return {"build": _build, "promote": _promote, "rollback": _rollback, "list": _list}[args.index_command](args)


def _build(args: argparse.Namespace) -> int:
    wd = Workdir.at(args.workdir)
    manifest = read_manifest(wd)  # a pipeline run must exist: its articles and item tower are the input
    fg = manifest.feature_groups.get("articles")
    if fg is None:
        raise ValueError(f"{wd.manifest_path} has no articles feature group: run `rayrec pipeline` first")
    tower = manifest.models.get("item_tower")
    model_dir = wd.resolve(tower).parent if tower else wd.two_tower_dir
    ray = _ray(wd)
    from training.index import build_index, index_uri, promote

    try:
        built = build_index(wd.resolve(fg.offline_path), model_dir, index_uri(wd), progress=True,
                            text=not args.no_text, ann=args.ann)
    finally:
        if ray is not None:
            ray.shutdown()
    out: dict[str, Any] = {"version": built.version, "n_rows": built.n_rows, "dim": built.dim,
                           "engine": built.engine, "seconds": round(built.seconds, 1), "promoted": False}
    if not args.no_promote:
        ref = promote(wd, built.version)
        out["promoted"] = ref.version == built.version
    print(json.dumps(out))
    return 0


def _ray(wd: Workdir) -> Any:
    """Start a local Ray for the build unless this process already has one (returned to shut down)."""
    ray_mod = sys.modules.get("ray")
    if ray_mod is not None and ray_mod.is_initialized():
        return None
    from ray_apps.ray_auth import use_ray_token

    use_ray_token(wd)  # before Ray is imported: it reads RAY_AUTH_MODE once
    import ray

    from training.ray_session import init_ray

    init_ray(wd)
    return ray


def _promote(args: argparse.Namespace) -> int:
    from training.index import promote

    ref = promote(Workdir.at(args.workdir), args.version, force=args.force)
    print(json.dumps({"serving_version": ref.version, "table": ref.table, "n_rows": ref.n_rows}))
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from training.index import rollback

    ref = rollback(Workdir.at(args.workdir), args.version, force=args.force)
    print(json.dumps({"serving_version": ref.version, "table": ref.table, "n_rows": ref.n_rows}))
    return 0


def _list(args: argparse.Namespace) -> int:
    """One JSON line per complete build, oldest first; `serving` marks the manifest's version."""
    from training.index import index_uri, load_builds

    wd = Workdir.at(args.workdir)
    ref = read_manifest(wd).index
    for b in load_builds(index_uri(wd)).builds:
        row = {"version": b.version, "table": b.table, "serving": bool(ref and ref.version == b.version
                                                                      and ref.table == b.table),
               "n_rows": b.n_rows, "dim": b.dim, "text_dim": b.text_dim, "engine": b.engine,
               "ann": b.ann.index_type if b.ann else None, "built_at": b.built_at, "seconds": b.seconds}
        print(json.dumps(row))
    return 0


def add_index_commands(sub: Any) -> argparse.ArgumentParser:
    """Register `index build|promote|rollback|list` on the `rayrec` subparsers."""
    idx = sub.add_parser("index", help="item index versions: build | promote | rollback | list")
    isub = idx.add_subparsers(dest="index_command", required=True)

    def workdir(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--workdir", default=DEFAULT_WORKDIR, help="run directory (default %(default)s)")
        sp.set_defaults(func=cmd_index)

    b = isub.add_parser("build", help="embed the run's articles into a new index version and serve it")
    workdir(b)
    b.add_argument("--no-promote", action="store_true", help="record the build but keep serving the current one")
    b.add_argument("--no-text", action="store_true", help="skip the MiniLM text vectors (no semantic/hybrid search)")
    b.add_argument("--ann", default="auto", choices=["auto", "none", "IVF_SQ", "IVF_PQ", "IVF_HNSW_SQ"],
                   help="ANN index type (auto: from the table size; none: exact search only)")
    for name, text in (("promote", "serve a complete build (default: the newest)"),
                       ("rollback", "serve an older complete build (default: the one before the served one)")):
        sp = isub.add_parser(name, help=text)
        workdir(sp)
        sp.add_argument("--version", type=int, help="table version (see `rayrec index list`)")
        sp.add_argument("--force", action="store_true", help="switch even if built with another item tower")
    ls = isub.add_parser("list", help="complete builds, oldest first, and which one is served")
    workdir(ls)
    return idx


def main(argv: list[str] | None = None) -> int:
    """`python -m ray_apps.index_cli index ...`, with the CLI's error handling."""
    from common.artifacts import ManifestError

    p = argparse.ArgumentParser(prog="rayrec")
    add_index_commands(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except (ManifestError, ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
        print(f"rayrec: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
