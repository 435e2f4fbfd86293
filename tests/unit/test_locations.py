"""Shared locations: config `storage`, object-store URIs kept intact from config to the readers.

S3 cannot be reached here: URIs are checked as far as they go without a network, and the file
I/O runs on `file://` URIs (the same code path: pyarrow and LanceDB open them like s3://). The
index at a URI, end to end, is in test_index.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from common import locations
from common.config import ConfigError, load_config
from common.workdir import Workdir
from training.pipeline import checkpoint_location

S3 = "s3://rayrec-artifacts/prod/index"


def test_storage_config_takes_uris_and_paths_and_names_a_bad_one():
    cfg = load_config(None, {"storage": {"index_uri": S3, "checkpoint_uri": "file:///mnt/efs/ckpt"}})
    assert (cfg.storage.index_uri, cfg.storage.checkpoint_uri) == (S3, "file:///mnt/efs/ckpt")
    assert load_config(None).storage.index_uri is None
    assert load_config(None, {"storage": {"index_uri": "shared/index"}}).storage.index_uri == "shared/index"
    for bad in ("s3:/one-slash", "two words", ""):
        with pytest.raises(ConfigError, match="storage.index_uri: .*neither a path without ':' nor a URI"):
            load_config(None, {"storage": {"index_uri": bad}})
    with pytest.raises(ConfigError, match="storage.bucket"):
        load_config(None, {"storage": {"bucket": "x"}})


def test_cluster_run_config_points_at_object_storage_and_rondb():
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "cluster.yaml")
    assert locations.is_uri(cfg.storage.index_uri) and locations.is_uri(cfg.storage.checkpoint_uri)
    assert cfg.database.local is False and cfg.database.host not in ("127.0.0.1", "localhost")
    assert cfg.database.password_env == "RAYREC_DB_PASSWORD"
    assert cfg.serve.host == "0.0.0.0"


def test_join_keeps_the_scheme():
    assert locations.join(S3, "builds.json") == f"{S3}/builds.json"
    assert locations.join(S3 + "/", "a", "b") == f"{S3}/a/b"
    assert locations.join("/tmp/x", "builds.json") == "/tmp/x/builds.json"
    assert str(Path(S3) / "builds.json") != f"{S3}/builds.json"  # why join exists


def test_workdir_locations_round_trip(tmp_path):
    wd = Workdir.at(tmp_path / "run")
    assert wd.location(None, wd.index_dir) == str(wd.index_dir)
    assert wd.location("shared/index", wd.index_dir) == str(wd.root / "shared" / "index")
    assert wd.location(S3, wd.index_dir) == S3
    for loc in (S3, str(wd.index_dir), str(tmp_path / "elsewhere")):
        assert wd.from_ref(wd.to_ref(loc)) == loc
    assert wd.to_ref(wd.index_dir) == "index"  # inside the workdir: relative, so the workdir can move
    assert wd.to_ref(S3) == S3


def test_checkpoint_location_follows_the_config(tmp_path):
    wd = Workdir.at(tmp_path / "run")
    assert checkpoint_location(load_config(None), wd, "train") == str(wd.ray_dir / "train")
    cfg = load_config(None, {"storage": {"checkpoint_uri": "s3://b/ckpt"}})
    assert checkpoint_location(cfg, wd, "train") == "s3://b/ckpt/train"


def test_text_files_at_file_uris(tmp_path):
    uri = f"file://{tmp_path}/deep/er/builds.json"
    assert locations.read_text(uri) is None
    locations.write_text(uri, '{"a": 1}')
    assert locations.read_text(uri) == '{"a": 1}'
    assert (tmp_path / "deep" / "er" / "builds.json").read_text() == '{"a": 1}'
    locations.write_text(tmp_path / "local.json", "x")
    assert locations.read_text(str(tmp_path / "local.json")) == "x"
