"""The authorization matrix (issue 5): every route x {anonymous, reader without grant, reader with grant,
reader walled off, editor, admin} x {API key, browser session} -> the expected status, against one real
server, with zero unexpected 2xx; where a 2xx lists things, the document shows only to those who read it.

The rows are checked against the app's own route table (`create_app(...).routes`): a route without a row
here, or a row naming no route, fails the test. Pages answer a key like no credentials at all (they take
only the session); browser-session calls carry the session's CSRF token (form field or X-CSRF-Token
header), so that a refusal is the authorization, never the CSRF check.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, update
from sqlmodel import select

from appliance.access import audit, rbac, users
from appliance.answers import conversations
from appliance.config import Settings
from appliance.db import AuditRecord, Grant, WebSession, create_db_engine, session, utcnow
from appliance.errors import Conflict, NotFound
from tests.conftest import Server, launch_server, run_cli, stop_server
from web import admin_pages, sessions

CORPUS = Path(__file__).parent.parent / "sample_corpus"
PASSWORD = "correct horse battery"
CALLERS = ("anonymous", "nogrant", "granted", "walled", "editor", "admin")
MODES = ("key", "session")
READERS = {"granted", "editor"}  # who reads collection alpha (and so its document)
COOKIE = "appliance_session"  # the plain-http cookie name
REASON = "Matrix test: the admin looks at the spare collection"
_unique = itertools.count()


@dataclass
class World:
    server: Server
    engine: Any
    keys: dict[str, str]
    sessions: dict[str, tuple[str, str]]  # caller -> (cookie value, CSRF token)
    doc_id: str  # the document in alpha
    tiny_digest: str
    state: dict[str, Any] = field(default_factory=dict)

    def user_id(self, name: str) -> int:
        return users.get_user(self.engine, name).id


@dataclass
class Call:
    """One request of the matrix, as its builders see it."""

    world: World
    caller: str
    mode: str
    client: httpx.Client
    csrf: str  # the session's CSRF token (a syntactically fine stand-in for callers without a session)


def _session(engine, user: str) -> tuple[str, str]:
    token = sessions.create(engine, users.get_user(engine, user).id, "full")
    with session(engine) as db:
        row = db.exec(select(WebSession).where(WebSession.token_hash == hashlib.sha256(token.encode()).hexdigest()))
        return token, row.one().csrf_token


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_gguf, tiny_long_gguf):
    home = tmp_path_factory.mktemp("matrix")
    run_cli(home, "ingest", str(CORPUS / "hospital/records-retention-policy.md"), "--collection", "alpha")
    run_cli(home, "create", "tiny", "--from", str(tiny_gguf))
    run_cli(home, "create", "tiny-long", "--from", str(tiny_long_gguf))  # writes the answers (room for passages)
    engine = create_db_engine(f"sqlite:///{home / 'appliance.db'}")
    for name, role in (
        ("nogrant", "reader"),
        ("granted", "reader"),
        ("walled", "reader"),
        ("editor", "editor"),
        ("admin", "admin"),
        ("admin2", "admin"),  # for the break-glass walk-through (the matrix's admin never reads alpha)
        ("spare-user", "reader"),  # what the admin forms act on
    ):
        users.add_user(engine, name, role, PASSWORD)
    rbac.add_grant(engine, "alpha", user="granted")
    rbac.add_group(engine, "alpha-team")
    rbac.add_member(engine, "alpha-team", "walled")
    rbac.add_grant(engine, "alpha", group="alpha-team")
    rbac.add_wall(engine, "alpha", user="walled")
    rbac.add_grant(engine, "alpha", user="editor", role="editor")
    rbac.add_collection(engine, "spare")
    rbac.add_group(engine, "spare-group")
    keys = {name: users.create_key(engine, name) for name in CALLERS[1:] + ("admin2",)}
    signed = {name: _session(engine, name) for name in CALLERS[1:] + ("admin2",)}
    listing = json.loads(run_cli(home, "documents", "list", "--json").stdout)
    [doc_id] = [d["id"] for d in listing]
    digest = "sha256:" + hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    server = launch_server(
        home,
        keys["admin"],
        keys["granted"],
        APPLIANCE_RAG_MODEL="tiny-long",
        APPLIANCE_ANSWER_MAX_TOKENS="16",
        APPLIANCE_LOGIN_MAX_FAILURES="1000",
        APPLIANCE_LOGIN_MAX_FAILURES_PER_ADDRESS="100000",
    )
    yield World(server, engine, keys, signed, doc_id, digest)
    stop_server(server)


def client(world: World, caller: str, mode: str, signed: tuple[str, str] | None = None) -> httpx.Client:
    """A caller's client: a key, or a session's cookie and CSRF header (`signed`: another session of theirs)."""
    headers, cookies = {}, {}
    if caller != "anonymous" and mode == "key":
        headers["Authorization"] = f"Bearer {world.keys[caller]}"
    elif caller != "anonymous":
        cookie, csrf = signed or world.sessions[caller]
        cookies[COOKIE] = cookie
        headers["X-CSRF-Token"] = csrf
    return httpx.Client(
        base_url=world.server.url, headers=headers, cookies=cookies, timeout=120, follow_redirects=False
    )


def prelogin(call: Call) -> str:
    """A valid sign-in form token, bound to the prelogin cookie this client then holds (a signed-in browser
    is sent on from /login, so the token comes from an anonymous look at it)."""
    page = httpx.get(f"{call.world.server.url}/login", timeout=30)
    call.client.cookies.set("appliance_prelogin", page.cookies["appliance_prelogin"])
    return re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)


def E(anonymous: int, nogrant: int, granted: int, walled: int, editor: int, admin: int) -> dict[str, int]:
    return dict(zip(CALLERS, (anonymous, nogrant, granted, walled, editor, admin), strict=True))


def everyone(status: int) -> dict[str, int]:
    return dict.fromkeys(CALLERS, status)


USERS = E(401, 200, 200, 200, 200, 200)  # any signed-in caller
READ_ALPHA = E(401, 404, 200, 404, 200, 404)  # reading alpha: unreadable is answered like missing
ADMIN_API = E(401, 403, 403, 403, 403, 200)
PAGE = E(303, 200, 200, 200, 200, 200)
ADMIN_PAGE = E(303, 403, 403, 403, 403, 200)
ADMIN_FORM = E(303, 403, 403, 403, 403, 303)  # done: back to /admin with a notice


@dataclass
class Row:
    name: str
    method: str
    route: str  # the path template as the app declares the route
    expect: dict[str, int]
    path: str | Callable[[Call], str] | None = None  # the concrete path (default: the route)
    json: dict | Callable[[Call], dict] | None = None
    data: dict | Callable[[Call], dict] | None = None  # a form (pages get the csrf field added)
    files: Callable[[Call], list] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None
    page: bool = False  # takes only the browser session: a key is answered as no credentials
    shows: Callable[[World], str] | None = None  # in a 2xx body exactly when the caller reads alpha
    prepare: Callable[[Call], None] | None = None
    fresh_session: bool = False  # the request ends its session (sign-out): use a new one
    withheld: bool = False  # its 404s hide something that exists: audited as refusals, like 403s

    def expected(self, caller: str, mode: str) -> int:
        return self.expect["anonymous" if self.page and mode == "key" else caller]


# --- state the rows need -------------------------------------------------------------------------
def _admin_api(world: World) -> httpx.Client:
    return client(world, "admin", "key")


def _doomed_model(call: Call) -> None:
    with _admin_api(call.world) as api:
        api.post("/api/copy", json={"source": "tiny", "destination": "doomed"})


def _victim_document(call: Call) -> None:
    """A document in alpha to delete (uploaded by the editor; made again once it is deleted)."""
    world = call.world
    if world.state.get("victim") and _exists(world, world.state["victim"]):
        return
    with client(world, "editor", "key") as api:
        body = f"# Victim {next(_unique)}\n\nThe linen store is restocked every Tuesday at dawn.".encode()
        job = api.post("/api/documents", data={"collection": "alpha"}, files=[("file", ("victim.md", body))]).json()
        world.state["victim"] = _finished(api, job["jobs"][0]["job_id"])["document_id"]


def _exists(world: World, document_id: str) -> bool:
    with client(world, "editor", "key") as api:
        return document_id in api.get("/api/documents").text


def _finished(api: httpx.Client, job_id: str) -> dict:
    import time

    for _ in range(600):
        job = api.get(f"/api/jobs/{job_id}").json()
        if job["state"] in ("done", "failed"):
            assert job["state"] == "done", job
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish")


def _editor_job(call: Call) -> None:
    if "job" not in call.world.state:
        with client(call.world, "editor", "key") as api:
            files = [("file", ("job.md", b"# Job\n\nThe porters' lodge is staffed around the clock."))]
            job = api.post("/api/documents", data={"collection": "alpha"}, files=files).json()
            call.world.state["job"] = _finished(api, job["jobs"][0]["job_id"])["id"]


def _conversation(call: Call) -> None:
    """A conversation of the reader with a grant (made again once it is deleted)."""
    world = call.world
    found = world.state.get("conversation")
    if found:
        try:
            conversations.get(world.engine, world.user_id("granted"), found)
            return
        except NotFound:
            pass
    world.state["conversation"] = conversations.start(
        world.engine, world.user_id("granted"), "How long are records kept?", ["alpha"]
    ).id


def _quietly(action: Callable[[], Any]) -> None:
    try:
        action()
    except (Conflict, NotFound):
        pass


def _spare_key(call: Call) -> None:
    key = users.create_key(call.world.engine, "spare-user")
    call.world.state["spare_key_prefix"] = key[:12]


def _upload(call: Call) -> list:
    return [("file", (f"note-{call.caller}-{call.mode}.md", b"# Note\n\nThe night shift hands over at 7."))]


def _named(prefix: str) -> Callable[[Call], str]:
    return lambda call: f"{prefix}-{call.caller}-{call.mode}-{next(_unique)}"


ROWS: list[Row] = [
    # --- public ----------------------------------------------------------------------------------
    Row("ollama root", "GET", "/", everyone(200)),
    Row("ollama root (HEAD)", "HEAD", "/", everyone(200)),
    Row("ask page", "GET", "/", PAGE, headers={"accept": "text/html"}, page=True),
    Row("favicon", "GET", "/favicon.ico", everyone(204)),
    Row("version", "GET", "/api/version", everyone(200)),
    Row("static file", "GET", "/static/{name}", everyone(200), path="/static/app.css"),
    Row("liveness", "GET", "/health", everyone(200)),
    Row("readiness", "GET", "/ready", everyone(200)),
    # From loopback (where the matrix runs) a caller without credentials may scrape; credentials must be an admin's.
    Row("metrics", "GET", "/metrics", E(200, 403, 403, 403, 403, 200)),
    # --- Ollama API: models are for every signed-in caller, managing them for admins ---------------
    Row(
        "generate",
        "POST",
        "/api/generate",
        USERS,
        json={"model": "tiny", "prompt": "hi", "stream": False, "options": {"num_predict": 1}},
    ),
    Row(
        "chat",
        "POST",
        "/api/chat",
        USERS,
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": False,
            "options": {"num_predict": 1},
        },
    ),
    Row(
        "chat with rag/alpha",
        "POST",
        "/api/chat",
        READ_ALPHA,
        json={
            "model": "rag/alpha",
            "messages": [{"role": "user", "content": "How long are records kept?"}],
            "stream": False,
        },
    ),
    Row("embed", "POST", "/api/embed", USERS, json={"model": "all-minilm", "input": "hello"}),
    Row("embeddings (legacy)", "POST", "/api/embeddings", USERS, json={"model": "all-minilm", "prompt": "hello"}),
    Row("tags", "GET", "/api/tags", USERS, shows=lambda w: "rag/alpha"),
    Row("show", "POST", "/api/show", USERS, json={"model": "tiny"}),
    Row("ps", "GET", "/api/ps", USERS),
    Row(
        "copy a model",
        "POST",
        "/api/copy",
        ADMIN_API,
        json=lambda c: {"source": "tiny", "destination": _named("copy")(c)},
    ),
    Row("delete a model", "DELETE", "/api/delete", ADMIN_API, json={"model": "doomed"}, prepare=_doomed_model),
    Row(
        "create a model",
        "POST",
        "/api/create",
        ADMIN_API,
        json=lambda c: {"model": _named("made")(c), "from": "tiny", "stream": False},
    ),
    Row("blob exists", "HEAD", "/api/blobs/{digest}", ADMIN_API, path=lambda c: f"/api/blobs/{c.world.tiny_digest}"),
    Row(
        "blob upload",
        "POST",
        "/api/blobs/{digest}",
        E(401, 403, 403, 403, 403, 201),
        path="/api/blobs/sha256:" + hashlib.sha256(b"matrix blob").hexdigest(),
        content=b"matrix blob",
    ),
    Row("pull (never: offline)", "POST", "/api/pull", E(401, 403, 403, 403, 403, 400), json={"model": "x"}),
    Row("push (never: offline)", "POST", "/api/push", E(401, 403, 403, 403, 403, 400), json={"model": "x"}),
    # --- OpenAI API ------------------------------------------------------------------------------
    Row(
        "chat completions",
        "POST",
        "/v1/chat/completions",
        USERS,
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    ),
    Row(
        "chat completions with rag/alpha",
        "POST",
        "/v1/chat/completions",
        READ_ALPHA,
        json={"model": "rag/alpha", "messages": [{"role": "user", "content": "How long are records kept?"}]},
    ),
    Row("completions", "POST", "/v1/completions", USERS, json={"model": "tiny", "prompt": "hi", "max_tokens": 1}),
    Row("embeddings", "POST", "/v1/embeddings", USERS, json={"model": "all-minilm", "input": "hello"}),
    Row("models", "GET", "/v1/models", USERS, shows=lambda w: "rag/alpha"),
    Row("a model", "GET", "/v1/models/{model:path}", USERS, path="/v1/models/tiny"),
    Row("the rag/alpha model", "GET", "/v1/models/{model:path}", READ_ALPHA, path="/v1/models/rag/alpha"),
    # --- documents and jobs ----------------------------------------------------------------------
    Row(
        "upload to alpha",
        "POST",
        "/api/documents",
        E(401, 403, 403, 403, 200, 403),  # an editor grant is needed; the admin role alone is not enough
        data={"collection": "alpha"},
        files=_upload,
    ),
    Row(
        "upload creating a collection",
        "POST",
        "/api/documents",
        E(401, 403, 403, 403, 403, 200),  # an admin creates it; an editor is refused as for an existing name
        data=lambda c: {"collection": _named("new")(c)},
        files=_upload,
    ),
    Row(
        "the editor's job",
        "GET",
        "/api/jobs/{job_id}",
        E(401, 404, 404, 404, 200, 404),  # its owner, and admins only where they may read (this one may not)
        path=lambda c: f"/api/jobs/{c.world.state['job']}",
        prepare=_editor_job,
        withheld=True,
    ),
    Row("list documents", "GET", "/api/documents", USERS, shows=lambda w: w.doc_id),
    Row(
        "delete a document in alpha",
        "DELETE",
        "/api/documents/{document_id}",
        E(401, 404, 403, 404, 200, 404),  # unreadable: like missing; readable but not editable: 403
        path=lambda c: f"/api/documents/{c.world.state['victim']}",
        prepare=_victim_document,
        withheld=True,
    ),
    # --- questions and conversations -------------------------------------------------------------
    Row(
        "search alpha",
        "POST",
        "/api/rag/search",
        READ_ALPHA,
        json={"query": "how long are records kept", "collections": ["alpha"]},
    ),
    Row(
        "search everywhere",
        "POST",
        "/api/rag/search",
        USERS,
        json={"query": "how long are records kept"},
        shows=lambda w: w.doc_id,
    ),
    Row(
        "ask alpha",
        "POST",
        "/api/rag/ask",
        READ_ALPHA,
        json={"question": "How long are records kept?", "collections": ["alpha"], "stream": False, "store": False},
    ),
    Row("list conversations", "GET", "/api/rag/conversations", USERS),
    Row(
        "another's conversation",
        "GET",
        "/api/rag/conversations/{conversation_id}",
        E(401, 404, 200, 404, 404, 404),  # only its owner (granted)
        path=lambda c: f"/api/rag/conversations/{c.world.state['conversation']}",
        prepare=_conversation,
        withheld=True,
    ),
    Row(
        "delete another's conversation",
        "DELETE",
        "/api/rag/conversations/{conversation_id}",
        E(401, 404, 200, 404, 404, 404),
        path=lambda c: f"/api/rag/conversations/{c.world.state['conversation']}",
        prepare=_conversation,
        withheld=True,
    ),
    # --- sign-in ---------------------------------------------------------------------------------
    Row("sign-in page", "GET", "/login", E(200, 303, 303, 303, 303, 303), page=True),
    Row(
        "sign-in with a wrong password",
        "POST",
        "/login",
        everyone(401),
        data=lambda c: {"csrf": prelogin(c), "username": "nobody-at-all", "password": "wrong password"},
        page=True,
    ),
    Row("code page without a pending sign-in", "GET", "/login/totp", everyone(303), page=True),
    Row("code without a pending sign-in", "POST", "/login/totp", everyone(303), data={"code": "000000"}, page=True),
    Row("enrolment page", "GET", "/mfa/enrol", E(303, 200, 200, 200, 200, 200), page=True),
    Row(
        "enrolment with a wrong code",
        "POST",
        "/mfa/enrol",
        E(403, 400, 400, 400, 400, 400),
        data={"code": "000000"},
        page=True,
    ),  # fmt: skip
    Row("sign-out", "POST", "/logout", everyone(303), data={}, page=True, fresh_session=True),
    Row("setup page once an admin exists", "GET", "/setup", everyone(403), page=True),
    Row(
        "setup once an admin exists",
        "POST",
        "/setup",
        everyone(403),
        data=lambda c: {"csrf": prelogin(c), "username": "intruder", "password": PASSWORD, "password2": PASSWORD},
        page=True,
    ),
    Row("OIDC sign-in (not set up)", "GET", "/login/oidc", everyone(404), page=True),
    Row("OIDC callback (not set up)", "GET", "/login/oidc/callback", everyone(404), page=True),
    # --- pages -----------------------------------------------------------------------------------
    Row("documents page", "GET", "/documents", PAGE, page=True, shows=lambda w: w.doc_id),
    Row(
        "document page",
        "GET",
        "/documents/{document_id}",
        E(303, 404, 200, 404, 200, 404),
        path=lambda c: f"/documents/{c.world.doc_id}",
        page=True,
        withheld=True,
    ),
    Row("upload page", "GET", "/upload", PAGE, page=True),
    Row("admin page", "GET", "/admin", ADMIN_PAGE, page=True),
    Row("audit export", "GET", "/admin/audit.jsonl", ADMIN_PAGE, page=True),
    Row("create a key", "POST", "/admin/key-create", ADMIN_PAGE, data={"user": "spare-user"}, page=True),
    Row(
        "break-glass",
        "POST",
        "/admin/break-glass",
        ADMIN_FORM,
        data={"collection": "spare", "reason": REASON, "minutes": "5"},
        page=True,
    ),
    Row(
        "set a document's readers",
        "POST",
        "/admin/document-acl",
        E(303, 403, 403, 403, 403, 303),  # done: back to the document's page with a notice
        data=lambda c: {"document": c.world.doc_id, "acl": ""},  # its ACL already (alpha's readers)
        page=True,
    ),
]

# Each administration form: what it posts, and what must hold before (so that the admin's post succeeds).
ADMIN_FORMS: dict[str, tuple[dict | Callable[[Call], dict], Callable[[Call], None] | None]] = {
    "user-add": (lambda c: {"name": _named("made")(c), "role": "reader"}, None),
    "user-disable": ({"name": "spare-user"}, None),
    "user-enable": ({"name": "spare-user"}, None),
    "user-password": ({"name": "spare-user", "password": PASSWORD}, None),
    "user-mfa-reset": ({"name": "spare-user"}, None),
    "user-role": ({"name": "spare-user", "role": "reader"}, None),  # its role already: nothing else changes
    "group-add": (lambda c: {"name": _named("group")(c)}, None),
    "member-add": (
        {"group": "spare-group", "user": "spare-user"},
        lambda c: _quietly(lambda: rbac.remove_member(c.world.engine, "spare-group", "spare-user")),
    ),
    "member-rm": (
        {"group": "spare-group", "user": "spare-user"},
        lambda c: _quietly(lambda: rbac.add_member(c.world.engine, "spare-group", "spare-user")),
    ),
    "key-revoke": (lambda c: {"prefix": c.world.state["spare_key_prefix"]}, _spare_key),
    "collection-add": (lambda c: {"name": _named("coll")(c)}, None),
    "grant-add": ({"collection": "spare", "kind": "user", "subject": "spare-user", "role": "reader"}, None),
    "grant-rm": (
        {"collection": "spare", "kind": "user", "subject": "spare-user"},
        lambda c: rbac.add_grant(c.world.engine, "spare", user="spare-user"),
    ),
    "wall-add": ({"collection": "spare", "kind": "user", "subject": "spare-user"}, None),
    "wall-rm": (
        {"collection": "spare", "kind": "user", "subject": "spare-user"},
        lambda c: rbac.add_wall(c.world.engine, "spare", user="spare-user"),
    ),
}
ROWS += [
    Row(
        f"admin form {action}",
        "POST",
        "/admin/{action}",
        ADMIN_FORM,
        path=f"/admin/{action}",
        data=data,
        prepare=prepare,
        page=True,
    )  # fmt: skip
    for action, (data, prepare) in ADMIN_FORMS.items()
]


def _declared_routes() -> set[tuple[str, str]]:
    """(method, path) of every route the app declares (included routers walked through)."""
    from web.app import create_app

    app = create_app(Settings(home=Path("/nonexistent-matrix-home")))  # the lifespan (and so the home) is never used

    def walk(routes):
        for route in routes:
            if hasattr(route, "effective_route_contexts"):  # FastAPI's included router
                for context in route.effective_route_contexts():
                    yield context.path, context.methods
            else:
                yield route.path, getattr(route, "methods", None) or set()

    return {(method, path) for path, methods in walk(app.routes) for method in methods}


def test_every_route_has_a_row_and_every_row_a_route():
    declared = _declared_routes()
    covered = {(row.method, row.route) for row in ROWS}
    assert declared - covered == set(), "a route without a row in the authorization matrix: add one"
    assert covered - declared == set(), "a row for a route the app does not have"
    assert set(ADMIN_FORMS) == set(admin_pages.ACTIONS), "every administration form needs a row"
    assert len({row.name for row in ROWS}) == len(ROWS)


def _request(world: World, row: Row, caller: str, mode: str) -> httpx.Response:
    signed = world.sessions.get(caller, ("", "no-session-token"))
    if row.fresh_session and caller != "anonymous" and mode == "session":
        signed = _session(world.engine, caller)
    with client(world, caller, mode, signed) as http:
        call = Call(world, caller, mode, http, signed[1] if mode == "session" else "no-session-token")
        if row.prepare:
            row.prepare(call)
        path = row.path(call) if callable(row.path) else (row.path or row.route)
        body = row.json(call) if callable(row.json) else row.json
        data = row.data(call) if callable(row.data) else row.data
        if data is not None and row.page and "csrf" not in data:
            data = {**data, "csrf": call.csrf}
        files = row.files(call) if row.files else None
        return http.request(
            row.method, path, json=body, data=data, files=files, content=row.content, headers=row.headers
        )


def _last_refusal_id(world: World) -> int:
    with session(world.engine) as db:
        return db.exec(select(func.max(AuditRecord.id)).where(AuditRecord.outcome == "denied")).one() or 0


def _refusal_recorded(world: World, after: int, caller: str) -> bool:
    """Whether a refusal naming `caller` was recorded since record `after` (finding 6: every 403 is audited)."""
    with session(world.engine) as db:
        query = select(AuditRecord.actor).where(AuditRecord.outcome == "denied", AuditRecord.id > after)
        return caller in set(db.exec(query))


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_authorization_matrix(world, row):
    wrong = []
    for caller, mode in itertools.product(CALLERS, MODES):
        if caller == "anonymous" and mode == "session":
            continue  # anonymous has no credentials in either mode
        expected = row.expected(caller, mode)
        who = "anonymous" if row.page and mode == "key" else caller  # pages ignore keys
        last_refusal = _last_refusal_id(world)
        response = _request(world, row, caller, mode)
        if response.status_code != expected:
            wrong.append(f"{caller}/{mode}: {response.status_code} (expected {expected}) {response.text[:200]!r}")
        elif (
            (expected == 403 or (expected == 404 and row.withheld))
            and who != "anonymous"
            and not _refusal_recorded(world, last_refusal, caller)
        ):
            wrong.append(f"{caller}/{mode}: refused, but no audit record names {caller} as refused")
        elif row.shows and 200 <= expected < 300:
            reads = caller in READERS and not (row.page and mode == "key")
            if (row.shows(world) in response.text) != reads:
                wrong.append(f"{caller}/{mode}: {'shows' if not reads else 'hides'} what only readers of alpha see")
    assert wrong == [], f"{row.method} {row.route} ({row.name}):\n" + "\n".join(wrong)


# --- beyond the statuses: what the matrix's successful and refused calls leave behind --------------
def _records(world: World, action: str) -> list[dict]:
    return [r for r in audit.export(world.engine, action=action)]


def test_break_glass_in_the_browser_reads_until_it_expires(world):
    """admin2 reads alpha only through break-glass: a banner shows while it lasts; it is audited."""
    document = f"/documents/{world.doc_id}"
    with client(world, "admin2", "session") as browser, client(world, "admin2", "key") as api:
        csrf = world.sessions["admin2"][1]
        assert browser.get(document).status_code == 404
        assert "Break-glass access is active" not in browser.get("/documents").text
        short = browser.post("/admin/break-glass", data={"csrf": csrf, "collection": "alpha", "reason": "urgent"})
        assert short.status_code == 400 and "10 characters" in short.text
        too_long = {"csrf": csrf, "collection": "alpha", "reason": REASON, "minutes": "100000"}
        assert browser.post("/admin/break-glass", data=too_long).status_code == 400
        ok = browser.post("/admin/break-glass", data={"csrf": csrf, "collection": "alpha", "reason": REASON})
        assert ok.status_code == 303
        page = browser.get(document)
        assert page.status_code == 200 and "Break-glass access is active" in page.text and "alpha until" in page.text
        assert api.post("/api/rag/search", json={"query": "records", "collections": ["alpha"]}).status_code == 200
        assert not rbac.access_for_user(world.engine, "admin2").may("edit", "alpha")

        admin2 = world.user_id("admin2")
        with session(world.engine) as db:  # time passes
            mine = (Grant.subject_kind == "user") & (Grant.subject_id == admin2)
            db.execute(update(Grant).where(mine).values(expires_at=utcnow() - timedelta(seconds=1)))
            db.commit()
        assert browser.get(document).status_code == 404  # on the very next request
        assert "Break-glass access is active" not in browser.get("/documents").text
        assert api.post("/api/rag/search", json={"query": "records", "collections": ["alpha"]}).status_code == 404

        rbac.add_wall(world.engine, "alpha", user="admin2")
        walled = browser.post("/admin/break-glass", data={"csrf": csrf, "collection": "alpha", "reason": REASON})
        assert walled.status_code == 403 and "wall" in walled.text
        assert browser.get(document).status_code == 404

    mine = [r for r in _records(world, "break_glass") if r["actor"] == "admin2"]
    assert [r["outcome"] for r in mine] == ["failed", "failed", "ok", "denied"]
    assert mine[2]["target"] == "alpha" and mine[2]["details"]["reason"] == REASON
    assert mine[2]["details"]["minutes"] == 60 and mine[2]["details"]["expires_at"]
    assert audit.verify(world.engine)[0]


def test_admin_forms_and_refusals_leave_precise_audit_records(world):
    forms = {"user-disable": "user_disable", "user-enable": "user_enable", "user-password": "password_set"}
    forms["user-mfa-reset"] = "mfa_reset"
    with client(world, "admin2", "session") as browser:
        csrf = world.sessions["admin2"][1]
        for form in forms:
            sent = {"csrf": csrf, "name": "spare-user", "password": PASSWORD}
            assert browser.post(f"/admin/{form}", data=sent).status_code == 303, form
        assert browser.post("/admin/user-enable", data={"csrf": csrf, "name": "nobody-at-all"}).status_code == 404
    for action in forms.values():
        records = [r for r in _records(world, action) if r["actor"] == "admin2"]
        assert [(r["target"], r["outcome"]) for r in records if r["outcome"] == "ok"] == [("user:spare-user", "ok")]
    [failed] = [r for r in _records(world, "user_enable") if r["actor"] == "admin2" and r["outcome"] == "failed"]
    assert "nobody-at-all" in failed["details"]["error"]
    # A stale form token: refused, and the record names who sent it.
    with client(world, "editor", "session") as browser:
        assert browser.post("/logout", data={"csrf": "stale"}).status_code == 403
    [refused] = [r for r in _records(world, "csrf_refused") if r["actor"] == "editor"]
    assert refused["outcome"] == "denied" and refused["details"]["path"] == "/logout"
    # A session past its maximum length: the next page is refused, and that is recorded.
    users.add_user(world.engine, "leaver", "reader", PASSWORD)
    token, _ = _session(world.engine, "leaver")
    with session(world.engine) as db:
        old = WebSession.token_hash == hashlib.sha256(token.encode()).hexdigest()
        db.execute(update(WebSession).where(old).values(created_at=utcnow() - timedelta(days=2)))
        db.commit()
    with httpx.Client(base_url=world.server.url, cookies={COOKIE: token}) as browser:
        response = browser.get("/documents", follow_redirects=False)
        assert response.status_code == 303 and "ended=expired" in response.headers["location"]
    [ended] = [r for r in _records(world, "session_refused") if r["actor"] == "leaver"]
    assert ended["details"]["reason"] == "expired" and ended["outcome"] == "denied"
    # First-run setup once an admin exists: refused, and recorded as such.
    with httpx.Client(base_url=world.server.url) as browser:
        token = re.search(r'name="csrf" value="([^"]+)"', browser.get("/login").text).group(1)
        sent = {"csrf": token, "username": "intruder", "password": PASSWORD, "password2": PASSWORD}
        assert browser.post("/setup", data=sent).status_code == 403
    setups = _records(world, "setup")
    assert setups and {r["outcome"] for r in setups} == {"denied"} and "-" in {r["actor"] for r in setups}


def test_the_upload_page_offers_a_new_collection_to_admins_only(world):
    """As the documents API allows: an admin may name a new collection; an editor uploads where granted."""
    for caller, may_create, lists_alpha in (("editor", False, True), ("admin", True, False), ("granted", False, False)):
        with client(world, caller, "session") as browser:
            page = browser.get("/upload").text
        assert ('id="new-collection"' in page) == may_create, caller
        assert ('<option value="alpha">' in page) == lists_alpha, caller
        assert ("You may not upload" in page) == (not may_create and not lists_alpha), caller
        assert ('href="/upload"' in page) == (may_create or lists_alpha), caller  # offered where it works


def test_an_admin_sets_a_documents_readers_and_a_users_role_from_the_pages(world):
    """The document page's access form narrows who reads it at once (list and search); the users table's role
    form changes a role; both are audited."""
    with client(world, "admin", "session") as browser, client(world, "granted", "key") as granted:
        csrf = world.sessions["admin"][1]
        assert world.doc_id in granted.get("/api/documents").text
        narrowed = browser.post(
            "/admin/document-acl", data={"csrf": csrf, "document": world.doc_id, "acl": "user:editor"}
        )
        assert narrowed.status_code == 303 and narrowed.headers["location"].startswith(f"/documents/{world.doc_id}")
        try:
            assert world.doc_id not in granted.get("/api/documents").text
            found = granted.post("/api/rag/search", json={"query": "retention of records", "collections": ["alpha"]})
            assert found.status_code == 200  # other documents of alpha may match; this one must not
            assert world.doc_id not in {hit["document_id"] for hit in found.json()["results"]}
            bad = browser.post("/admin/document-acl", data={"csrf": csrf, "document": world.doc_id, "acl": "nobody"})
            assert bad.status_code == 400 and "invalid ACL entry" in bad.text
        finally:
            browser.post("/admin/document-acl", data={"csrf": csrf, "document": world.doc_id, "acl": ""})
        assert world.doc_id in granted.get("/api/documents").text
        assert (
            browser.post("/admin/user-role", data={"csrf": csrf, "name": "spare-user", "role": "editor"}).status_code
            == 303
        )
        assert users.get_user(world.engine, "spare-user").role == "editor"
        browser.post("/admin/user-role", data={"csrf": csrf, "name": "spare-user", "role": "reader"})
    acl_records = [r for r in _records(world, "acl_set") if r["actor"] == "admin" and r["outcome"] == "ok"]
    assert [r["details"]["acl"] for r in acl_records[-2:]] == [["user:editor"], ["collection:alpha"]]
    assert [r["details"]["role"] for r in _records(world, "role_set")[-2:]] == ["editor", "reader"]
