"""The typed config tree, loaded once at the entry point and passed down.

Every section forbids unknown keys so a typo in a YAML file is an error naming the key,
not a silently ignored setting. Secrets are never stored here: only the name of the
environment variable that holds them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    """Size and seed of the generated H&M-shaped dataset."""

    customers: int = Field(4000, ge=10)
    articles: int = Field(1500, ge=10)
    days: int = Field(120, ge=14)
    seed: int = 0


class DatabaseConfig(_Strict):
    """The online store: RonDB in production, a local MariaDB for demo and tests."""

    host: str = "127.0.0.1"
    port: int = Field(3307, ge=1, le=65535)
    database: str = Field("rayrec", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
    user: str = Field("rayrec", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,31}$")
    password_env: str = "RAYREC_DB_PASSWORD"
    # Start and stop a local MariaDB inside the workdir; false when pointing at RonDB.
    local: bool = True


class TwoTowerConfig(_Strict):
    """Retrieval model size and training schedule."""

    embedding_dim: int = Field(32, ge=4)
    output_dim: int = Field(64, ge=4)
    hidden_dims: list[int] = [128]
    temperature: float = Field(0.05, gt=0)
    history_len: int = Field(20, ge=1)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(512, ge=8)
    learning_rate: float = Field(0.005, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    num_workers: int = Field(1, ge=1)
    seed: int = 0


class RankerConfig(_Strict):
    """CatBoost ranker over retrieval candidates."""

    iterations: int = Field(300, ge=1)
    depth: int = Field(6, ge=1, le=16)
    learning_rate: float = Field(0.1, gt=0)
    n_candidates: int = Field(100, ge=1)
    max_train_customers: int = Field(2000, ge=10)
    seed: int = 0


class EvalConfig(_Strict):
    """Time split: the last `test_days` days of transactions are held out (the Kaggle protocol)."""

    test_days: int = Field(7, ge=1)
    max_customers: int = Field(5000, ge=1)


class ServeConfig(_Strict):
    """HTTP binding and per-stage sizes for the Serve app."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    n_candidates: int = Field(100, ge=1, le=1000)
    num_cpus: float = Field(0.25, gt=0)


class RayrecConfig(_Strict):
    """Root of the config tree."""

    name: str = Field("demo", pattern=r"^[A-Za-z0-9_.-]+$")
    data: DataConfig = DataConfig()
    database: DatabaseConfig = DatabaseConfig()
    two_tower: TwoTowerConfig = TwoTowerConfig()
    ranker: RankerConfig = RankerConfig()
    eval: EvalConfig = EvalConfig()
    serve: ServeConfig = ServeConfig()


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the key."""


def load_config(path: str | os.PathLike[str] | None = None, overrides: dict[str, Any] | None = None) -> RayrecConfig:
    """Read a YAML config (or the defaults) and apply nested overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
    raw = _merge(raw, overrides or {})
    try:
        return RayrecConfig.model_validate(raw)
    except ValidationError as e:
        where = f"{path}: " if path else ""
        msgs = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"{where}invalid config: {msgs}") from e


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out.get(k) or {}, v) if isinstance(v, dict) else v
    return out
