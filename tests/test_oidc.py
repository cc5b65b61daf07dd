"""Sign-in through the organisation's OpenID Connect provider, against a real appliance server and a real
(small) OpenID provider served by this test on 127.0.0.1: discovery, JWKS, an authorize endpoint that
redirects back with a code, and a token endpoint that checks the client secret and the PKCE verifier and
returns an ID token signed as each test decides (well, or forged)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pyotp
import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey

from appliance.access import audit
from appliance.access.rbac import add_group, add_member, list_groups, sync_mapped_groups
from appliance.access.signin import claimed_groups
from appliance.access.users import add_user, create_key, disable_user, get_user, list_users, oidc_user, set_totp
from appliance.config import OidcSettings
from appliance.db import create_db_engine
from tests.conftest import Server, launch_server, stop_server
from web.oidc import OidcRefused
from web.oidc import Provider as OidcProvider
from web.rendering import safe_next

CLIENT_ID = "appliance-test"
CLIENT_SECRET = "s3cret-" + secrets.token_hex(8)
PASSWORD = "correct horse battery"
GROUP_MAP = {"idp-nurses": "clinical", "idp-lawyers": "legal"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict, claims: dict) -> str:
    return b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())


@dataclass
class Provider:
    """The test's OpenID provider: its state, and what it saw."""

    url: str = ""
    keys: list[RSAKey] = field(default_factory=list)  # published in the JWKS
    signing_key: RSAKey | None = None
    subject: str = "sub-1"
    claims: dict = field(default_factory=dict)  # extra claims of the next ID tokens
    mint: object = None  # fn(claims: dict) -> str, replacing the normal signing (forgeries)
    break_challenge: bool = False  # the token endpoint compares the verifier with a wrong challenge
    codes: dict = field(default_factory=dict)  # code -> what /authorize was asked
    authorize_requests: list = field(default_factory=list)
    token_requests: list = field(default_factory=list)
    issued: list = field(default_factory=list)  # every code and ID token handed out (must never be logged)
    jwks_fetches: int = 0

    def id_token_claims(self, nonce: str | None) -> dict:
        now = int(time.time())
        claims = {"iss": self.url, "aud": CLIENT_ID, "sub": self.subject, "iat": now, "exp": now + 300}
        if nonce is not None:
            claims["nonce"] = nonce
        return {**claims, **self.claims}

    def sign(self, claims: dict, key: RSAKey | None = None) -> str:
        key = key or self.signing_key
        return jwt.encode({"alg": "RS256", "kid": key.kid}, claims, key)


