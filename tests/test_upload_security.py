"""Issue 18, findings 2, 4, 6 and 7, as attacks against a real server: an upload never replaces, reveals or
de-duplicates against a document its uploader could not delete; the job's outcome and every replacement are
audited; upload limits hold per part and per request, chunked or not."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest

from tests.conftest import run_cli, start_server, stop_server

LIMIT_MB = 1  # APPLIANCE_MAX_UPLOAD_MB of this module's server


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A server with collection `firm`: `partner` (group partners) and `associate` both edit it; `lawyer`
    edits the walled-off `litigation-acme`, which the associate may not see at all."""
    from appliance.access.rbac import add_collection, add_grant, add_group, add_member, add_wall
    from appliance.access.users import add_user, create_key
    from appliance.db import create_db_engine

    server = start_server(tmp_path_factory.mktemp("home"), {}, APPLIANCE_MAX_UPLOAD_MB=str(LIMIT_MB))
    engine = create_db_engine(f"sqlite:///{server.home / 'appliance.db'}")
    keys = {}
    for name in ("partner", "associate", "lawyer"):
        add_user(engine, name, "editor")
        keys[name] = create_key(engine, name)
    add_group(engine, "partners")
    add_member(engine, "partners", "partner")
    add_collection(engine, "firm")
    add_collection(engine, "litigation-acme")
    for name in ("partner", "associate"):
        add_grant(engine, "firm", user=name, role="editor")
    add_grant(engine, "litigation-acme", user="lawyer", role="editor")
    add_wall(engine, "litigation-acme", user="associate")
    try:
        yield server, keys
    finally:
        stop_server(server)


def _client(world, who: str) -> httpx.Client:
    server, keys = world
    return server.http(keys[who])


def _upload(world, who: str, collection: str, name: str, content: bytes, acl: str = "") -> dict:
    """Upload one file and wait for its job; the finished job."""
    with _client(world, who) as http:
        data = {"collection": collection, **({"acl": acl} if acl else {})}
        response = http.post("/api/documents", data=data, files=[("file", (name, content))])
        assert response.status_code == 200, response.text
        job_id = response.json()["jobs"][0]["job_id"]
        deadline = time.time() + 120
        while time.time() < deadline:
            job = http.get(f"/api/jobs/{job_id}").json()
            if job["state"] in ("done", "failed"):
                return job
            time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish")


def _listed(world, who: str, collection: str = "firm") -> dict[str, str]:
    """Document id -> file name, as `who` lists them."""
    with _client(world, who) as http:
        documents = http.get("/api/documents", params={"collection": collection}).json()["documents"]
    return {d["id"]: d["filename"] for d in documents}


def _audit(world, action: str) -> list[dict]:
    server, _ = world
    lines = run_cli(server.home, "audit", "export", "--action", action).stdout.splitlines()
    return [json.loads(line) for line in lines]


def _text(world, document_id: str) -> str:
    from appliance.db import DocumentText, create_db_engine, session

    server, _ = world
    with session(create_db_engine(f"sqlite:///{server.home / 'appliance.db'}")) as db:
        row = db.get(DocumentText, document_id)
    return row.text if row else ""


def _note(title: str) -> bytes:
    """A small markdown file whose text is unique to this call."""
    return f"# {title}\n\nMemo {uuid.uuid4().hex}: the partners' draw is settled each spring.\n".encode()


def test_an_upload_never_replaces_a_document_its_uploader_cannot_delete(world):
    """Finding 2: same name, hidden original: the original stays, the upload is a new document answered
    `added` (as if nothing were there), and nothing names the hidden one; replacing what one may delete is
    audited as a delete."""
    secret = _upload(world, "partner", "firm", "draw-2027.md", _note("Partners only"), acl="group:partners")
    assert secret["state"] == "done" and secret["result"] == "added", secret
    hidden = secret["document_id"]
    assert hidden not in _listed(world, "associate")

    planted = _upload(world, "associate", "firm", "draw-2027.md", _note("Associate's version"))
    assert planted["state"] == "done" and planted["result"] == "added", planted  # not "updated": reveals nothing
    assert planted["document_id"] != hidden
    assert hidden in _listed(world, "partner") and "Partners only" in _text(world, hidden)
    assert planted["document_id"] in _listed(world, "associate")
    assert not [r for r in _audit(world, "delete") if r["target"] == hidden]

    # A new version of the associate's own file replaces that one only, with an audited delete.
    again = _upload(world, "associate", "firm", "draw-2027.md", _note("Associate's second version"))
    assert again["state"] == "done" and again["result"] == "updated", again
    assert planted["document_id"] not in _listed(world, "associate")
    assert hidden in _listed(world, "partner") and "Partners only" in _text(world, hidden)
    [replaced] = [r for r in _audit(world, "delete") if r["target"] == planted["document_id"]]
    assert replaced["actor"] == "associate" and replaced["outcome"] == "ok"
    assert replaced["details"]["collection"] == "firm" and replaced["details"]["filename"] == "draw-2027.md"
    assert replaced["details"]["reason"] == f"replaced by upload {again['id']}"
    assert replaced["details"]["replaced_by"] == again["document_id"]

    # The partner may delete both: a new version of theirs replaces both, each with its delete record.
    final = _upload(world, "partner", "firm", "draw-2027.md", _note("Partners' final"), acl="group:partners")
    assert final["result"] == "updated"
    assert [name for name in _listed(world, "partner").values() if name == "draw-2027.md"] == ["draw-2027.md"]
    deletes = {r["target"]: r for r in _audit(world, "delete") if r["actor"] == "partner"}
    assert {hidden, again["document_id"]} <= set(deletes)
    assert deletes[hidden]["details"]["reason"] == f"replaced by upload {final['id']}"


