"""Observability: /health and /ready without credentials, /metrics (who may scrape, what it counts), JSON logs.

One real server (JSON logs on) for what a client sees; an in-process app for what only another client
address or a vanished database can show.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from appliance.access import users
from appliance.config import Settings
from appliance.operations.logs import JsonFormatter
from tests.conftest import run_cli, start_server, stop_server
from web.app import create_app


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_gguf):
    srv = start_server(tmp_path_factory.mktemp("observed"), {"tiny": tiny_gguf}, APPLIANCE_LOG_FORMAT="json")
    yield srv
    stop_server(srv)


def scrape(server) -> dict[tuple[str, tuple], float]:
    response = httpx.get(f"{server.url}/metrics", timeout=30)  # loopback, no credentials
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, parsed as Prometheus itself would."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: dict, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def test_health_and_ready_answer_anyone_and_say_nothing_else(server):
    health = httpx.get(f"{server.url}/health", timeout=10)
    ready = httpx.get(f"{server.url}/ready", timeout=10)
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
    version = httpx.get(f"{server.url}/api/version", timeout=10).json()["version"]
    assert not any(version in value for response in (health, ready) for value in response.headers.values())


def test_metrics_count_requests_by_route_template_never_by_raw_path(server):
    job_id = uuid.uuid4().hex
    with server.http() as api:
        assert api.get(f"/api/jobs/{job_id}").status_code == 404
        assert api.get(f"/no/such/{job_id}").status_code == 404
    response = httpx.get(f"{server.url}/metrics", timeout=30)
    assert job_id not in response.text
    found = samples(response.text)
    requests = "appliance_http_requests_total"
    assert value(found, requests, method="GET", route="/api/jobs/{job_id}", status="404") >= 1
    assert value(found, requests, method="GET", route="unmatched", status="404") >= 1
    timed = "appliance_http_request_duration_seconds_count"
    assert value(found, timed, method="GET", route="/api/jobs/{job_id}") >= 1
    assert value(found, "appliance_info", version=httpx.get(f"{server.url}/api/version").json()["version"]) == 1


def test_metrics_count_generated_tokens_and_show_the_loaded_model(server):
    generated, prompt = "appliance_tokens_generated_total", "appliance_prompt_tokens_total"
    before = value(scrape(server), generated, model="tiny:latest") or 0
    with server.http() as api:
        body = {"model": "tiny", "prompt": "Hello", "stream": False, "options": {"num_predict": 6, "seed": 1}}
        answer = api.post("/api/generate", json=body).json()
    assert answer["eval_count"] > 0
    found = scrape(server)
    assert value(found, generated, model="tiny:latest") == before + answer["eval_count"]
    assert value(found, prompt, model="tiny:latest") >= answer["prompt_eval_count"] > 0
    assert value(found, "appliance_loaded_models") == 1
    assert value(found, "appliance_loaded_model_info", model="tiny:latest", embedding="false") == 1
    assert value(found, "appliance_loaded_model_parallel_sequences", model="tiny:latest", embedding="false") >= 1
    assert value(found, "appliance_queue_depth") == 0 and value(found, "appliance_requests_running") == 0


def test_metrics_show_ingestion_jobs_and_the_index(server):
    before = scrape(server)
    files = [("file", ("rota.md", b"# Rota\n\nThe night porter starts at nine and hands over at seven."))]
    with server.http() as api:
        job = api.post("/api/documents", data={"collection": "observed"}, files=files).json()["jobs"][0]
        for _ in range(600):
            state = api.get(f"/api/jobs/{job['job_id']}").json()["state"]
            if state in ("done", "failed"):
                break
            time.sleep(0.2)
    assert state == "done"
    found = scrape(server)
    jobs = "appliance_ingest_jobs"
    assert value(found, jobs, state="done") == value(before, jobs, state="done") + 1
    assert value(found, jobs, state="failed") == 0 and value(found, jobs, state="queued") == 0
    assert value(found, "appliance_index_documents") == value(before, "appliance_index_documents") + 1
    assert value(found, "appliance_index_chunks") > value(before, "appliance_index_chunks")


def test_metrics_from_loopback_refuse_credentials_that_are_not_an_admins(server):
    assert httpx.get(f"{server.url}/metrics", headers=server.auth(server.reader_key)).status_code == 403
    assert httpx.get(f"{server.url}/metrics", headers=server.auth("apk_not-a-real-key")).status_code == 401
    assert httpx.get(f"{server.url}/metrics", headers=server.auth()).status_code == 200


def test_json_logs_are_one_object_per_line(server):
    assert httpx.get(f"{server.url}/api/version", timeout=10).status_code == 200
    lines = [line for line in server.log_path.read_text().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line, from every logger, or this fails
    assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in entries)
    loggers = {entry["logger"] for entry in entries}
    assert "web.app" in loggers and "uvicorn.error" in loggers  # ours, and the server's own
    assert any(entry["message"].startswith("appliance ") and "ready" in entry["message"] for entry in entries)


def test_json_formatter_writes_extra_fields_and_exceptions():
    logger = logging.getLogger("tests.observability")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        logger.warning("job %s failed", "j1", extra={"job_id": "j1", "attempt": 2})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("unexpected")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(JsonFormatter().format(record)) for record in records)
    assert first["message"] == "job j1 failed" and first["job_id"] == "j1" and first["attempt"] == 2
    assert first["level"] == "WARNING" and first["logger"] == "tests.observability" and first["time"].endswith("Z")
    assert "ValueError: boom" in second["exception"] and "\n" not in JsonFormatter().format(records[1])


# --- in process: another client address, a database that goes away ---------------------------------
@pytest.fixture(scope="module")
def local_app(tmp_path_factory):
    """An app on a fresh home (no model installed) whose database lives in a directory of its own."""
    home = tmp_path_factory.mktemp("inproc")
    database_dir = tmp_path_factory.mktemp("database")
    settings = Settings(home=home, database_url=f"sqlite:///{database_dir / 'appliance.db'}")
    app = create_app(settings)
    yield app, database_dir


def test_metrics_refuse_other_addresses_without_an_admin_key(local_app):
    app, _ = local_app
    with TestClient(app, base_url="http://localhost") as client:  # the client's address is "testclient"
        admin = users.create_key(app.state.db, users.add_user(app.state.db, "boss", "admin").name)
        reader = users.create_key(app.state.db, users.add_user(app.state.db, "clerk", "reader").name)
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": f"Bearer {reader}"}).status_code == 403
        assert client.get("/metrics", headers={"Authorization": f"Bearer {admin}"}).status_code == 200
    with TestClient(app, base_url="http://localhost", client=("127.0.0.1", 50000)) as local:
        assert local.get("/metrics").status_code == 200
        # What a proxy on this machine forwards comes from elsewhere, whatever the socket's address.
        assert local.get("/metrics", headers={"X-Forwarded-For": "10.1.2.3"}).status_code == 401
        assert local.get("/metrics", headers={"X-Forwarded-For": "127.0.0.1"}).status_code == 401


def test_ready_is_503_when_the_database_is_gone(local_app, caplog):
    app, database_dir = local_app
    with TestClient(app, base_url="http://localhost") as client:
        ready = client.get("/ready")
        assert (ready.status_code, ready.json()) == (200, {"status": "ready"})  # with no model installed
        shutil.rmtree(database_dir)
        # Connections the pool already holds keep reading the unlinked file; a new one finds nothing.
        app.state.db.dispose()
        with caplog.at_level(logging.WARNING, logger="web.health"):
            gone = client.get("/ready")
        assert (gone.status_code, gone.json()) == (503, {"status": "not ready"})
        assert "database does not answer" in caplog.text
        assert client.get("/health").json() == {"status": "ok"}


def test_doctor_finds_the_running_server_and_no_outbound_connection(server):
    report = run_cli(server.home, "doctor", "--json", APPLIANCE_PORT=str(server.port), check=False)
    checks = {check["name"]: check for check in json.loads(report.stdout)["checks"]}
    connections = checks["connections"]
    assert connections["status"] == "ok", connections
    assert f"pid {server.process.pid}" in connections["message"]
