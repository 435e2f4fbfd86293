"""cluster.yaml is checked against Ray's own cluster-config schema (what `ray up` validates)."""
import copy
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
    assert "RAY_AUTH_MODE=token" in commands and "password" not in commands.lower()


def test_schema_check_catches_a_typo():
    import jsonschema

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["available_node_types"]["cpu_serving"]["min_wokers"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_wokers"):
        _validated(config)
