"""Scale-out: several server processes share one PostgreSQL database and one Chroma server.

Two `appliance serve` processes with homes of their own (as on two hosts) answer from the same documents
whichever of them received the upload; concurrent job workers each take different jobs (`FOR UPDATE SKIP
LOCKED`); a job left running by a process that died goes back to the queue, one still running does not.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from tests.conftest import cli_env, launch_server, run_cli, stop_server


@pytest.fixture
def shared(postgres_server, chroma_server) -> dict[str, str]:
    """The environment that points a process at one fresh PostgreSQL database and one Chroma database."""
    return {
        "APPLIANCE_DATABASE_URL": postgres_server.new_database(),
        "APPLIANCE_CHROMA_URL": chroma_server.url,
        "APPLIANCE_CHROMA_DATABASE": chroma_server.new_database(),
    }


def _wait_job(api: httpx.Client, job_id: str, timeout: float = 180) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = api.get(f"/api/jobs/{job_id}").json()
        if job["state"] in ("done", "failed"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish")


def _upload(api: httpx.Client, name: str, text: str) -> dict:
    response = api.post(
        "/api/documents", data={"collection": "wards"}, files=[("file", (name, text.encode()))], timeout=60
    )
    assert response.status_code == 200, response.text
    (answer,) = response.json()["jobs"]
    return _wait_job(api, answer["job_id"])


def _search(api: httpx.Client, query: str) -> list[dict]:
    response = api.post("/api/rag/search", json={"query": query, "collections": ["wards"], "top_k": 3})
    assert response.status_code == 200, response.text
    return response.json()["results"]


@pytest.mark.slow
def test_two_servers_answer_from_one_postgres_and_one_chroma(tmp_path, shared):
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    home_a.mkdir()
    run_cli(home_a, "users", "add", "admin", "--role", "admin", **shared)
    run_cli(home_a, "users", "add", "nurse", "--role", "reader", **shared)
    admin_key = run_cli(home_a, "keys", "create", "--user", "admin", **shared).stdout.strip()
    nurse_key = run_cli(home_a, "keys", "create", "--user", "nurse", **shared).stdout.strip()
    home_b.mkdir()
    # One user table: the key made through A's home is accepted by B, and B sees A's users.
    users = json.loads(run_cli(home_b, "users", "list", "--json", **shared).stdout)
    assert {u["name"] for u in users} == {"admin", "nurse"}
    server_a = launch_server(home_a, admin_key, nurse_key, **shared)
    server_b = launch_server(home_b, admin_key, nurse_key, **shared)
    try:
        with server_a.http() as api_a, server_b.http() as api_b:
            job = _upload(api_a, "handover.md", "# Handover\n\nNight shift handover happens at 07:30 on ward 4.\n")
            assert job["state"] == "done" and job["result"] == "added", job
            # B never saw the upload, yet finds it: documents, chunks, vectors and BM25 all come from shared stores.
            hits = _search(api_b, "when is the night shift handover")
            assert hits and hits[0]["document_id"] == job["document_id"]
            assert api_b.get(f"/api/jobs/{job['id']}").json()["state"] == "done"  # one job table
            listed = api_b.get("/api/documents", params={"collection": "wards"}).json()
            assert [d["id"] for d in listed["documents"]] == [job["document_id"]]
            # The other way round, and a keyword-only match (a rare code word) to exercise BM25 on both.
            second = _upload(api_b, "codes.md", "# Codes\n\nThe resuscitation trolley seal code is QX7741.\n")
            assert second["state"] == "done", second
            assert _search(api_a, "QX7741")[0]["document_id"] == second["document_id"]
            # A deletion through A disappears from B's next search.
            assert api_a.delete(f"/api/documents/{second['document_id']}").status_code == 200
            assert all(h["document_id"] != second["document_id"] for h in _search(api_b, "QX7741"))
        run_cli(home_b, "index", "check", **shared)  # exits non-zero unless database and Chroma server agree
    finally:
        stop_server(server_a)
        stop_server(server_b)


WORKER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from appliance.config import Settings
    from appliance.db import create_db_engine
    from ingest.jobs import JobWorker
    from ingest.pipeline import IngestResult

    mode, out = sys.argv[1], Path(sys.argv[2])
    settings = Settings()
    engine = create_db_engine(settings.resolved_database_url)


    class Recorder:  # stands in for the ingestor: records which jobs this process ran
        on_stage = None

        def ingest_with_attachments(self, upload, collection, acl, source, filename, may_replace):
            with out.open("a") as log:
                log.write(filename + "\\n")
            time.sleep(0.05 if mode == "drain" else 3600)  # "hold": a job that runs until the process is killed
            return [IngestResult(source, "failed", reason="recorded")]


    worker = JobWorker(engine, Recorder(), settings.home / "incoming")
    if mode == "drain":
        while worker.run_next():
            pass
    else:
        worker.run_next()
    """
)