def provider_handler(idp: Provider):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _json(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            parts = urlsplit(self.path)
            if parts.path == "/.well-known/openid-configuration":
                return self._json(
                    200,
                    {
                        "issuer": idp.url,
                        "authorization_endpoint": f"{idp.url}/authorize",
                        "token_endpoint": f"{idp.url}/token",
                        "jwks_uri": f"{idp.url}/jwks",
                        "response_types_supported": ["code"],
                        "subject_types_supported": ["public"],
                        "id_token_signing_alg_values_supported": ["RS256", "HS256", "none"],  # we must still refuse HS
                        "token_endpoint_auth_methods_supported": ["client_secret_basic"],
                        "code_challenge_methods_supported": ["S256"],
                    },
                )
            if parts.path == "/jwks":
                idp.jwks_fetches += 1
                return self._json(200, {"keys": [k.as_dict(private=False) for k in idp.keys]})
            if parts.path == "/authorize":
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                idp.authorize_requests.append(query)
                code = secrets.token_urlsafe(16)
                idp.codes[code] = query
                idp.issued.append(code)
                location = query["redirect_uri"] + "?" + urlencode({"code": code, "state": query["state"]})
                self.send_response(302)
                self.send_header("location", location)
                self.end_headers()
                return None
            return self._json(404, {"error": "not_found"})

        def do_POST(self):
            if urlsplit(self.path).path != "/token":
                return self._json(404, {"error": "not_found"})
            body = self.rfile.read(int(self.headers.get("content-length") or 0)).decode()
            form = {k: v[0] for k, v in parse_qs(body).items()}
            idp.token_requests.append(form)
            expected = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
            if self.headers.get("authorization") != expected:
                return self._json(401, {"error": "invalid_client"})
            asked = idp.codes.pop(form.get("code", ""), None)  # a code is good once
            if asked is None or form.get("grant_type") != "authorization_code":
                return self._json(400, {"error": "invalid_grant"})
            if form.get("redirect_uri") != asked["redirect_uri"]:
                return self._json(400, {"error": "invalid_grant"})
            verifier = form.get("code_verifier", "")
            challenge = b64(hashlib.sha256(verifier.encode()).digest())
            if idp.break_challenge:
                challenge += "x"
            if asked.get("code_challenge_method") != "S256" or challenge != asked.get("code_challenge"):
                return self._json(400, {"error": "invalid_grant", "error_description": "PKCE verification failed"})
            claims = idp.id_token_claims(asked.get("nonce"))
            id_token = idp.mint(claims) if idp.mint else idp.sign(claims)
            idp.issued.append(id_token)
            return self._json(
                200, {"access_token": secrets.token_urlsafe(16), "token_type": "Bearer", "id_token": id_token}
            )

    return Handler


@dataclass
class Site:
    server: Server
    idp: Provider
    engine: object


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    idp = Provider()
    idp.signing_key = RSAKey.generate_key(2048, parameters={"kid": "key-1"})
    idp.keys = [idp.signing_key]
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), provider_handler(idp))
    idp.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    home = tmp_path_factory.mktemp("oidc")
    engine = create_db_engine(f"sqlite:///{home / 'appliance.db'}")
    add_user(engine, "boss", "admin", PASSWORD)
    add_user(engine, "alice", "reader", PASSWORD)  # a local account an IdP account of the same name must not take
    add_group(engine, "local-only")
    server = launch_server(
        home,
        create_key(engine, "boss"),
        create_key(engine, "alice"),
        APPLIANCE_OIDC_ISSUER=idp.url,
        APPLIANCE_OIDC_CLIENT_ID=CLIENT_ID,
        APPLIANCE_OIDC_CLIENT_SECRET=CLIENT_SECRET,
        APPLIANCE_OIDC_GROUP_MAP=json.dumps(GROUP_MAP),
        APPLIANCE_OIDC_DISPLAY_NAME="Test IdP",
        APPLIANCE_LOG_LEVEL="DEBUG",
    )
    yield Site(server, idp, engine)
    stop_server(server)
    httpd.shutdown()
    engine.dispose()


@pytest.fixture
def idp(site):
    """The provider, reset to signing well for a fresh subject."""
    provider = site.idp
    provider.subject = "sub-" + secrets.token_hex(4)
    provider.claims, provider.mint, provider.break_challenge = {}, None, False
    provider.signing_key = provider.keys[0]
    return provider


def browser(server: Server) -> httpx.Client:
    return httpx.Client(base_url=server.url, follow_redirects=False, timeout=60, headers={"accept": "text/html"})


def start(client: httpx.Client, next_path: str = "/documents") -> str:
    """The appliance's redirect to the provider."""
    response = client.get("/login/oidc", params={"next": next_path})
    assert response.status_code == 303, response.text
    return response.headers["location"]


def at_provider(authorize_url: str) -> str:
    """The provider signs the user in and sends the browser back: the callback path on the appliance."""
    response = httpx.get(authorize_url, follow_redirects=False, timeout=30)
    assert response.status_code == 302
    back = urlsplit(response.headers["location"])
    return f"{back.path}?{back.query}"


def oidc_sign_in(client: httpx.Client, next_path: str = "/documents") -> httpx.Response:
    return client.get(at_provider(start(client, next_path)))


def newest(engine, action: str) -> dict:
    records, _ = audit.search(engine, action=action, limit=1)
    return records[0]


def assert_refused(site: Site, response: httpx.Response, reason: str, status: int = 401) -> None:
    assert response.status_code == status, response.text
    assert "Sign-in refused" in response.text
    assert "appliance_session" not in response.cookies
    record = newest(site.engine, "signin_failed")
    assert record["outcome"] == "denied"
    assert record["details"]["via"] == "oidc" and record["details"]["reason"] == reason, record


def groups_of(engine, name: str) -> set[str]:
    return {g["name"] for g in list_groups(engine) if name in g["members"]}


def test_the_login_page_offers_the_provider(site):
    with browser(site.server) as client:
        page = client.get("/login").text
    assert "Sign in with Test IdP" in page and 'href="/login/oidc?next=/"' in page


