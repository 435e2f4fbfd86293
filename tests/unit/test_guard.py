"""The HTTP guard (API key, body size limit) as ASGI middleware on a small FastAPI app."""
from __future__ import annotations

import base64
import hashlib

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from ray_apps.app import Guard


def app_with(key: str | None, limit: int | None) -> TestClient:
    app = FastAPI()
    app.add_middleware(Guard)
    app.state.api_key_sha256 = hashlib.sha256(key.encode()).hexdigest() if key else None
    app.state.max_body_bytes = limit

    @app.post("/v1/echo")
    async def echo(request: Request) -> dict:
        body = await request.body()
        return {"n": len(body), "head": body[:8].decode()}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"ok": True}

    return TestClient(app)


def chunks(total: int, size: int = 1000):
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        yield b"a" * n
        sent += n


def test_api_key_is_checked_except_on_exempt_paths():
    c = app_with("s3cret", None)
    assert c.post("/v1/echo", content=b"x").status_code == 401
    assert c.post("/v1/echo", content=b"x", headers={"X-API-Key": "wrong"}).status_code == 401
    assert c.post("/v1/echo", content=b"x", headers={"X-API-Key": "s3cret"}).json()["n"] == 1
    assert c.post("/v1/echo", content=b"x", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    r = c.post("/v1/echo", content=b"x")
    assert r.headers["www-authenticate"] == "ApiKey" and "X-API-Key" in r.json()["message"]
    assert c.get("/healthz").status_code == 200


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_docs_need_the_key_and_ask_a_browser_for_it():
    c = app_with("s3cret", None)
    for path in ("/docs", "/openapi.json"):
        r = c.get(path)
        # HTTP Basic's challenge: a browser asks for the key and then sends it to the whole origin
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith('Basic realm="rayrec"'), path
        assert c.get(path, headers=basic("anyone", "wrong")).status_code == 401
        assert c.get(path, headers=basic("anyone", "s3cret")).status_code == 200
        assert c.get(path, headers={"X-API-Key": "s3cret"}).status_code == 200
    assert "/v1/echo" in c.get("/openapi.json", headers=basic("", "s3cret")).json()["paths"]
    # Basic reaches the API as well (Swagger UI's "Try it out" from a browser that has the key)
    assert c.post("/v1/echo", content=b"x", headers=basic("me", "s3cret")).status_code == 200
    for bad in ("Basic !!!", "Basic " + base64.b64encode(b"no-colon").decode(), "Basic", "Bearer ", "Digest s3cret"):
        assert c.post("/v1/echo", content=b"x", headers={"Authorization": bad}).status_code == 401, bad
    assert c.get("/docs").status_code == 401 and app_with(None, None).get("/docs").status_code == 200


@pytest.mark.parametrize("chunked", [False, True])
def test_body_limit_with_and_without_content_length(chunked):
    c = app_with(None, 5000)
    big = chunks(6000) if chunked else b"a" * 6000
    r = c.post("/v1/echo", content=big)
    assert r.status_code == 413 and "limit of 5000 bytes" in r.json()["message"]
    assert r.json()["message"].startswith("request body over" if chunked else "request body of 6000 bytes")
    ok = chunks(4500) if chunked else b"a" * 4500
    r = c.post("/v1/echo", content=ok)
    assert r.status_code == 200 and r.json() == {"n": 4500, "head": "aaaaaaaa"}  # the body reaches the handler whole


@pytest.mark.parametrize("key", ["clé-secrète", "tab\tkey", "line\nkey"])
def test_an_api_key_clients_cannot_all_send_alike_is_refused_by_name(monkeypatch, key):
    """X-API-Key 'clé' reaches the app as Latin-1 from one client and UTF-8 from another: such a
    key would work for some clients only (before, HTTP Basic alone)."""
    from ray_apps.app import api_key_hash

    monkeypatch.setenv("MY_KEY", key)
    with pytest.raises(ValueError, match=r"\$MY_KEY: the API key must be printable ASCII"):
        api_key_hash("MY_KEY")
    monkeypatch.setenv("MY_KEY", "s3cret-Key_1")
    assert api_key_hash("MY_KEY") == hashlib.sha256(b"s3cret-Key_1").hexdigest()
    monkeypatch.delenv("MY_KEY")
    assert api_key_hash("MY_KEY") is None
