"""Hostile requests from signed-in callers: templates that would run forever, JSON nested thousands deep.

Each is refused with a clear 4xx, refusals reach the audit log, and other callers are served while
they run (the red-team review hung every route with seven template requests on the shared pool).
Latency under this load is measured by `bench/hostile.py`, not asserted here.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from appliance.access import audit
from appliance.db import create_db_engine

LOOP_BOMB = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
NESTED = b'{"model": "tiny", "options": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"


def _generate(server, key: str, template: str) -> httpx.Response:
    body = {"model": "tiny", "prompt": "hi", "template": template, "stream": False, "options": {"num_predict": 1}}
    with server.http(key) as client:
        return client.post("/api/generate", json=body)


def _nested(server, path: str) -> httpx.Response:
    with server.http(server.reader_key) as client:
        return client.post(path, content=NESTED, headers={"Content-Type": "application/json"})


def test_only_administrators_may_send_a_template_and_a_refusal_is_audited(server):
    refused = _generate(server, server.reader_key, LOOP_BOMB)
    assert refused.status_code == 403 and "only administrators" in refused.json()["error"]
    engine = create_db_engine(f"sqlite:///{server.home / 'appliance.db'}")
    records = [r for r in audit.export(engine, action="access_refused") if r["actor"] == "reader"]
    assert any(r["target"] == "POST /api/generate" and "template" in r["details"]["reason"] for r in records)
    assert all(r["outcome"] == "denied" for r in records)
    # An ordinary template from an administrator still works.
    with server.http() as admin:
        ok = admin.post(
            "/api/generate",
            json={
                "model": "tiny",
                "prompt": "hi",
                "template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
                "stream": False,
                "options": {"num_predict": 1},
            },
        )
    assert ok.status_code == 200, ok.text


def test_a_runaway_template_is_stopped_with_a_400(server):
    started = time.monotonic()
    response = _generate(server, server.admin_key, LOOP_BOMB)
    assert response.status_code == 400 and "longer than" in response.json()["error"]
    assert time.monotonic() - started < 60  # it ended (the deadline is 1 s); before the fix it never did


def test_deeply_nested_json_is_a_clean_400_everywhere(server):
    for path in ("/api/chat", "/api/generate", "/v1/chat/completions", "/api/rag/search"):
        response = _nested(server, path)
        assert response.status_code == 400, (path, response.text[:200])
        text = response.text
        assert "nested deeper than" in text and "Traceback" not in text
    # Deep but still parseable by the json module: refused before any code walks it.
    moderate = {"model": "tiny", "prompt": "x", "format": {"type": "object"}}
    inner: dict = moderate["format"]
    for _ in range(200):
        inner["properties"] = {"a": {"type": "object"}}
        inner = inner["properties"]["a"]
    with server.http() as client:
        response = client.post("/api/generate", json=moderate)
    assert response.status_code == 400 and "nested deeper than" in response.json()["error"]
    assert "RecursionError" not in server.log_path.read_text()


def test_other_callers_are_served_while_ten_hostile_requests_run(server):
    """Ten hostile requests at once (template bombs from an administrator's key, the rest from a reader, and
    nested JSON); meanwhile tags, embeddings, documents and search answer every time."""
    probes = [
        ("GET", "/api/tags", None),
        ("POST", "/api/embed", {"model": "all-minilm", "input": "retention of records"}),
        ("GET", "/api/documents", None),
        ("POST", "/api/rag/search", {"query": "retention of records"}),
    ]
    with ThreadPoolExecutor(max_workers=10) as pool:
        hostile = [pool.submit(_generate, server, server.admin_key, LOOP_BOMB) for _ in range(4)]
        hostile += [pool.submit(_generate, server, server.reader_key, LOOP_BOMB) for _ in range(3)]
        hostile += [pool.submit(_nested, server, "/api/chat") for _ in range(3)]
        time.sleep(0.5)  # let them start
        answered = []
        with server.http(server.reader_key) as client:
            for method, path, body in probes * 3:
                response = client.request(method, path, json=body, timeout=30)
                answered.append((path, response.status_code))
        statuses = sorted(future.result().status_code for future in hostile)
    assert all(status == 200 for _, status in answered), answered
    assert statuses == [400] * 7 + [403] * 3
    server.assert_alive()