def test_a_first_sign_in_creates_the_user_with_mapped_groups_and_a_working_session(site, idp):
    idp.claims = {"preferred_username": "nina.nurse", "groups": ["idp-nurses", "idp-lawyers", "idp-unmapped"]}
    with browser(site.server) as client:
        anonymous = client.get("/documents")
        assert anonymous.status_code == 303
        authorize = start(client)
        asked = {k: v[0] for k, v in parse_qs(urlsplit(authorize).query).items()}
        assert asked["response_type"] == "code" and asked["client_id"] == CLIENT_ID
        assert asked["code_challenge_method"] == "S256" and len(asked["code_challenge"]) == 43
        assert asked["state"] and asked["nonce"] and asked["state"] != asked["nonce"]
        assert asked["scope"].split() == ["openid", "profile", "email"]
        assert asked["redirect_uri"] == f"{site.server.url}/login/oidc/callback"
        done = client.get(at_provider(authorize))
        assert done.status_code == 200, done.text
        assert 'http-equiv="refresh" content="0;url=/documents"' in done.text
        assert client.get("/documents").status_code == 200
        assert "nina.nurse" in client.get("/documents").text
    # PKCE: the verifier was sent and matched the challenge (the provider checked it before answering).
    sent = idp.token_requests[-1]
    assert b64(hashlib.sha256(sent["code_verifier"].encode()).digest()) == asked["code_challenge"]
    assert "client_secret" not in sent  # client_secret_basic, as the provider advertises
    user = get_user(site.engine, "nina.nurse")
    assert (user.oidc_issuer, user.oidc_subject, user.role, user.password_hash) == (
        idp.url,
        idp.subject,
        "reader",
        None,
    )
    assert groups_of(site.engine, "nina.nurse") == {"clinical", "legal"}
    signin = newest(site.engine, "signin")
    assert signin["actor"] == "nina.nurse" and signin["details"]["factor"] == "oidc"
    assert newest(site.engine, "user_add")["details"]["via"] == "oidc"


def test_later_sign_ins_find_the_same_user_and_follow_the_group_claim(site, idp):
    idp.claims = {"preferred_username": "gary", "groups": ["idp-nurses", "idp-lawyers"]}
    with browser(site.server) as client:
        assert oidc_sign_in(client).status_code == 200
    add_member(site.engine, "local-only", "gary")  # a group the provider does not decide
    before = len(list_users(site.engine))
    idp.claims = {"preferred_username": "gary-renamed", "groups": ["idp-nurses", "idp-unmapped"]}
    with browser(site.server) as client:
        assert oidc_sign_in(client).status_code == 200
        assert client.get("/documents").status_code == 200
    assert len(list_users(site.engine)) == before  # found by issuer + subject, not created again
    assert groups_of(site.engine, "gary") == {"clinical", "local-only"}  # legal left; local-only untouched
    record = newest(site.engine, "member_rm")
    assert record["target"] == "legal" and record["details"]["via"] == "oidc"  # as the admin page names groups


def test_a_provider_account_cannot_take_over_a_local_account_of_the_same_name(site, idp):
    idp.claims = {"preferred_username": "alice", "email": "alice@example.org"}
    with browser(site.server) as client:
        assert oidc_sign_in(client).status_code == 200
        assert "alice-2" in client.get("/documents").text
    local = get_user(site.engine, "alice")
    assert local.oidc_subject is None and local.password_hash
    assert get_user(site.engine, "alice-2").oidc_subject == idp.subject


def test_a_user_with_totp_still_enters_a_code(site, idp):
    idp.claims = {"preferred_username": "tom"}
    with browser(site.server) as client:
        assert oidc_sign_in(client).status_code == 200
    set_totp(site.engine, get_user(site.engine, "tom").id, pyotp.random_base32())
    with browser(site.server) as client:
        done = oidc_sign_in(client)
        assert done.status_code == 200 and "url=/login/totp" in done.text
        assert client.get("/documents").headers["location"] == "/login/totp"


def _forged_case(site, idp, reason: str, status: int = 401) -> None:
    with browser(site.server) as client:
        response = oidc_sign_in(client)
        assert_refused(site, response, reason, status)
        assert client.get("/documents").status_code == 303  # not signed in
    assert not [u for u in list_users(site.engine) if u.oidc_subject == idp.subject]


def test_a_token_from_another_issuer_is_refused(site, idp):
    idp.mint = lambda claims: idp.sign({**claims, "iss": "http://127.0.0.1:1/evil"})
    _forged_case(site, idp, "wrong_iss")


def test_a_token_for_another_client_is_refused(site, idp):
    idp.mint = lambda claims: idp.sign({**claims, "aud": "another-app"})
    _forged_case(site, idp, "wrong_aud")


def test_several_audiences_need_this_client_as_the_authorized_party(site, idp):
    idp.mint = lambda claims: idp.sign({**claims, "aud": [CLIENT_ID, "another-app"], "azp": "another-app"})
    _forged_case(site, idp, "wrong_azp")


