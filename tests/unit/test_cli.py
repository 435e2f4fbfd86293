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


def test_serve_without_a_run_names_the_missing_manifest(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAYREC_DB_PASSWORD", "unused")
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):  # the CLI sets them; restore after
        monkeypatch.delenv(var, raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("database: {local: false}\n")
    assert main(["serve", "start", "--workdir", str(tmp_path / "run"), "--config", str(cfg)]) == 2
    assert "manifest" in capsys.readouterr().err