def test_each_finished_job_is_audited_with_its_outcome(world):
    """Finding 6: the upload's record says only that it was queued; the job's end is recorded too."""
    content = _note("Audited")
    done = _upload(world, "associate", "firm", "audited.md", content)
    failed = _upload(world, "associate", "firm", "broken.pdf", b"%PDF-1.7 not really a PDF")
    assert done["state"] == "done" and failed["state"] == "failed"
    records = {r["details"].get("job_id"): r for r in _audit(world, "upload") if r["details"].get("state") != "queued"}
    finished = records[done["id"]]
    assert finished["actor"] == "associate" and finished["outcome"] == "ok" and finished["target"] == "firm"
    assert finished["details"]["state"] == "done"
    assert finished["details"]["result"] == "added" and finished["details"]["document_id"] == done["document_id"]
    broken = records[failed["id"]]
    assert broken["outcome"] == "failed" and broken["details"]["reason"] == failed["reason"]
    assert broken["details"]["state"] == "failed" and broken["details"]["filename"] == "broken.pdf"
    queued = [r for r in _audit(world, "upload") if r["details"].get("job_id") == done["id"]]
    assert [r["details"]["state"] for r in queued] == ["queued", "done"]
    server, _ = world
    assert run_cli(server.home, "audit", "verify").stdout.startswith("OK: ")


def test_de_duplication_is_per_collection_and_reveals_no_other_copy(world):
    """Finding 4: the same bytes in a walled-off collection, or hidden in the same one, change nothing in
    the answer an uploader gets."""
    content = _note("Acme settlement terms")
    walled = _upload(world, "lawyer", "litigation-acme", "terms.md", content)
    assert walled["result"] == "added"

    copy = _upload(world, "associate", "firm", "terms.md", content)
    assert copy["state"] == "done", copy  # was: "the same file is already in collection 'litigation-acme'"
    assert copy["result"] == "added" and copy["document_id"] != walled["document_id"]
    assert "litigation-acme" not in json.dumps(copy)
    assert copy["document_id"] in _listed(world, "associate")
    assert walled["document_id"] in _listed(world, "lawyer", "litigation-acme")

    # In the same collection: a copy the uploader may not read is not theirs to be told about.
    private = _note("Partner compensation")
    hidden = _upload(world, "partner", "firm", "comp.md", private, acl="group:partners")
    mine = _upload(world, "associate", "firm", "comp-copy.md", private)
    assert mine["result"] == "added" and mine["document_id"] != hidden["document_id"], mine
    assert mine["document_id"] in _listed(world, "associate")
    # ...while a copy the uploader may read is, as before, the same document.
    twice = _upload(world, "associate", "firm", "comp-copy.md", private)
    assert twice["result"] == "unchanged" and twice["document_id"] == mine["document_id"]
    assert hidden["document_id"] in _listed(world, "partner")
    server, _ = world
    check = run_cli(server.home, "index", "check", check=False)
    assert check.returncode == 0 and "clean" in check.stdout


def test_an_editor_cannot_tell_existing_collections_from_new_names(world):
    """Finding 4: uploading where one holds no editor grant is refused alike, whether the name exists."""
    answers = {}
    for name in ("litigation-acme", f"never-made-{uuid.uuid4().hex[:8]}"):
        with _client(world, "associate") as http:
            response = http.post("/api/documents", data={"collection": name}, files=[("file", ("a.md", b"# a"))])
        answers[name] = (response.status_code, response.json()["error"].replace(name, "NAME"))
    assert len(set(answers.values())) == 1, answers
    assert next(iter(answers.values()))[0] == 403


