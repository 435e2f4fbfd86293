"""The layout of a run's workdir: the only place that names files and folders.

Everything a pipeline run writes lives under one root (`.rayrec/<name>/`). Other modules
ask this class for paths instead of joining strings, so no file name is written twice.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RAY_TEMP_MAX_LEN = 40


@dataclass(frozen=True)
class Workdir:
    root: Path

    @classmethod
    def at(cls, path: str | Path) -> Workdir:
        return cls(Path(path).expanduser().resolve())

    # raw data -----------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    # local database ---------------------------------------------------------------
    @property
    def db_dir(self) -> Path:
        return self.root / "db"

    @property
    def db_password_file(self) -> Path:
        return self.db_dir / "password"

    # feature store ------------------------------------------------------------------
    @property
    def offline_dir(self) -> Path:
        return self.root / "feature_store" / "offline"

    @property
    def views_dir(self) -> Path:
        return self.root / "feature_store" / "views"

    # models -------------------------------------------------------------------------
    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def two_tower_dir(self) -> Path:
        return self.models_dir / "two_tower"

    @property
    def ranker_path(self) -> Path:
        return self.models_dir / "ranker" / "ranker.cbm"

    @property
    def popularity_path(self) -> Path:
        return self.models_dir / "popularity.json"

    # index, ray, reports --------------------------------------------------------------
    @property
    def index_dir(self) -> Path:
        return self.root / "index"

    @property
    def ray_dir(self) -> Path:
        return self.root / "ray"

    @property
    def ray_temp_dir(self) -> Path | None:
        """Ray's session files inside the workdir, unless the path is too long for the unix
        sockets Ray creates under it (108 bytes with ~62 of Ray's own): then Ray's default."""
        path = self.ray_dir / "tmp"
        return path if len(str(path)) <= RAY_TEMP_MAX_LEN else None

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def metrics_path(self) -> Path:
        return self.reports_dir / "metrics.json"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def predictions_dir(self) -> Path:
        """Serving's prediction log (JSON lines per day), joined later with events."""
        return self.logs_dir / "predictions"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    def relative(self, path: Path) -> str:
        """Paths in the manifest are relative, so a workdir can be moved or copied."""
        return str(Path(path).resolve().relative_to(self.root))

    def resolve(self, rel: str) -> Path:
        return self.root / rel
