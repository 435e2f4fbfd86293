"""The layout of a run's workdir: the only place that names files and folders.

Everything a pipeline run writes lives under one root (`.rayrec/<name>/`). Other modules
ask this class for paths instead of joining strings, so no file name is written twice.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.locations import is_uri

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
    def haproxy_dir(self) -> Path:
        """Serve's HAProxy files (common.ray_env.haproxy_files_env)."""
        return self.ray_dir / "haproxy"

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

    # shared locations (local folders or object-store URIs) ------------------------------------
    def location(self, configured: str | None, default: Path) -> str:
        """A configured location as something to open: a URI as given, a relative path under the
        root, None the workdir's `default`."""
        if configured is None:
            return str(default)
        return configured if is_uri(configured) else str(self.root / Path(configured).expanduser())

    def to_ref(self, location: str | Path) -> str:
        """How the manifest names a location: relative inside the workdir (so the workdir can
        move), else as given (an absolute path elsewhere, or a URI)."""
        if is_uri(location):
            return str(location)
        path = Path(location).resolve()
        return str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)

    def from_ref(self, ref: str) -> str:
        """A manifest location back to something to open (the inverse of `to_ref`)."""
        return ref if is_uri(ref) else str(self.root / ref)
