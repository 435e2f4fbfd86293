"""The web page: `GET /` and its static assets under `/ui/`, served by the Serve app itself.

Plain files in `ray_apps/web/` (HTML, JS, CSS; no build step, nothing fetched from elsewhere).
The auth middleware lets `/` and `/ui/...` through without a key; the page asks for the key and
sends it with every API call.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse

WEB_DIR = Path(__file__).with_name("web")
NO_CACHE = {"Cache-Control": "no-cache"}


def asset_path(name: str, root: Path = WEB_DIR) -> Path | None:
    """The file `name` under `root`, or None when it is not a file there (`..`, absolute paths and
    links that lead out of `root` included)."""
    if not name or "\x00" in name:
        return None
    base = root.resolve()
    path = (base / name).resolve()
    if not path.is_relative_to(base) or not path.is_file():
        return None
    return path


def mount_ui(api: FastAPI) -> None:
    """Add `GET /` (the page) and `GET /ui/{path}` (its assets) to `api` as plain routes."""

    @api.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers=NO_CACHE)

    @api.get("/ui/{name:path}", include_in_schema=False)
    async def asset(name: str) -> FileResponse:
        path = asset_path(name)
        if path is None:
            raise HTTPException(status_code=404, detail=f"no such file: /ui/{name}")
        return FileResponse(path, headers=NO_CACHE)