def _enqueue(home: Path, env: dict[str, str], count: int) -> list[str]:
    """Queue `count` jobs whose uploads exist in `home` (as the upload route would)."""
    from appliance.config import Settings
    from appliance.db import create_db_engine
    from ingest.jobs import JobWorker

    settings = Settings(home=home, database_url=env["APPLIANCE_DATABASE_URL"])
    worker = JobWorker(create_db_engine(settings.resolved_database_url), SimpleNamespace(), home / "incoming")
    names = []
    for number in range(count):
        job_id, upload = worker.new_upload_path(".md")
        upload.write_text(f"# Note {number}\n")
        worker.enqueue(job_id, upload, f"note-{number}.md", "wards", ["collection:wards"], None)
        names.append(f"note-{number}.md")
    return names


def _worker(home: Path, env: dict[str, str], mode: str, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, mode, str(out)], env=cli_env(home, **env))


def _states(env: dict[str, str]) -> dict[str, str]:
    from sqlmodel import select

    from appliance.db import Job, create_db_engine, session

    with session(create_db_engine(env["APPLIANCE_DATABASE_URL"])) as db:
        return {job.filename: job.state for job in db.exec(select(Job))}


def test_concurrent_workers_take_each_job_exactly_once(tmp_path, shared):
    names = _enqueue(tmp_path, shared, 24)
    logs = [tmp_path / f"worker-{n}.log" for n in range(3)]
    workers = [_worker(tmp_path, shared, "drain", log) for log in logs]
    for worker in workers:
        assert worker.wait(180) == 0
    runs = [line for log in logs if log.exists() for line in log.read_text().split()]
    assert sorted(runs) == sorted(names), "a job was run twice or never"
    assert sum(1 for log in logs if log.exists() and log.read_text()) >= 2, "the workers did not share the queue"
    assert set(_states(shared).values()) == {"failed"}  # every job finished (the recorder fails them on purpose)


def test_a_running_job_is_taken_back_only_when_its_process_died(tmp_path, shared):
    from appliance.db import create_db_engine
    from ingest.jobs import JobWorker

    (name,) = _enqueue(tmp_path, shared, 1)
    holder = _worker(tmp_path, shared, "hold", tmp_path / "holder.log")
    try:
        deadline = time.time() + 60
        while _states(shared)[name] != "running":
            assert time.time() < deadline and holder.poll() is None, "the worker did not take the job"
            time.sleep(0.1)
        other = JobWorker(create_db_engine(shared["APPLIANCE_DATABASE_URL"]), SimpleNamespace(), tmp_path / "incoming")
        other.recover()  # another server starting: the job is still being run, so it stays where it is
        assert _states(shared)[name] == "running"
        assert not other.run_next()  # nor is it taken
    finally:
        holder.kill()
        holder.wait(30)
    other.recover()  # its process is gone (PostgreSQL released the run lock): back in the queue
    assert _states(shared)[name] == "queued"


AUDIT_WRITER = (
    "import sys; from appliance.access import audit; from appliance.db import create_db_engine\n"
    "engine = create_db_engine(sys.argv[1])\n"
    "for n in range(25): audit.record(engine, sys.argv[2], 'search', actor_id=n, target='wards')\n"
)


def test_audit_log_on_postgres_is_chained_under_concurrent_writers_and_append_only(tmp_path, shared):
    """Three server processes write audit records at once: the chain stays whole (the table lock orders
    them); UPDATE, DELETE and TRUNCATE are refused by the database itself."""
    import psycopg

    from appliance.access import audit
    from appliance.db import create_db_engine

    url = shared["APPLIANCE_DATABASE_URL"]
    create_db_engine(url)  # migrated once before the writers start
    writers = [
        subprocess.Popen([sys.executable, "-c", AUDIT_WRITER, url, f"server{n}"], env=cli_env(tmp_path, **shared))
        for n in range(3)
    ]
    assert [writer.wait(120) for writer in writers] == [0, 0, 0]
    engine = create_db_engine(url)
    assert audit.verify(engine) == (True, None, None)
    assert audit.search(engine)[1] == 75
    for statement in ("UPDATE audit_record SET actor = 'x'", "DELETE FROM audit_record", "TRUNCATE audit_record"):
        with psycopg.connect(url) as connection, pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            connection.execute(statement)
