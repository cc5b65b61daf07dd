"""The web app's security at the HTTP level, against a real server: headers, CSRF, sessions (fixation,
logout, idle and absolute timeouts, disabled users), lockout, first-run setup, TOTP, escaping."""

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pyotp
import pytest

from appliance.access import audit
from appliance.access.rbac import add_grant, add_group, add_member
from appliance.access.users import add_user, create_key, set_totp
from appliance.db import create_db_engine
from tests.conftest import Server, launch_server, run_cli, stop_server

CORPUS = Path(__file__).parent.parent / "sample_corpus"
COOKIE = "appliance_session"  # the plain-http name (__Host-session needs TLS)
PASSWORD = "correct horse battery"
HOSTILE = """Visitor guidance for the cardiology ward.

<script>alert('owned')</script>
<img src=http://evil.example/pixel.png onerror=alert(1)>
Visiting hours are from two until eight in the evening.
"""
CSP = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:"
STRANGER = "127.0.0.2"  # another client address: the whole of 127.0.0.0/8 reaches the server on Linux


@dataclass
class Site:
    server: Server
    boss_totp: str  # the admin's TOTP secret
    tessa_totp: str  # a reader who chose TOTP
    hostile_id: str  # a hospital document whose text holds HTML
    lawfirm_id: str  # a document the reader may not read
    chief_totp: str  # an admin whom a stranger tries to lock out
    tom_totp: str  # a reader whose password leaked


def _document_id(home: Path, filename: str) -> str:
    listing = json.loads(run_cli(home, "documents", "list", "--json").stdout)
    return next(d["id"] for d in listing if d["filename"] == filename)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    home = tmp_path_factory.mktemp("web")
    files = tmp_path_factory.mktemp("web-files")
    (files / "visitors.txt").write_text(HOSTILE)
    run_cli(
        home,
        "ingest",
        str(files / "visitors.txt"),
        str(CORPUS / "hospital/records-retention-policy.md"),
        "--collection",
        "hospital",
    )
    run_cli(home, "ingest", str(CORPUS / "lawfirm/engagement-letter-template.md"), "--collection", "lawfirm")
    engine = create_db_engine(f"sqlite:///{home / 'appliance.db'}")
    boss = add_user(engine, "boss", "admin", PASSWORD)
    secret = pyotp.random_base32()
    set_totp(engine, boss.id, secret)
    add_user(engine, "newadmin", "admin", PASSWORD)
    for name in ("rita", "victim", "leaver"):
        add_user(engine, name, "reader", PASSWORD)
    tess_secret = pyotp.random_base32()
    set_totp(engine, add_user(engine, "tessa", "reader", PASSWORD).id, tess_secret)  # TOTP is optional for readers
    chief_secret, tom_secret = pyotp.random_base32(), pyotp.random_base32()
    set_totp(engine, add_user(engine, "chief", "admin", PASSWORD).id, chief_secret)
    set_totp(engine, add_user(engine, "tom", "reader", PASSWORD).id, tom_secret)
    add_group(engine, "clinical")
    for name in ("rita", "leaver"):
        add_member(engine, "clinical", name)
    add_grant(engine, "hospital", group="clinical")
    admin_key = create_key(engine, "boss")
    reader_key = create_key(engine, "rita")
    engine.dispose()
    server = launch_server(
        home,
        admin_key,
        reader_key,
        APPLIANCE_LOGIN_MAX_FAILURES="3",
        APPLIANCE_LOGIN_MAX_FAILURES_PER_ADDRESS="1000",
        APPLIANCE_LOGIN_LOCKOUT_S="600",
    )
    yield Site(
        server,
        secret,
        tess_secret,
        _document_id(home, "visitors.txt"),
        _document_id(home, "engagement-letter-template.md"),
        chief_secret,
        tom_secret,
    )
    stop_server(server)


@pytest.fixture(scope="module")
def admin(site):
    """The admin's browser, signed in once (each TOTP code is accepted only once)."""
    with browser(site.server) as client:
        assert sign_in(client, "boss", secret=site.boss_totp).status_code == 303
        yield client


def browser(server: Server, address: str = "127.0.0.1") -> httpx.Client:
    """A browser connecting from this client address."""
    return httpx.Client(
        base_url=server.url,
        follow_redirects=False,
        timeout=60,
        headers={"accept": "text/html"},
        transport=httpx.HTTPTransport(local_address=address),
    )


