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
