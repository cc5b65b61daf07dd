"""Every API route requires a key; model management requires admin; Host checks stop DNS rebinding."""

import httpx
import pytest

from tests.conftest import run_cli

READ_ROUTES = [
    ("POST", "/api/generate", {"model": "tiny", "prompt": "hi", "stream": False, "options": {"num_predict": 1}}),
    ("POST", "/api/chat", {"model": "tiny", "messages": [], "stream": False}),
    ("POST", "/api/embed", {"model": "all-minilm", "input": "x"}),
    ("POST", "/api/embeddings", {"model": "all-minilm", "prompt": "x"}),
    ("GET", "/api/tags", None),
    ("POST", "/api/show", {"model": "tiny"}),
    ("GET", "/api/ps", None),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
    ),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1}),
    ("POST", "/v1/embeddings", {"model": "all-minilm", "input": "x"}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/tiny", None),
]
ADMIN_ROUTES = [
    ("POST", "/api/copy", {"source": "tiny", "destination": "should-not-exist"}),
    ("DELETE", "/api/delete", {"model": "tiny"}),
    ("POST", "/api/create", {"model": "x", "from": "tiny"}),
    ("HEAD", "/api/blobs/sha256:" + "0" * 64, None),
    ("POST", "/api/blobs/sha256:" + "0" * 64, None),
    ("POST", "/api/pull", {"model": "llama3"}),
]


def _call(server, method, path, body, key=None, headers=None):
    all_headers = dict(headers or {})
    if key:
        all_headers["Authorization"] = f"Bearer {key}"
    return httpx.request(method, server.url + path, json=body, headers=all_headers, timeout=120)


@pytest.mark.parametrize("method, path, body", READ_ROUTES + ADMIN_ROUTES)
def test_every_route_requires_a_key(server, method, path, body):
    assert _call(server, method, path, body).status_code == 401
    assert _call(server, method, path, body, key="apk_not-a-real-key").status_code == 401


@pytest.mark.parametrize("method, path, body", READ_ROUTES)
def test_reader_may_use_models(server, method, path, body):
    assert _call(server, method, path, body, key=server.reader_key).status_code == 200


@pytest.mark.parametrize("method, path, body", ADMIN_ROUTES)
def test_reader_may_not_manage_models(server, method, path, body):
    response = _call(server, method, path, body, key=server.reader_key)
    assert response.status_code == 403
    if method != "HEAD":
        assert "admin" in response.json()["error"]
    names = {m["name"] for m in _call(server, "GET", "/api/tags", None, key=server.reader_key).json()["models"]}
    assert "tiny:latest" in names and "should-not-exist:latest" not in names


def test_revoked_key_stops_working(server):
    key = run_cli(server.home, "keys", "create", "--user", "reader", "--label", "temp").stdout.strip()
    assert _call(server, "GET", "/api/tags", None, key=key).status_code == 200
    run_cli(server.home, "keys", "revoke", key[:12])
    assert _call(server, "GET", "/api/tags", None, key=key).status_code == 401


def test_keys_are_stored_hashed(server):
    import sqlite3

    with sqlite3.connect(server.home / "appliance.db") as db:
        stored = [row[0] for row in db.execute("select key_hash from apikey")]
    assert server.admin_key not in stored and all(len(h) == 64 for h in stored)


@pytest.mark.parametrize("host", ["evil.example.com", "evil.example.com:11434", "93.184.216.34", "localhost.evil.com"])
def test_foreign_host_header_is_refused_on_loopback(server, host):
    response = _call(server, "GET", "/api/tags", None, key=server.admin_key, headers={"Host": host})
    assert response.status_code == 403 and "host" in response.json()["error"]


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1:11434", "[::1]:8080", "app.localhost", "192.168.1.5"])
def test_loopback_host_headers_are_accepted(server, host):
    response = _call(server, "GET", "/api/tags", None, key=server.admin_key, headers={"Host": host})
    assert response.status_code == 200
