"""The artifact manifest: what a run produced, written by the pipeline and read by serving.

Serving never guesses a file name: it opens the manifest and follows the paths in it.
Writes are atomic (temp file + rename) so a reader never sees half a manifest.
"""
from __future__ import annotations

import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from common.workdir import Workdir

MANIFEST_FORMAT = 1


class FeatureGroupRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int
    offline_path: str
    online_table: str | None = None
    primary_key: list[str]


class IndexRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    uri: str
    table: str
    version: int
    dim: int
    n_rows: int


class Manifest(BaseModel):
    """Everything serving needs to find, by relative path inside the workdir."""

    model_config = ConfigDict(extra="forbid")
    format: int = MANIFEST_FORMAT
    run_name: str
    created_at: str
    feature_groups: dict[str, FeatureGroupRef] = {}
    feature_views: dict[str, int] = {}
    models: dict[str, str] = {}
    index: IndexRef | None = None
    metrics: str | None = None
    extra: dict[str, Any] = {}

    def served_versions(self) -> set[tuple[str, int]]:
        """(group, version) of every feature group this manifest serves: what must stay online."""
        return {(name, ref.version) for name, ref in self.feature_groups.items()}


class ManifestError(RuntimeError):
    pass


def new_manifest(run_name: str) -> Manifest:
    return Manifest(run_name=run_name, created_at=datetime.now(UTC).isoformat(timespec="seconds"))


def write_manifest(wd: Workdir, manifest: Manifest) -> Path:
    atomic_write_text(wd.manifest_path, manifest.model_dump_json(indent=2))
    return wd.manifest_path


def read_manifest(wd: Workdir) -> Manifest:
    p = wd.manifest_path
    if not p.is_file():
        raise ManifestError(f"no manifest at {p}: run `rayrec pipeline --workdir {wd.root}` first")
    try:
        return Manifest.model_validate_json(p.read_text())
    except ValueError as e:
        raise ManifestError(f"{p}: unreadable manifest: {e}") from e


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
