"""cluster.yaml is checked against Ray's own cluster-config schema (what `ray up` validates)."""
import copy
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _validated(config: dict) -> dict:
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    full = fillout_defaults(copy.deepcopy(config))
    validate_config(full)
    return full


def test_cluster_yaml_passes_rays_schema():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    full = _validated(config)
    types = full["available_node_types"]
    assert full["head_node_type"] == "head"
    assert types["gpu_training"]["resources"]["GPU"] == 1 and types["gpu_training"]["min_workers"] == 0
    assert types["cpu_serving"]["max_workers"] >= types["cpu_serving"]["min_workers"] >= 1
    commands = " ".join(full["setup_commands"] + full["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in commands


def _start_commands(config: dict) -> list[str]:
    return [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]


def test_every_node_starts_with_token_auth_and_the_shared_token():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    starts = _start_commands(config)
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)
    # the token file is copied from outside the repository to Ray's default path on every node
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"


def test_the_database_password_comes_only_from_the_secret_store():
    """Every node exports the variable configs/cluster.yaml names, and only from Secrets Manager."""
    from common.config import load_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    env = load_config(ROOT / "configs" / "cluster.yaml").database.password_env
    text = (ROOT / "cluster.yaml").read_text()
    for cmd in _start_commands(config):
        assert re.search(rf'export {env}="\$\(\S*aws secretsmanager get-secret-value [^)]*\)" && ', cmd), cmd
    assignments = _assigned_values(text, env)
    assert assignments and all(v.startswith('"$(') for v in assignments), assignments


def _assigned_values(text: str, env: str) -> list[str]:
    """What `env` is set to anywhere in the text (shell `=` or YAML `:`)."""
    return re.findall(rf"{env}\s*[=:]\s*(\S+)", text)


def test_the_password_check_catches_a_literal_secret():
    assert _assigned_values("export RAYREC_DB_PASSWORD=hunter2 && ray start", "RAYREC_DB_PASSWORD") == ["hunter2"]
    assert _assigned_values("env: {RAYREC_DB_PASSWORD: hunter2}", "RAYREC_DB_PASSWORD") == ["hunter2}"]


def test_schema_check_catches_a_typo():
    import jsonschema

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["available_node_types"]["cpu_serving"]["min_wokers"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_wokers"):
        _validated(config)
