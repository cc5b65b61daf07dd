"""Uploads through POST /api/documents become persistent jobs that the server's worker ingests; who may
upload, list and delete follows the one policy (grants, walls, document ACLs), and each upload and
delete, allowed or denied, leaves an audit record."""

import json
import time

import httpx
import pytest

from tests.conftest import run_cli
from tests.documents import write_docx, write_pdf

STAGES = {"parsing", "embedding", "indexing"}


def _wait(api: httpx.Client, job_id: str, timeout: float = 180) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = api.get(f"/api/jobs/{job_id}").json()
        if job["state"] in ("done", "failed"):
            assert "stage" not in job
            return job
        assert (job["state"] == "running") == ("stage" in job), job  # a running job says what it does
        assert job.get("stage", "parsing") in STAGES, job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish")


@pytest.fixture(scope="module")
def uploads(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uploads")
    pdf = write_pdf(folder / "medication.pdf")
    truncated = folder / "broken.pdf"
    truncated.write_bytes(pdf.read_bytes()[: pdf.stat().st_size // 2])
    return {"docx": write_docx(folder / "discharge.docx"), "pdf": pdf, "truncated": truncated}


def test_upload_ingests_through_jobs(server, uploads):
    # The admin creates "wards" by uploading to it (and so becomes its editor); the documents' ACL names
    # group nursing, so the admin reads them as a member of that group, not by being admin.
    run_cli(server.home, "groups", "add", "nursing")
    run_cli(server.home, "groups", "add-member", "nursing", "admin")
    with server.http() as api:
        files = [
            ("file", ("discharge.docx", uploads["docx"].read_bytes())),
            ("file", ("../../etc/medication.pdf", uploads["pdf"].read_bytes())),
            ("file", ("broken.pdf", uploads["truncated"].read_bytes())),
            ("file", ("setup.exe", b"MZ\x90\x00")),
        ]
        response = api.post("/api/documents", data={"collection": "wards", "acl": "group:nursing"}, files=files)
        assert response.status_code == 200, response.text
        answers = {a["filename"]: a for a in response.json()["jobs"]}
        assert answers["setup.exe"]["error"] == "unsupported file type"
        assert set(answers) == {"discharge.docx", "medication.pdf", "broken.pdf", "setup.exe"}
        jobs = {name: _wait(api, a["job_id"]) for name, a in answers.items() if "job_id" in a}
        assert jobs["discharge.docx"]["state"] == "done" and jobs["discharge.docx"]["result"] == "added"
        assert jobs["medication.pdf"]["state"] == "done"
        assert jobs["broken.pdf"]["state"] == "failed"
        assert jobs["broken.pdf"]["reason"].startswith("damaged or truncated PDF")
        listed = api.get("/api/documents", params={"collection": "wards"}).json()["documents"]
        assert {d["filename"] for d in listed} == {"discharge.docx", "medication.pdf"}
        assert all(d["acl"] == ["group:nursing"] for d in listed)
        assert list((server.home / "incoming").iterdir()) == [], "received files are removed once ingested"

        again = api.post(
            "/api/documents",
            data={"collection": "wards"},
            files=[("file", ("discharge.docx", uploads["docx"].read_bytes()))],
        ).json()["jobs"][0]
        assert _wait(api, again["job_id"])["result"] == "unchanged"

        victim = next(d for d in listed if d["filename"] == "discharge.docx")
        assert api.delete(f"/api/documents/{victim['id']}").status_code == 200
        assert api.delete(f"/api/documents/{victim['id']}").status_code == 404
        remaining = api.get("/api/documents", params={"collection": "wards"}).json()["documents"]
        assert [d["filename"] for d in remaining] == ["medication.pdf"]
    check = run_cli(server.home, "index", "check", check=False)
    assert check.returncode == 0 and "clean" in check.stdout


@pytest.mark.parametrize(
    "data, files, status, fragment",
    [
        ({}, [("file", ("a.md", b"# x"))], 400, "collection"),
        ({"collection": "../etc"}, [("file", ("a.md", b"# x"))], 400, "collection"),
        ({"collection": "ok", "acl": "everyone"}, [("file", ("a.md", b"# x"))], 400, "ACL"),
        ({"collection": "ok"}, [("attachment", ("a.md", b"# x"))], 400, "no 'file' parts"),
    ],
)
def test_bad_uploads(server, data, files, status, fragment):
    with server.http() as api:
        response = api.post("/api/documents", data=data, files=files)
        assert response.status_code == status and fragment in response.json()["error"]


def test_only_editors_upload_and_jobs_are_private(server, uploads):
    with server.http(server.reader_key) as reader, server.http() as admin:
        files = [("file", ("d.docx", uploads["docx"].read_bytes()))]
        assert reader.post("/api/documents", data={"collection": "wards"}, files=files).status_code == 403
        assert reader.get("/api/documents").json() == {"documents": []}  # a reader without grants reads nothing
        assert reader.delete("/api/documents/" + "0" * 64).status_code == 404
        job = admin.post("/api/documents", data={"collection": "private"}, files=files).json()["jobs"][0]
        assert reader.get(f"/api/jobs/{job['job_id']}").status_code == 404
        assert admin.get(f"/api/jobs/{job['job_id']}").status_code == 200
        _wait(admin, job["job_id"])
    assert httpx.post(f"{server.url}/api/documents").status_code == 401
    assert httpx.get(f"{server.url}/api/jobs/" + "a" * 32).status_code == 401


@pytest.mark.slow
def test_kill_9_during_ingestion_then_restart_leaves_a_clean_index(tmp_path, uploads):
    """Every document ends fully indexed or clearly failed after a crash, never half-indexed or doubled."""
    import os
    import signal

    from tests.conftest import launch_server, start_server, stop_server
    from tests.documents import write_all

    documents = write_all(tmp_path / "batch")
    server = start_server(tmp_path / "home", {})
    with server.http() as api:
        files = [("file", (path.name, path.read_bytes())) for path in documents.values()]
        jobs = [
            a["job_id"] for a in api.post("/api/documents", data={"collection": "crash"}, files=files).json()["jobs"]
        ]
        deadline = time.time() + 120
        while time.time() < deadline:  # wait until the worker is in the middle of the batch
            states = [api.get(f"/api/jobs/{j}").json()["state"] for j in jobs]
            if "running" in states and states.count("done") >= 1:
                break
            time.sleep(0.05)
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait(30)
    restarted = launch_server(server.home, server.admin_key, server.reader_key)
    try:
        with restarted.http() as api:
            final = [_wait(api, job_id) for job_id in jobs]
            assert [job["state"] for job in final] == ["done"] * len(jobs), final
            listed = api.get("/api/documents", params={"collection": "crash"}).json()["documents"]
        assert sorted(d["filename"] for d in listed) == sorted(p.name for p in documents.values())
        assert all(d["status"] == "indexed" for d in listed)
        check = run_cli(restarted.home, "index", "check", check=False)
        assert check.returncode == 0 and f"{len(documents)} documents" in check.stdout and "clean" in check.stdout
    finally:
        stop_server(restarted)


def _audit_export(home, *args: str) -> list[dict]:
    return [json.loads(line) for line in run_cli(home, "audit", "export", *args).stdout.splitlines()]


def test_documents_follow_grants_walls_and_acls_and_are_audited(server, uploads):
    """role x route x object -> status, with every upload and delete (allowed or not) in the audit log."""
    from appliance.access.rbac import add_collection, add_grant, add_wall
    from appliance.access.users import add_user, create_key
    from appliance.db import create_db_engine

    engine = create_db_engine(f"sqlite:///{server.home / 'appliance.db'}")
    keys = {}
    for name, role in (
        ("m-editor", "editor"),  # editor grant on matrix
        ("m-stranger", "editor"),  # editor, no grant on matrix
        ("m-reader", "reader"),  # reader grant on matrix
        ("m-nobody", "reader"),  # no grant
        ("m-walled", "reader"),  # reader grant, but walled off matrix
        ("m-admin", "admin"),  # admin role, no grant
    ):
        add_user(engine, name, role)
        keys[name] = create_key(engine, name)
    add_collection(engine, "matrix")
    add_grant(engine, "matrix", user="m-editor", role="editor")
    for name in ("m-reader", "m-walled"):
        add_grant(engine, "matrix", user=name)
    add_wall(engine, "matrix", user="m-walled")
    files = [("file", ("policy.md", b"# Matrix policy\n\nVisitors sign in at the front desk of ward nine."))]

    def call(who: str, method: str, path: str, **kwargs) -> httpx.Response:
        with server.http(keys[who]) as http:
            return http.request(method, path, **kwargs)

    for who in ("m-stranger", "m-reader", "m-nobody", "m-walled", "m-admin"):
        response = call(who, "POST", "/api/documents", data={"collection": "matrix"}, files=files)
        assert response.status_code == 403, (who, response.text)
    response = call("m-editor", "POST", "/api/documents", data={"collection": "matrix"}, files=files)
    assert response.status_code == 200, response.text
    job = response.json()["jobs"][0]
    with server.http(keys["m-editor"]) as http:
        document_id = _wait(http, job["job_id"])["document_id"]
    assert call("m-reader", "GET", f"/api/jobs/{job['job_id']}").status_code == 404  # not the reader's job

    listed = {who: [d["id"] for d in call(who, "GET", "/api/documents").json()["documents"]] for who in keys}
    assert document_id in listed["m-editor"] and document_id in listed["m-reader"]
    for who in ("m-stranger", "m-nobody", "m-walled", "m-admin"):
        assert document_id not in listed[who], who
    assert call("m-walled", "GET", "/api/documents", params={"collection": "matrix"}).json() == {"documents": []}

    for who in ("m-stranger", "m-nobody", "m-walled", "m-admin"):  # cannot read it: exactly like a missing one
        response = call(who, "DELETE", f"/api/documents/{document_id}")
        assert response.status_code == 404 and response.json() == {"error": f"document {document_id} not found"}
    assert call("m-reader", "DELETE", f"/api/documents/{document_id}").status_code == 403  # reads, may not edit
    assert call("m-editor", "DELETE", f"/api/documents/{document_id}").status_code == 200
    assert call("m-editor", "DELETE", f"/api/documents/{document_id}").status_code == 404

    # An editor naming a collection that does not exist is refused as for one that exists (no enumeration of
    # names); an admin, who may list every collection anyway, creates it and becomes its editor.
    files = [("file", ("own.md", b"# Own\n\nThe stranger keeps notes on the loading bay."))]
    response = call("m-stranger", "POST", "/api/documents", data={"collection": "stranger-own"}, files=files)
    assert response.status_code == 403
    assert response.json()["error"] == "uploading to collection 'stranger-own' needs an editor grant on it"
    response = call("m-admin", "POST", "/api/documents", data={"collection": "admin-own"}, files=files)
    assert response.status_code == 200, response.text
    grants = json.loads(run_cli(server.home, "grants", "list", "--collection", "admin-own", "--json").stdout)
    assert grants == [{"collection": "admin-own", "kind": "user", "subject": "m-admin", "role": "editor"}]
    with server.http(keys["m-admin"]) as http:
        _wait(http, response.json()["jobs"][0]["job_id"])

    uploads_logged = [r for r in _audit_export(server.home, "--action", "upload") if r["actor"].startswith("m-")]
    denied = {r["actor"] for r in uploads_logged if r["outcome"] == "denied"}
    assert denied == {"m-stranger", "m-reader", "m-nobody", "m-walled", "m-admin"}
    [queued, ingested] = [r for r in uploads_logged if r["actor"] == "m-editor"]  # received, then its job's end
    assert queued["outcome"] == "ok" and queued["target"] == "matrix" and queued["details"]["state"] == "queued"
    assert queued["details"]["job_id"] == job["job_id"] and queued["details"]["filename"] == "policy.md"
    assert ingested["outcome"] == "ok" and ingested["details"]["state"] == "done"
    assert ingested["details"]["document_id"] == document_id and ingested["details"]["result"] == "added"
    deletes = [r for r in _audit_export(server.home, "--action", "delete") if r["target"] == document_id]
    assert [(r["actor"], r["outcome"]) for r in deletes] == [
        ("m-stranger", "denied"),
        ("m-nobody", "denied"),
        ("m-walled", "denied"),
        ("m-admin", "denied"),
        ("m-reader", "denied"),
        ("m-editor", "ok"),
    ]
    # The client address is kept, as in every other record of a web request.
    assert deletes[-1]["details"] == {"collection": "matrix", "filename": "policy.md", "address": "127.0.0.1"}
    assert all(r["details"].get("address") == "127.0.0.1" for r in deletes + [queued])
    verify = run_cli(server.home, "audit", "verify")
    assert verify.stdout.startswith("OK: ")