def form_token(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "no CSRF field in the form"
    return match.group(1)


def sign_in(client: httpx.Client, name: str, password: str = PASSWORD, secret: str | None = None) -> httpx.Response:
    token = form_token(client.get("/login").text)
    response = client.post("/login", data={"csrf": token, "username": name, "password": password})
    if secret and response.headers.get("location") == "/login/totp":
        token = form_token(client.get("/login/totp").text)
        response = client.post("/login/totp", data={"csrf": token, "code": pyotp.TOTP(secret).now()})
    return response


def page_token(client: httpx.Client, path: str = "/documents") -> str:
    response = client.get(path)
    assert response.status_code == 200, response.text
    return form_token(response.text)


def test_security_headers_on_every_kind_of_response(site):
    with browser(site.server) as client:
        for path in ("/login", "/static/app.css", "/api/version", "/no-such-page"):
            headers = client.get(path).headers
            assert headers["content-security-policy"].startswith(CSP), path
            assert "frame-ancestors 'none'" in headers["content-security-policy"]
            assert "unsafe-inline" not in headers["content-security-policy"]
            assert headers["x-content-type-options"] == "nosniff"
            assert headers["referrer-policy"] == "no-referrer"
            assert headers["x-frame-options"] == "DENY"
        css = client.get("/static/app.css")
        assert css.headers["content-type"].startswith("text/css") and "immutable" in css.headers["cache-control"]
        js = client.get("/static/ask.js")
        assert js.headers["content-type"].startswith("text/javascript")
        assert client.get("/static/../app.py").status_code == 404
        assert client.get("/login").headers["cache-control"] == "no-store"


def test_pages_have_no_inline_script_style_or_handlers(site, admin):
    for client in (admin,):
        for path in ("/", "/documents", f"/documents/{site.hostile_id}", "/upload", "/admin", "/mfa/enrol"):
            html = client.get(path).text
            assert not re.search(r"<script(?![^>]*\bsrc=)", html), path
            assert not re.search(r"\son[a-z]+\s*=", html), path
            assert " style=" not in html and "<style" not in html, path
            assert "http://" not in html and "https://" not in html, path  # nothing from another origin


def test_first_run_setup_is_refused_once_an_admin_exists(site):
    with browser(site.server) as client:
        assert client.get("/setup").status_code == 403
        token = form_token(client.get("/login").text)
        response = client.post(
            "/setup", data={"csrf": token, "username": "intruder", "password": PASSWORD, "password2": PASSWORD}
        )
        assert response.status_code == 403 and "already exists" in response.text
        assert sign_in(client, "intruder").status_code == 401


def test_login_form_needs_its_csrf_token(site):
    with browser(site.server) as client:
        response = client.post("/login", data={"username": "rita", "password": PASSWORD})
        assert response.status_code == 403 and "expired" in response.text
        client.get("/login")
        response = client.post("/login", data={"csrf": "0" * 64, "username": "rita", "password": PASSWORD})
        assert response.status_code == 403
        assert COOKIE not in client.cookies
    with browser(site.server) as other:  # a token from another browser's form is stale here
        stolen = form_token(other.get("/login").text)
    with browser(site.server) as client:
        client.get("/login")
        response = client.post("/login", data={"csrf": stolen, "username": "rita", "password": PASSWORD})
        assert response.status_code == 403


def test_a_new_session_id_at_sign_in_and_logout_invalidates_it(site):
    with browser(site.server) as client:
        client.cookies.set(COOKIE, "attacker-chosen-session-id", domain="127.0.0.1")
        response = sign_in(client, "rita")
        assert response.status_code == 303 and response.headers["location"] == "/"
        cookie = response.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
        first = client.cookies.get(COOKIE, domain="127.0.0.1")
        assert first and first != "attacker-chosen-session-id"
        assert client.get("/documents").status_code == 200
        assert client.post("/logout", data={"csrf": page_token(client)}).status_code == 303
        assert client.get("/documents").headers["location"].startswith("/login")
        assert sign_in(client, "rita").status_code == 303
        assert client.cookies.get(COOKIE, domain="127.0.0.1") not in (first, None)
    with browser(site.server) as replay:
        replay.cookies.set(COOKIE, first, domain="127.0.0.1")
        assert replay.get("/documents").headers["location"].startswith("/login")
        assert replay.get("/api/rag/conversations").status_code == 401


def test_state_changes_need_the_session_csrf_token_and_never_happen_on_get(site, admin):
    with browser(site.server) as other:
        sign_in(other, "rita")
        stale = page_token(other)  # a real token, but of another session
    assert admin.post("/admin/group-add", data={"name": "nocsrf"}).status_code == 403
    assert admin.get("/admin/group-add", params={"name": "viaget"}).status_code == 405
    assert admin.get("/logout").status_code == 405
    assert admin.post("/admin/group-add", data={"name": "stale", "csrf": stale}).status_code == 403
    fresh = page_token(admin, "/admin")
    assert admin.post("/admin/group-add", data={"name": "fresh", "csrf": fresh}).status_code == 303
    groups = admin.get("/admin").text
    assert "<strong>fresh</strong>" in groups
    assert "nocsrf" not in groups and "viaget" not in groups and "<strong>stale</strong>" not in groups
    # The JSON APIs with the session cookie: reads need no token, writes need the header.
    assert admin.get("/api/rag/conversations").status_code == 200
    ask = {"question": "visiting hours?", "collections": ["hospital"], "stream": False}
    assert admin.post("/api/rag/ask", json=ask).status_code == 403
    assert admin.post("/api/rag/ask", json=ask, headers={"X-CSRF-Token": stale}).status_code == 403
    with site.server.http(site.server.reader_key) as api:  # API keys work as before, without any CSRF token
        assert api.post("/api/rag/ask", json=ask).status_code == 200


def test_disabling_a_user_ends_their_session_at_once(site, admin):
    with browser(site.server) as leaver:
        assert sign_in(leaver, "leaver").status_code == 303
        assert leaver.get("/documents").status_code == 200
        token = page_token(admin, "/admin")
        assert admin.post("/admin/user-disable", data={"name": "leaver", "csrf": token}).status_code == 303
        assert leaver.get("/api/rag/conversations").status_code == 401
        response = leaver.get("/documents")
        assert response.status_code == 303 and response.headers["location"].startswith("/login")
        assert sign_in(leaver, "leaver").status_code == 401


def test_an_account_is_locked_after_repeated_failures(site):
    with browser(site.server) as client:
        for _ in range(3):
            response = sign_in(client, "victim", "wrong password!")
            assert response.status_code in (401, 429)
        response = sign_in(client, "victim")  # the right password, but locked now
        assert response.status_code == 429 and "Too many failed sign-ins" in response.text
        assert COOKIE not in client.cookies
        assert sign_in(client, "rita").status_code == 303  # another account from the same address is fine


def test_a_stranger_cannot_lock_someone_else_out(site):
    """Wrong passwords from another address lock that address out of the account, not the account's owner."""
    with browser(site.server, STRANGER) as stranger:
        for _ in range(5):  # past APPLIANCE_LOGIN_MAX_FAILURES (3)
            assert sign_in(stranger, "chief", "wrong password!").status_code in (401, 429)
        response = sign_in(stranger, "chief")  # still guessing from there: refused, even the right password
        assert response.status_code == 429 and "Too many failed sign-ins" in response.text
    with browser(site.server) as owner:
        response = sign_in(owner, "chief", secret=site.chief_totp)
        assert response.status_code == 303 and response.headers["location"] == "/"
        assert owner.get("/admin").status_code == 200
    engine = create_db_engine(f"sqlite:///{site.server.home / 'appliance.db'}")
    failed = list(audit.export(engine, actor="chief", action="signin_failed"))
    engine.dispose()
    assert [(r["outcome"], r["details"]["address"]) for r in failed] == [("failed", STRANGER)] * 3 + [
        ("denied", STRANGER)
    ] * 3


def test_failed_codes_lock_the_account_from_every_address(site):
    """Only someone who knows the password reaches the code step, so failed codes lock the account itself."""
    totp = pyotp.TOTP(site.tom_totp)
    now = time.time()
    valid = {totp.at(now + offset) for offset in (-60, -30, 0, 30, 60)}
    wrong = next(code for code in ("000000", "111111", "222222", "333333", "444444", "555555") if code not in valid)
    with browser(site.server, STRANGER) as thief:
        assert sign_in(thief, "tom").headers["location"] == "/login/totp"
        token = form_token(thief.get("/login/totp").text)
        for _ in range(3):
            assert thief.post("/login/totp", data={"csrf": token, "code": wrong}).status_code == 401
        assert thief.post("/login/totp", data={"csrf": token, "code": totp.now()}).status_code == 429
    with browser(site.server) as owner:
        response = sign_in(owner, "tom", secret=site.tom_totp)
        assert response.status_code == 429 and "Too many failed sign-ins" in response.text


def test_an_admin_must_enrol_totp_before_anything_else(site):
    with browser(site.server) as client:
        response = sign_in(client, "newadmin")
        assert response.status_code == 303 and response.headers["location"] == "/mfa/enrol"
        assert client.get("/admin").headers["location"] == "/mfa/enrol"
        assert client.get("/api/rag/conversations").status_code == 401  # not signed in yet
        page = client.get("/mfa/enrol")
        secret = re.search(r'id="totp-secret">([^<]+)<', page.text).group(1).replace(" ", "")
        assert f"secret={secret}" in page.text and "otpauth://totp/" in page.text
        token = form_token(page.text)
        wrong = f"{(int(pyotp.TOTP(secret).now()) + 1) % 1_000_000:06d}"
        assert client.post("/mfa/enrol", data={"csrf": token, "code": wrong}).status_code == 400
        response = client.post("/mfa/enrol", data={"csrf": token, "code": pyotp.TOTP(secret).now()})
        assert response.status_code == 303 and response.headers["location"] == "/"
        assert client.get("/admin").status_code == 200
    with browser(site.server) as again:
        assert sign_in(again, "newadmin").headers["location"] == "/login/totp"


def test_the_totp_code_is_checked_and_never_accepted_twice(site):
    with browser(site.server) as client:
        response = sign_in(client, "tessa")  # a reader who turned on the optional second factor
        assert response.headers["location"] == "/login/totp"
        assert client.get("/documents").headers["location"] == "/login/totp"
        assert client.get("/api/rag/conversations").status_code == 401
        token = form_token(client.get("/login/totp").text)
        assert client.post("/login/totp", data={"csrf": token, "code": "000000x"}).status_code == 401
        code = pyotp.TOTP(site.tessa_totp).now()
        assert client.post("/login/totp", data={"csrf": token, "code": code}).status_code == 303
        assert client.get("/documents").status_code == 200
    with browser(site.server) as replay:
        sign_in(replay, "tessa")
        token = form_token(replay.get("/login/totp").text)
        assert replay.post("/login/totp", data={"csrf": token, "code": code}).status_code == 401


def test_document_text_is_rendered_escaped_and_only_for_readers(site):
    with browser(site.server) as client:
        assert sign_in(client, "rita").status_code == 303
        html = client.get(f"/documents/{site.hostile_id}").text
        assert "&lt;script&gt;alert(&#39;owned&#39;)&lt;/script&gt;" in html
        assert "<script>alert" not in html and "<img src=http" not in html
        assert "&lt;img src=http://evil.example/pixel.png" in html
        listing = client.get("/documents").text
        assert "visitors.txt" in listing and "engagement-letter" not in listing
        assert "data-delete" not in listing  # a reader may not delete
        assert client.get(f"/documents/{site.lawfirm_id}").status_code == 404
        assert client.get("/admin").status_code == 403
        assert client.get("/upload").status_code == 200 and "You may not upload" in client.get("/upload").text


def test_the_cited_passage_is_highlighted_with_its_page(site):
    with site.server.http(site.server.reader_key) as api:
        answer = api.post(
            "/api/rag/ask",
            json={"question": "How long are maternity records kept?", "collections": ["hospital"], "stream": False},
        ).json()
    citation = answer["citations"][0]
    with browser(site.server) as client:
        sign_in(client, "rita")
        html = client.get(
            f"/documents/{citation['document_id']}",
            params={"chunk": citation["chunk_id"], "start": citation["start"], "end": citation["end"]},
        ).text
    marked = re.search(r'<mark id="passage"[^>]*>(.*?)</mark>', html, re.S).group(1)
    assert " ".join(citation["quote"].split()) in " ".join(marked.split())


@pytest.fixture(scope="module")
def hasty(tmp_path_factory):
    """A server with tiny session timeouts and a low per-address limit."""
    home = tmp_path_factory.mktemp("web-hasty")
    engine = create_db_engine(f"sqlite:///{home / 'appliance.db'}")
    add_user(engine, "rita", "reader", PASSWORD)
    key = create_key(engine, "rita")
    engine.dispose()
    server = launch_server(
        home,
        key,
        key,
        APPLIANCE_SESSION_IDLE_S="3",
        APPLIANCE_SESSION_MAX_S="8",
        APPLIANCE_LOGIN_MAX_FAILURES_PER_ADDRESS="4",
    )
    yield server
    stop_server(server)


def test_idle_and_absolute_session_timeouts(hasty):
    with browser(hasty) as client:
        assert sign_in(client, "rita").status_code == 303
        assert client.get("/documents").status_code == 200
        time.sleep(3.6)
        response = client.get("/documents")
        assert response.status_code == 303 and "ended=idle" in response.headers["location"]
        assert "inactivity" in client.get(response.headers["location"]).text
        assert sign_in(client, "rita").status_code == 303
        started = time.monotonic()
        while time.monotonic() - started < 9.5:  # busy, never idle: still ends at the absolute limit
            response = client.get("/documents")
            if response.status_code != 200:
                break
            time.sleep(0.3)  # well inside the idle limit even when a request is slow on a busy machine
        assert response.status_code == 303 and "ended=expired" in response.headers["location"]
        assert time.monotonic() - started > 7


def test_a_client_address_is_locked_after_many_failures(hasty):
    with browser(hasty) as client:
        for name in ("a1", "a2", "a3", "a4"):
            sign_in(client, name, "wrong password!")
        response = sign_in(client, "rita")
        assert response.status_code == 429 and "Too many failed sign-ins" in response.text
