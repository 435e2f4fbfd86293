import os

import pytest

from feature_store.sources import FILES
from ray_apps.cli import main


def test_data_generate_writes_the_hm_files(tmp_path, capsys):
    assert main(["data", "generate", "--out", str(tmp_path), "--customers", "50", "--articles", "30",
                 "--days", "20", "--seed", "1"]) == 0
    for name in FILES.values():
        assert (tmp_path / name).is_file()
    header = (tmp_path / FILES["transactions"]).read_text().splitlines()[0]
    assert header == "t_dat,customer_id,article_id,price,sales_channel_id"


def test_bad_parameter_is_named(tmp_path, capsys):
    assert main(["data", "generate", "--out", str(tmp_path), "--customers", "1"]) == 2
    assert "customers" in capsys.readouterr().err


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit):
        main(["nope"])


def test_serve_without_a_run_names_the_missing_manifest(tmp_path):
    """In a subprocess: `serve` sets Ray's auth variables, which Ray reads once per process."""
    import os
    import subprocess
    import sys

    cfg = tmp_path / "c.yaml"
    cfg.write_text("database: {local: false}\n")
    env = {**os.environ, "RAYREC_DB_PASSWORD": "unused"}
    out = subprocess.run([sys.executable, "-m", "ray_apps.cli", "serve", "start", "--workdir", str(tmp_path / "run"),
                          "--config", str(cfg)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and "manifest" in out.stderr
    assert not (tmp_path / "run").exists()  # nothing written for a run that is not there


@pytest.mark.parametrize("command", [["pipeline"], ["serve", "start"]])
def test_an_invalid_config_is_named_before_anything_is_written(tmp_path, command):
    """In a subprocess, as above: before the fix the Ray token was written to the workdir first."""
    import subprocess
    import sys

    cfg = tmp_path / "c.yaml"
    cfg.write_text("two_tower: {epochs: 0}\n")
    out = subprocess.run([sys.executable, "-m", "ray_apps.cli", *command, "--workdir", str(tmp_path / "run"),
                          "--config", str(cfg)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and f"{cfg}: invalid config: two_tower.epochs" in out.stderr
    assert not (tmp_path / "run").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_with_a_taken_port(tmp_path, command: list[str], config):
    """`rayrec <command> --config C` while another process listens on a port; `config(port)` is
    the config's text. Returns (the port, the finished process)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "c.yaml"
        cfg.write_text(config(port))
        out = subprocess.run([sys.executable, "-m", "ray_apps.cli", *command, "--config", str(cfg)],
                             capture_output=True, text=True, timeout=120)
    return port, out


def test_a_taken_database_port_fails_the_pipeline_before_the_workdir_is_made(tmp_path):
    """Before the fix the run's folder was left with a password file, a lock and a Ray token."""
    port, out = _cli_with_a_taken_port(tmp_path, ["pipeline", "--workdir", str(tmp_path / "run")],
                                       lambda port: f"database: {{port: {port}}}\n")
    assert out.returncode == 2 and f"port {port} on 127.0.0.1 is already in use" in out.stderr
    assert not (tmp_path / "run").exists()


def test_serve_start_names_a_busy_http_port_before_the_database_starts(tmp_path):
    """The order in `serve start`: the run, the database's port, Serve's port, and only then the database."""
    import socket

    from common.artifacts import new_manifest, write_manifest
    from common.workdir import Workdir
    from ray_apps.local import RAY_PORT

    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", RAY_PORT)) == 0:
            pytest.skip(f"a Ray head listens on {RAY_PORT}: serve start would skip the port check for it")
    wd = Workdir.at(tmp_path / "run")
    write_manifest(wd, new_manifest("run"))
    db_port = _free_port()
    port, out = _cli_with_a_taken_port(tmp_path, ["serve", "start", "--workdir", str(wd.root)],
                                       lambda port: f"database: {{port: {db_port}}}\nserve: {{port: {port}}}\n")
    assert out.returncode == 2 and f"port {port} on 127.0.0.1 is in use by another process" in out.stderr
    assert not wd.db_dir.exists()  # the database never started


def test_serve_config_for_a_cluster_ships_the_code_package(tmp_path, capsys):
    """`rayrec serve config` writes what `serve deploy` takes, with the code package in the runtime_env;
    Serve's own schema accepts it."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from common.artifacts import new_manifest, write_manifest
    from common.workdir import Workdir

    wd = Workdir.at(tmp_path / "run")
    write_manifest(wd, new_manifest("run"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("serve: {host: 0.0.0.0, port: 8123}\n")
    pkg = "s3://rayrec-artifacts/code/rayrec-abc123.zip"
    assert main(["serve", "config", "--workdir", str(wd.root), "--config", str(cfg), "--working-dir", pkg,
                 "--proxy-location", "EveryNode"]) == 0
    path = capsys.readouterr().out.strip()
    conf = yaml.safe_load(open(path))
    ServeDeploySchema.model_validate(conf)
    (app,) = conf["applications"]
    assert app["runtime_env"] == {"working_dir": pkg} and app["args"] == {"workdir": str(wd.root)}
    assert conf["proxy_location"] == "EveryNode" and conf["http_options"] == {"host": "0.0.0.0", "port": 8123}


def test_serve_config_without_a_run_names_the_missing_manifest(tmp_path, capsys):
    assert main(["serve", "config", "--workdir", str(tmp_path / "run")]) == 2
    assert "manifest" in capsys.readouterr().err


def test_a_ray_job_driver_keeps_the_clusters_token(tmp_path, monkeypatch):
    """Inside `ray job submit` (RAY_ADDRESS set) the workdir token must not replace the node's."""
    from common.workdir import Workdir
    from ray_apps.ray_auth import use_ray_token

    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    wd = Workdir.at(tmp_path / "run")
    assert use_ray_token(wd) is None
    assert "RAY_AUTH_TOKEN_PATH" not in os.environ and not (wd.ray_dir / "auth_token").exists()
    monkeypatch.delenv("RAY_ADDRESS")
    assert use_ray_token(wd) == wd.ray_dir / "auth_token"
    assert os.environ["RAY_AUTH_TOKEN_PATH"] == str(wd.ray_dir / "auth_token")
    assert os.environ["RAY_AUTH_MODE"] == "token"


def test_init_ray_joins_the_jobs_cluster_without_asking_for_cpus(tmp_path, monkeypatch):
    import ray

    from common.workdir import Workdir
    from training.ray_session import init_ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert init_ray(Workdir.at(tmp_path)) is True
    monkeypatch.delenv("RAY_ADDRESS")
    assert init_ray(Workdir.at(tmp_path)) is True
    assert "num_cpus" not in calls[0] and calls[1]["num_cpus"] == 2
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    assert init_ray(Workdir.at(tmp_path)) is False and len(calls) == 2


def test_a_busy_http_port_is_named_before_a_head_starts():
    """`serve start` checks Serve's port first: a proxy that cannot bind it would leave serve.run waiting."""
    import socket

    from ray_apps.local import check_port_free

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for host in ("127.0.0.1", "0.0.0.0"):  # a cluster config's wildcard is checked on loopback
            with pytest.raises(RuntimeError, match=f"port {port} on {host} is in use by another process"):
                check_port_free(host, port)
    check_port_free("127.0.0.1", port)  # closed: free again
