"""The web page's routes: the page and its assets, and nothing else from the disk."""
from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from ray_apps.web import WEB_DIR, asset_path, mount_ui


@pytest.fixture()
def client() -> TestClient:
    api = FastAPI()
    mount_ui(api)
    return TestClient(api)


def test_page_and_assets_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/ui/app.js"' in page.text and 'href="/ui/style.css"' in page.text
    js = client.get("/ui/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert "/v1/recommend" in js.text and "X-API-Key" in js.text
    assert client.get("/ui/style.css").headers["content-type"].startswith("text/css")


@pytest.mark.parametrize("name", ["../web.py", "..%2Fweb.py", "%2e%2e/app.py", "/etc/passwd", "nope.js", "",
                                  "sub/../../web.py"])
def test_no_file_outside_the_web_folder(client, name):
    r = client.get(f"/ui/{name}")
    assert r.status_code == 404
    assert "def mount_ui" not in r.text and "root:" not in r.text


def test_asset_path_refuses_traversal_and_links_out(tmp_path):
    root = tmp_path / "web"
    root.mkdir()
    (root / "a.js").write_text("x")
    (tmp_path / "secret.txt").write_text("s")
    (root / "link.txt").symlink_to(tmp_path / "secret.txt")
    assert asset_path("a.js", root) == (root / "a.js").resolve()
    for bad in ("../secret.txt", "link.txt", str(tmp_path / "secret.txt"), ".", "a.js\x00.png", ""):
        assert asset_path(bad, root) is None, bad


def test_page_needs_no_cdn_or_build_step():
    """Every file the page loads is ours and local: no http(s) URL in HTML, JS or CSS."""
    import re

    for f in ("index.html", "app.js", "style.css"):
        text = (WEB_DIR / f).read_text()
        assert not re.search(r"""(src|href)=["']https?://|url\(["']?https?://|import .* from ["']https?://""", text), f


def test_the_serve_app_mounts_the_page():
    from ray_apps.app import EXEMPT_PATHS, PUBLIC_PREFIXES, api

    paths = {getattr(r, "path", None) for r in api.routes}
    assert {"/", "/ui/{name:path}"} <= paths
    assert "/" in EXEMPT_PATHS and "/ui/".startswith(PUBLIC_PREFIXES)
