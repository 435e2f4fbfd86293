import pytest
import yaml

from common.config import ConfigError, load_config
from ray_apps.app import serve_config


def test_defaults_and_demo_config_load():
    assert load_config().serve.host == "127.0.0.1"
    cfg = load_config("configs/demo.yaml")
    assert cfg.name == "demo" and cfg.eval.test_days == 7


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"two_tower": {"epoch": 3}}))
    with pytest.raises(ConfigError, match=r"two_tower\.epoch"):
        load_config(p)


def test_bad_identifier_rejected():
    with pytest.raises(ConfigError, match="database.database"):
        load_config(None, {"database": {"database": "x; DROP TABLE y"}})


def test_serve_config_is_accepted_by_serve_schema(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    conf = ServeDeploySchema.model_validate(serve_config(tmp_path, "127.0.0.1", 8000))
    assert conf.http_options.host == "127.0.0.1"
    assert conf.applications[0].import_path == "ray_apps.app:build_app"
    assert "haproxy_admission" not in conf.applications[0].args
    # the run answered from is the ingress's user_config (hot reload changes it, not the args)
    from ray_apps.app import Ingress

    (ingress,) = conf.applications[0].deployments
    assert ingress.name == Ingress.name and ingress.user_config == {"workdir": str(tmp_path)}
    local = ServeDeploySchema.model_validate(serve_config(tmp_path, "127.0.0.1", 8000, haproxy_admission=True))
    assert local.applications[0].args["haproxy_admission"] is True


def test_fused_calls_default_and_bad_value_named():
    assert load_config().serve.fused_calls == "coalesced"
    assert load_config(None, {"serve": {"fused_calls": "batched"}}).serve.fused_calls == "batched"
    with pytest.raises(ConfigError, match=r"serve\.fused_calls"):
        load_config(None, {"serve": {"fused_calls": "threads"}})


def test_database_tls_modes_and_a_ca_without_verify_are_named():
    assert load_config().database.tls == "preferred"
    assert load_config(None, {"database": {"tls": "verify", "tls_ca": "/etc/ca.pem"}}).database.tls_ca == "/etc/ca.pem"
    with pytest.raises(ConfigError, match=r"database\.tls"):
        load_config(None, {"database": {"tls": "on"}})
    with pytest.raises(ConfigError, match=r"tls_ca is only used with tls: verify"):
        load_config(None, {"database": {"tls": "required", "tls_ca": "/etc/ca.pem"}})