def test_a_wrong_or_missing_nonce_is_refused(site, idp):
    idp.mint = lambda claims: idp.sign({**claims, "nonce": "not-the-one-we-sent"})
    _forged_case(site, idp, "wrong_nonce")
    idp.mint = lambda claims: idp.sign({k: v for k, v in claims.items() if k != "nonce"})
    _forged_case(site, idp, "missing_nonce")


def test_an_expired_token_is_refused(site, idp):
    now = int(time.time())
    idp.mint = lambda claims: idp.sign({**claims, "iat": now - 7200, "exp": now - 3600})
    _forged_case(site, idp, "expired")


def test_a_token_issued_in_the_future_is_refused(site, idp):
    now = int(time.time())
    idp.mint = lambda claims: idp.sign({**claims, "iat": now + 3600, "exp": now + 7200})
    _forged_case(site, idp, "wrong_iat")


def test_an_hs256_token_signed_with_the_public_key_is_refused(site, idp):
    public_pem = idp.signing_key.as_pem(private=False)

    def forge(claims):
        signing_input = unsigned({"alg": "HS256", "typ": "JWT", "kid": idp.signing_key.kid}, claims)
        signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
        return signing_input + "." + b64(signature)

    idp.mint = forge
    _forged_case(site, idp, "algorithm")


def test_an_unsigned_token_is_refused(site, idp):
    idp.mint = lambda claims: unsigned({"alg": "none", "typ": "JWT"}, claims) + "."
    _forged_case(site, idp, "algorithm")


def test_a_bad_signature_is_refused(site, idp):
    other = RSAKey.generate_key(2048, parameters={"kid": idp.signing_key.kid})  # the right kid, the wrong key
    idp.mint = lambda claims: idp.sign(claims, other)
    _forged_case(site, idp, "signature")


def test_an_unknown_key_is_looked_up_once_then_refused(site, idp):
    rogue = RSAKey.generate_key(2048, parameters={"kid": "rogue"})
    idp.mint = lambda claims: idp.sign(claims, rogue)
    fetches = idp.jwks_fetches
    _forged_case(site, idp, "unknown_key")
    assert idp.jwks_fetches == fetches + 1  # fetched again once, in case the provider rotated its keys


def test_a_rotated_key_is_picked_up(site, idp):
    fresh = RSAKey.generate_key(2048, parameters={"kid": "key-2"})
    idp.keys.append(fresh)
    try:
        idp.mint = lambda claims: idp.sign(claims, fresh)
        idp.claims = {"preferred_username": "rotated"}
        with browser(site.server) as client:
            assert oidc_sign_in(client).status_code == 200
            assert client.get("/documents").status_code == 200
    finally:
        idp.keys.remove(fresh)


def test_a_replayed_or_unknown_state_is_refused(site, idp):
    idp.claims = {"preferred_username": "rex"}
    with browser(site.server) as client:
        callback = at_provider(start(client))
        assert client.get(callback).status_code == 200
    with browser(site.server) as client:
        client.get("/login/oidc")  # this browser has a sign-in under way of its own
        assert_refused(site, client.get(callback), "unknown_state", 400)
        assert_refused(site, client.get("/login/oidc/callback?state=made-up&code=abc"), "unknown_state", 400)
        assert_refused(site, client.get("/login/oidc/callback"), "unknown_state", 400)


def test_a_callback_in_another_browser_is_refused(site, idp):
    """Login CSRF: an attacker's own sign-in completed in the victim's browser."""
    with browser(site.server) as attacker:
        callback = at_provider(start(attacker))
    with browser(site.server) as victim:
        assert_refused(site, victim.get(callback), "wrong_browser", 400)
        assert victim.get("/documents").status_code == 303


def test_the_pkce_verifier_must_match(site, idp):
    idp.break_challenge = True
    _forged_case(site, idp, "token_invalid_grant")


def test_an_error_from_the_provider_is_refused(site, idp):
    with browser(site.server) as client:
        state = parse_qs(urlsplit(start(client)).query)["state"][0]
        response = client.get("/login/oidc/callback", params={"state": state, "error": "access_denied"})
        assert_refused(site, response, "provider_access_denied")


