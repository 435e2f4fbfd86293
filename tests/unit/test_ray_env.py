"""Where Serve's HAProxy files go (common.ray_env): in the folder given, never Ray's /tmp/haproxy-serve."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from common import ray_env
from common.ray_env import (
    HAPROXY_BASE_MAX_LEN,
    HAPROXY_FILE_VARIABLES,
    clear_haproxy_dir,
    haproxy_files_env,
    haproxy_link,
    new_head_haproxy_env,
    remove_haproxy_link,
)

NODE_ID = "f" * 56  # Ray names each node's folder by its 56-character id
UNIX_PATH_MAX = 107


@pytest.fixture()
def links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "links"
    d.mkdir()
    monkeypatch.setattr(ray_env, "LINK_DIR", d)
    return d


def test_a_link_in_tmp_is_short_enough_for_haproxys_sockets():
    link = ray_env._link_path(Path("/some/long/workdir/.rayrec/demo/ray/haproxy"))
    assert link.parent == Path("/tmp") and len(str(link)) <= HAPROXY_BASE_MAX_LEN
    # HAProxy binds <base>/<node id>/admin.sock.<pid>.tmp; Ray binds <base>/<node id>/metrics.sock
    assert len(f"{link}/{NODE_ID}/admin.sock.4194304.tmp") <= UNIX_PATH_MAX
    assert len(f"{link}/{NODE_ID}/metrics.sock") <= UNIX_PATH_MAX


def test_a_short_folder_is_named_directly(tmp_path: Path, links: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(ray_env, "HAPROXY_BASE_MAX_LEN", 10_000)
    d = tmp_path / "ray" / "haproxy"
    env = haproxy_files_env(d)
    assert d.is_dir() and not list(links.iterdir())
    assert env == {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{d}/haproxy.cfg",
                   "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{d}/admin.sock",
                   "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(d),
                   "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{d}/server-state",
                   "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{d}/metrics.sock"}


def test_a_long_folder_is_reached_through_a_link_and_the_files_land_in_it(tmp_path: Path, links: Path):
    d = tmp_path / ("x" * 40) / "ray" / "haproxy"
    env = haproxy_files_env(d)
    (link,) = links.iterdir()
    assert link.is_symlink() and os.readlink(link) == str(d)
    assert set(env) == set(HAPROXY_FILE_VARIABLES)
    assert all(v.startswith(str(link)) for v in env.values())
    # what Ray writes through the link is in the folder
    cfg = Path(env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"])
    (cfg.parent / NODE_ID).mkdir()
    (cfg.parent / NODE_ID / cfg.name).write_text("global\n")
    assert (d / NODE_ID / "haproxy.cfg").read_text() == "global\n"
    assert haproxy_files_env(d) == env  # the same link again


def test_a_stale_link_is_repointed_and_a_foreign_file_refused(tmp_path: Path, links: Path):
    d = tmp_path / "run" / "ray" / "haproxy"
    d.mkdir(parents=True)
    link = ray_env._link_path(d)
    link.symlink_to(tmp_path / "elsewhere")
    assert haproxy_link(d) == link and os.readlink(link) == str(d)
    link.unlink()
    link.write_text("not ours")
    with pytest.raises(RuntimeError, match=f"{link.name} exists and is not a link"):
        haproxy_link(d)
    assert link.read_text() == "not ours"


def test_stop_removes_only_its_own_link_and_a_new_head_clears_old_folders(tmp_path: Path, links: Path):
    d = tmp_path / "run" / "ray" / "haproxy"
    haproxy_files_env(d)
    (d / NODE_ID).mkdir()
    (d / NODE_ID / "admin.sock.1.1.stderr.log").write_text("old head")
    other = tmp_path / "other"
    other_link = links / "rrh-other"
    other_link.symlink_to(other)
    remove_haproxy_link(d)
    assert not ray_env._link_path(d).exists() and other_link.is_symlink()
    assert (d / NODE_ID).is_dir()  # HAProxy's output outlives the head until the next one starts
    clear_haproxy_dir(d)
    assert d.is_dir() and not list(d.iterdir())
    clear_haproxy_dir(tmp_path / "never-made")  # nothing to clear is fine


def test_a_relative_folder_is_linked_by_its_absolute_path(tmp_path: Path, links: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    rel = Path("y" * 40) / "ray" / "haproxy"
    haproxy_files_env(rel)
    (link,) = links.iterdir()
    assert os.readlink(link) == str(tmp_path / rel) and link.resolve() == (tmp_path / rel).resolve()
    remove_haproxy_link(rel)
    assert not list(links.iterdir())


def test_a_new_head_gets_an_emptied_folder_and_its_files_there(tmp_path: Path, links: Path):
    d = tmp_path / ("z" * 40) / "ray" / "haproxy"
    (d / NODE_ID).mkdir(parents=True)
    (d / NODE_ID / "haproxy.cfg").write_text("an earlier head's")
    env = new_head_haproxy_env(d)
    assert list(d.iterdir()) == []
    assert Path(env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]).resolve() == d.resolve() / "haproxy.cfg"


def test_stop_removes_the_link_of_a_head_that_died(tmp_path: Path, links: Path, monkeypatch: pytest.MonkeyPatch):
    """`rayrec stop` with no head listening (it died) still removes the link that head's start made."""
    from common.workdir import Workdir
    from ray_apps import local

    wd = Workdir.at(tmp_path / ("w" * 40))
    new_head_haproxy_env(wd.haproxy_dir)
    assert [p.name for p in links.iterdir()] == [ray_env._link_path(wd.haproxy_dir).name]
    monkeypatch.setattr(local, "_listening", lambda host, port: False)
    assert local.stop(wd) is False
    assert list(links.iterdir()) == []


def test_a_local_training_ray_has_train_poll_often_unless_the_user_said_otherwise(monkeypatch: pytest.MonkeyPatch):
    for name in ray_env.RAY_TRAIN_ENV:
        monkeypatch.delenv(name, raising=False)
    ray_env.use_train_env()
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.2"
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"  # a local Ray's node is never drained
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1.5")
    ray_env.use_train_env()
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "1.5"