def _multipart(boundary: str, collection: str, files: list[tuple[str, int]]):
    """A multipart body, produced piece by piece (so httpx sends it chunked, without a Content-Length)."""
    yield f'--{boundary}\r\nContent-Disposition: form-data; name="collection"\r\n\r\n{collection}\r\n'.encode()
    for name, size in files:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: text/markdown\r\n\r\n"
        ).encode()
        line = b"padding text for the size limit test, nothing to index here.\n"
        sent = 0
        while sent < size:
            piece = (line * 1024)[: min(1 << 16, size - sent)]
            sent += len(piece)
            yield piece
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def _incoming(world) -> list[str]:
    server, _ = world
    return sorted(p.name for p in (server.home / "incoming").iterdir())


def test_a_chunked_upload_over_the_limit_is_refused_while_it_streams(world):
    """Finding 7: no Content-Length to check up front; the body is counted as it arrives."""
    boundary = uuid.uuid4().hex
    body = _multipart(boundary, "firm", [("huge.md", 8 * LIMIT_MB * 2**20)])
    with _client(world, "associate") as http:
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        request = http.build_request("POST", "/api/documents", content=body, headers=headers)
        assert "content-length" not in request.headers and request.headers["transfer-encoding"] == "chunked"
        response = http.send(request)
    assert response.status_code == 413, response.text
    assert "APPLIANCE_MAX_UPLOAD_MB" in response.json()["error"]
    assert _incoming(world) == []
    assert not [r for r in _audit(world, "upload") if r["details"].get("filename") == "huge.md"]
    world[0].assert_alive()


def test_each_part_is_held_to_the_limit(world):
    """Finding 7: a part over the limit is refused, though the request as a whole is small enough."""
    boundary = uuid.uuid4().hex
    parts = [("big.md", LIMIT_MB * 2**20 + 4096), ("small.md", 2048)]
    with _client(world, "associate") as http:
        response = http.post(
            "/api/documents",
            content=b"".join(_multipart(boundary, "firm", parts)),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        assert response.status_code == 200, response.text
        answers = {a["filename"]: a for a in response.json()["jobs"]}
        assert "job_id" not in answers["big.md"] and f"{LIMIT_MB} MB" in answers["big.md"]["error"]
        assert "job_id" in answers["small.md"]
        deadline = time.time() + 60
        while http.get(f"/api/jobs/{answers['small.md']['job_id']}").json()["state"] not in ("done", "failed"):
            assert time.time() < deadline
            time.sleep(0.1)
    assert _incoming(world) == []
    [refused] = [r for r in _audit(world, "upload") if r["details"].get("filename") == "big.md"]
    assert refused["outcome"] == "failed" and refused["details"]["reason"] == "too large"


def test_a_job_runs_with_its_uploaders_rights_as_they_are_when_it_runs(tmp_path):
    """Finding 2: the check is made when the job runs: an uploader whose grant was revoked meanwhile
    changes nothing, and the refusal is audited."""
    from appliance.access import audit
    from appliance.access.rbac import add_collection, add_grant, remove_grant
    from appliance.access.users import add_user
    from ingest.jobs import JobWorker
    from tests.conftest import local_ingestor

    ingestor = local_ingestor(tmp_path / "home", database_url="", chroma_url="")
    engine = ingestor.index.engine
    leaver = add_user(engine, "leaver", "editor")
    add_collection(engine, "wards")
    add_grant(engine, "wards", user="leaver", role="editor")
    worker = JobWorker(engine, ingestor, tmp_path / "home" / "incoming")
    job_id, upload = worker.new_upload_path(".md")
    upload.write_bytes(b"# Rota\n\nNights are covered by the bank staff.\n")
    worker.enqueue(job_id, upload, "rota.md", "wards", ["collection:wards"], leaver.id)
    remove_grant(engine, "wards", user="leaver")
    assert worker.run_next()
    job = worker.get(job_id)
    assert job.state == "failed" and job.reason == "uploading to 'wards' is no longer allowed"
    assert job.document_id is None and not upload.exists()
    [record] = [r for r in audit.export(engine, action="upload") if r["details"]["job_id"] == job_id]
    assert record["actor"] == "leaver" and record["outcome"] == "denied" and record["details"]["state"] == "failed"


def test_an_upload_acl_may_name_only_existing_users_and_groups(world):
    """Finding 11 on the upload route: `user:ghost` would be inherited by whoever gets that name later; the
    check comes after the upload right, so it tells names only to those who may upload there."""
    with _client(world, "associate") as http:
        files = [("file", ("ghost.md", _note("Ghost")))]
        refused = http.post(
            "/api/documents", data={"collection": "firm", "acl": "user:ghost,group:partners"}, files=files
        )
        assert refused.status_code == 400 and "no such entry: user:ghost" in refused.json()["error"]
        walled = http.post("/api/documents", data={"collection": "litigation-acme", "acl": "user:ghost"}, files=files)
        assert walled.status_code == 403  # not allowed there: no word about the ACL's names
    assert "ghost.md" not in _listed(world, "partner").values()