def test_a_disabled_user_is_refused(site, idp):
    idp.claims = {"preferred_username": "leaver"}
    with browser(site.server) as client:
        assert oidc_sign_in(client).status_code == 200
        assert client.get("/documents").status_code == 200
    disable_user(site.engine, "leaver")
    with browser(site.server) as client:
        response = oidc_sign_in(client)
        assert_refused(site, response, "disabled", 403)
        assert "disabled" in response.text
        assert newest(site.engine, "signin_failed")["actor"] == "leaver"
        assert client.get("/documents").status_code == 303


def test_no_code_token_or_secret_reaches_the_log_or_the_audit_trail(site):
    assert len(site.idp.issued) > 10
    log = Path(site.server.log_path).read_text()
    trail = json.dumps(list(audit.export(site.engine)))
    for text in (log, trail):
        assert CLIENT_SECRET not in text
        for issued in site.idp.issued:
            assert issued not in text
            signature = issued.split(".")[-1]
            assert not signature or signature not in text
    ok, _, _ = audit.verify(site.engine)
    assert ok


# --- the parts on their own ------------------------------------------------------------------------------
def test_identity_is_issuer_and_subject_and_names_are_never_shared(tmp_path):
    engine = create_db_engine(f"sqlite:///{tmp_path / 'appliance.db'}")
    add_user(engine, "Alice", "reader", PASSWORD)
    first, created = oidc_user(engine, "https://idp.example", "s1", "alice", "reader")
    assert created and first.name == "alice-2"  # equal but for case counts as taken
    again, created = oidc_user(engine, "https://idp.example", "s1", "someone-else", "editor")
    assert not created and again.id == first.id and again.role == "reader"
    other, created = oidc_user(engine, "https://other-idp.example", "s1", "alice", "reader")
    assert created and other.id != first.id and other.name == "alice-3"
    assert oidc_user(engine, "https://idp.example", "s2", "local-operator", "reader")[0].name == "local-operator-2"
    assert oidc_user(engine, "https://idp.example", "s3", " <b>Dr. Ö</b> ", "reader")[0].name == "b-Dr.-b"
    assert oidc_user(engine, "https://idp.example", "s4", "", "reader")[0].name == "oidc-user"
    assert oidc_user(engine, "https://idp.example", "s5", "x" * 200, "reader")[0].name == "x" * 64


def test_mapped_groups_follow_the_claim_and_others_stay(tmp_path):
    engine = create_db_engine(f"sqlite:///{tmp_path / 'appliance.db'}")
    user = add_user(engine, "u", "reader")
    add_group(engine, "local")
    add_member(engine, "local", "u")
    mapped = {"clinical", "legal"}
    assert sync_mapped_groups(engine, user.id, {"clinical", "legal", "local"}, mapped) == (["clinical", "legal"], [])
    assert groups_of(engine, "u") == {"clinical", "legal", "local"}
    assert sync_mapped_groups(engine, user.id, {"legal"}, mapped) == ([], ["clinical"])
    assert sync_mapped_groups(engine, user.id, set(), mapped) == ([], ["legal"])
    assert groups_of(engine, "u") == {"local"}


def test_the_groups_claim_may_be_a_string_a_list_or_nested():
    assert claimed_groups({"groups": ["a", "b", 3, None]}, "groups") == {"a", "b"}
    assert claimed_groups({"groups": "a"}, "groups") == {"a"}
    assert claimed_groups({"realm_access": {"roles": ["r"]}}, "realm_access.roles") == {"r"}
    assert claimed_groups({"groups": {"a": 1}}, "groups") == set()
    assert claimed_groups({}, "groups") == set()


def test_a_discovery_document_naming_another_issuer_is_not_used(site):
    settings = OidcSettings(oidc_issuer=site.idp.url + "/", oidc_client_id=CLIENT_ID)  # a trailing slash differs
    with pytest.raises(OidcRefused) as refused:
        asyncio.run(OidcProvider(settings).metadata())
    assert refused.value.reason == "discovery_issuer" and refused.value.status == 502


def test_a_provider_over_plain_http_on_the_lan_is_not_used():
    settings = OidcSettings(oidc_issuer="http://idp.hospital.example", oidc_client_id=CLIENT_ID)
    with pytest.raises(OidcRefused) as refused:
        asyncio.run(OidcProvider(settings).metadata())  # refused before any connection is tried
    assert refused.value.reason == "discovery_not_https"


def test_the_page_after_sign_in_only_ever_moves_on_to_a_local_path():
    for hostile in ("//evil.example", "/\t/evil.example", "/\n/evil.example", "https://evil.example", "/\\evil"):
        assert safe_next(hostile) == "/"
    assert safe_next("/documents?collection=hospital") == "/documents?collection=hospital"
