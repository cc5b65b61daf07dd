"""Sign-in with the organisation's OpenID Connect provider: authorization code flow with PKCE (S256),
state and nonce, through authlib (the OAuth client) and joserfc (the ID token's JWT).

`GET /login/oidc` reads the provider's discovery document (cached), keeps a new state, nonce and PKCE
verifier server-side (`oidc_login`, single use, `LOGIN_TTL_S`), bound to a random cookie of this browser,
and redirects to the provider. `GET /login/oidc/callback` consumes that state (another browser's, an
expired, an unknown or a replayed one is refused), exchanges the code at the token endpoint, and checks
the ID token: signed with one of the provider's published keys (the JWKS, cached and fetched again once
when a token names an unknown `kid`) by an asymmetric algorithm the provider advertises — never HS256
or `none` —, `iss` exactly the configured issuer, `aud` holding the client id (and `azp` the client id
when there are several audiences), `exp`/`iat`/`nbf` within `LEEWAY_S`, `nonce` the stored one.

What the verified claims then mean for this appliance's users is `appliance.access.signin.with_provider`:
the user is found by issuer + subject only (created on the first sign-in, with no password), never by
name or e-mail; the groups claim decides the mapped groups; a disabled user is refused; a user with TOTP
still enters a code, an admin without TOTP must enrol (the provider is not trusted for the second factor).
It writes the audit records of the sign-in, and `signin.provider_refused` those of a refusal here; no
token, code or secret is ever logged or audited.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
import ssl
import time
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from authlib.integrations.base_client.errors import OAuthError
from authlib.integrations.httpx_client import AsyncOAuth2Client
from fastapi import APIRouter, Request, Response
from joserfc import jws, jwt
from joserfc.errors import ExpiredTokenError, InvalidClaimError, JoseError, MissingClaimError
from joserfc.jwk import KeySet
from sqlalchemy import delete, func
from sqlalchemy.engine import Engine
from sqlmodel import select

from appliance.access import signin
from appliance.config import OidcSettings
from appliance.db import OidcLogin, session, utcnow
from appliance.errors import ApplianceError, Forbidden, NotFound
from web import sessions
from web.rendering import render, safe_next
from web.security import client_address

log = logging.getLogger(__name__)
router = APIRouter()

# Only signatures that need the provider's private key. HS* would take a shared secret (a public key
# misused as one is the classic forgery), and `none` is no signature at all.
ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
LOGIN_TTL_S = 600  # a sign-in at the provider must come back within this
MAX_PENDING = 10_000  # sign-ins under way at once (each GET /login/oidc adds one until it expires)
CACHE_TTL_S = 3600  # discovery document and keys are read again after this
LEEWAY_S = 60  # clock skew allowed on exp, iat, nbf
TIMEOUT_S = 5.0  # the provider is on the LAN: a slow answer is a broken one
MAX_DOCUMENT_BYTES = 512 * 1024
BINDING_SECURE = "__Host-oidc"
BINDING_PLAIN = "appliance_oidc"
CALLBACK_PATH = "/login/oidc/callback"


class OidcRefused(ApplianceError):
    """A sign-in through the provider that must not succeed; `reason` is a short code for the audit log."""

    def __init__(self, reason: str, message: str, status: int = 401):
        super().__init__(message)
        self.reason = reason
        self.status = status


def _forged(reason: str) -> OidcRefused:
    return OidcRefused(
        reason,
        "The identity provider's answer did not pass the appliance's checks, so you are not signed in. "
        "Try again; if this keeps happening, tell your administrator.",
    )


def _unavailable(reason: str) -> OidcRefused:
    return OidcRefused(
        reason,
        "The organisation's sign-in service could not be used just now. Try again in a minute, or sign in "
        "with your appliance password.",
        502,
    )


def _transport_allowed(url: str) -> bool:
    """https, or plain http to this machine only (a provider on loopback, as in tests)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return True
    if parts.scheme != "http" or not parts.hostname:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


def _sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


class Provider:
    """The configured OpenID provider: its discovery document and keys (cached), the code exchange and the
    ID-token checks."""

    def __init__(self, settings: OidcSettings):
        self.settings = settings
        self.issuer = settings.oidc_issuer
        self.client_id = settings.oidc_client_id
        self._metadata: dict[str, Any] | None = None
        self._metadata_at = 0.0
        self._keys: list[Any] | None = None
        self._keys_at = 0.0
        self._lock = asyncio.Lock()

    # --- reading the provider's documents ---------------------------------------------------------
    def _verify(self) -> ssl.SSLContext | bool:
        if self.settings.oidc_ca_file:
            return ssl.create_default_context(cafile=self.settings.oidc_ca_file)
        return True

    def _client_options(self) -> dict[str, Any]:
        return {"timeout": TIMEOUT_S, "verify": self._verify(), "trust_env": False, "follow_redirects": False}

    async def _get_json(self, url: str, what: str) -> dict[str, Any]:
        if not _transport_allowed(url):
            log.warning("OIDC: the provider's %s is not an https URL; refusing to use it", what)
            raise _unavailable(f"{what}_not_https")
        try:
            async with httpx.AsyncClient(**self._client_options()) as client:
                response = await client.get(url, headers={"accept": "application/json"})
            if response.status_code != 200 or len(response.content) > MAX_DOCUMENT_BYTES:
                raise ValueError(f"HTTP {response.status_code}, {len(response.content)} bytes")
            document = response.json()
            if not isinstance(document, dict):
                raise ValueError("not a JSON object")
        except (httpx.HTTPError, ValueError, ssl.SSLError, OSError) as exc:
            log.warning("OIDC: could not read the provider's %s: %s", what, type(exc).__name__)
            raise _unavailable(f"{what}_unavailable") from None
        return document

    async def metadata(self) -> dict[str, Any]:
        async with self._lock:
            if self._metadata is None or time.monotonic() - self._metadata_at > CACHE_TTL_S:
                url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
                document = await self._get_json(url, "discovery")
                if document.get("issuer") != self.issuer:
                    log.warning("OIDC: the discovery document names another issuer than APPLIANCE_OIDC_ISSUER")
                    raise _unavailable("discovery_issuer")
                for field in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                    if not isinstance(document.get(field), str):
                        log.warning("OIDC: the discovery document has no %s", field)
                        raise _unavailable("discovery_incomplete")
                self._metadata, self._metadata_at = document, time.monotonic()
            return self._metadata

    def algorithms(self, metadata: dict[str, Any]) -> list[str]:
        """The asymmetric algorithms the provider says it signs ID tokens with (RS256 when it says nothing)."""
        advertised = metadata.get("id_token_signing_alg_values_supported") or ["RS256"]
        return [alg for alg in ASYMMETRIC_ALGORITHMS if alg in advertised]

    async def keys(self, metadata: dict[str, Any], refresh: bool = False) -> list[Any]:
        async with self._lock:
            stale = self._keys is None or time.monotonic() - self._keys_at > CACHE_TTL_S
            if refresh or stale:
                document = await self._get_json(metadata["jwks_uri"], "jwks")
                keys = []
                for entry in document.get("keys") or []:
                    if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                        continue
                    if entry.get("kty") not in ("RSA", "EC", "OKP") or "d" in entry:
                        continue  # no shared-secret keys; a private part has no business in a JWKS
                    try:
                        keys.append(KeySet.import_key_set({"keys": [entry]}).keys[0])
                    except (ValueError, JoseError, TypeError):
                        continue
                self._keys, self._keys_at = keys, time.monotonic()
            assert self._keys is not None
            return self._keys

    # --- the flow ----------------------------------------------------------------------------------
    def scopes(self) -> str:
        words = self.settings.oidc_scopes.split()
        return " ".join(["openid", *[w for w in words if w != "openid"]])

    def authorization_url(
        self, metadata: dict[str, Any], redirect_uri: str, state: str, nonce: str, verifier: str
    ) -> str:
        client = AsyncOAuth2Client(
            client_id=self.client_id, scope=self.scopes(), redirect_uri=redirect_uri, code_challenge_method="S256"
        )
        url, _ = client.create_authorization_url(
            metadata["authorization_endpoint"], state=state, nonce=nonce, code_verifier=verifier
        )
        return url

    def _auth_method(self, metadata: dict[str, Any]) -> str:
        if not self.settings.oidc_client_secret.get_secret_value():
            return "none"
        supported = metadata.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        return "client_secret_post" if "client_secret_basic" not in supported else "client_secret_basic"

    async def exchange(self, metadata: dict[str, Any], code: str, verifier: str, redirect_uri: str) -> str:
        """The ID token the token endpoint gives for this code (and PKCE verifier)."""
        endpoint = metadata["token_endpoint"]
        if not _transport_allowed(endpoint):
            raise _unavailable("token_endpoint_not_https")
        try:
            async with AsyncOAuth2Client(
                client_id=self.client_id,
                client_secret=self.settings.oidc_client_secret.get_secret_value() or None,
                token_endpoint_auth_method=self._auth_method(metadata),
                redirect_uri=redirect_uri,
                **self._client_options(),
            ) as client:
                token = await client.fetch_token(
                    endpoint, grant_type="authorization_code", code=code, code_verifier=verifier
                )
        except OAuthError as exc:
            error = re.sub(r"[^a-z_]", "", str(exc.error or ""))[:40] or "error"
            log.info("OIDC: the token endpoint refused the code (%s)", error)
            raise OidcRefused(
                f"token_{error}",
                "The sign-in service did not accept this sign-in (it may have taken too long). Please try again.",
            ) from None
        except (httpx.HTTPError, ValueError, ssl.SSLError, OSError) as exc:
            log.warning("OIDC: the token endpoint could not be used: %s", type(exc).__name__)
            raise _unavailable("token_endpoint_unavailable") from None
        id_token = token.get("id_token")
        if not isinstance(id_token, str) or not id_token:
            raise _forged("no_id_token")
        return id_token

    async def _key_for(self, metadata: dict[str, Any], kid: object, alg: str):
        kty = KEY_TYPES[alg[:2]]
        for refresh in (False, True):  # an unknown kid: the provider may have rotated its keys; read once more
            keys = [k for k in await self.keys(metadata, refresh=refresh) if k.key_type == kty]
            if kid is not None:
                keys = [k for k in keys if k.kid == kid]
            if len(keys) == 1:
                return keys[0]
            if len(keys) > 1:
                raise _forged("ambiguous_key")  # no kid and several keys of the type: refuse rather than guess
        raise _forged("unknown_key")

    async def verify_id_token(self, metadata: dict[str, Any], id_token: str, nonce: str) -> dict[str, Any]:
        """The ID token's claims, when every check passes; else OidcRefused (reason says which failed)."""
        try:
            header = jws.extract_compact(id_token.encode()).headers()
        except (JoseError, ValueError, TypeError):
            raise _forged("malformed_token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms(metadata):
            raise _forged("algorithm")
        key = await self._key_for(metadata, header.get("kid"), alg)
        try:
            claims = jwt.decode(id_token, key, algorithms=[alg]).claims
            jwt.JWTClaimsRegistry(
                leeway=LEEWAY_S,
                iss={"essential": True, "value": self.issuer},
                aud={"essential": True, "value": self.client_id},
                sub={"essential": True},
                exp={"essential": True},
                iat={"essential": True},
                nonce={"essential": True, "value": nonce},
            ).validate(claims)
        except ExpiredTokenError:
            raise _forged("expired") from None
        except MissingClaimError as exc:
            raise _forged(f"missing_{exc.claim}"[:40]) from None
        except InvalidClaimError as exc:
            raise _forged(f"wrong_{exc.claim}"[:40]) from None
        except (JoseError, ValueError, TypeError):
            raise _forged("signature") from None
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if (len(audiences) > 1 or "azp" in claims) and claims.get("azp") != self.client_id:
            raise _forged("wrong_azp")
        subject = claims["sub"]
        if not isinstance(subject, str) or not 0 < len(subject) <= 255:
            raise _forged("wrong_sub")
        return claims


def provider(request: Request) -> Provider:
    found = getattr(request.app.state, "oidc", None)
    if found is None:
        raise NotFound("Sign-in with the organisation's identity provider is not set up on this appliance.")
    return found


def redirect_uri(request: Request) -> str:
    base = request.app.state.settings.oidc.oidc_redirect_base.rstrip("/")
    if not base:
        base = str(request.base_url).rstrip("/")
    return base + CALLBACK_PATH


# --- sign-ins under way ------------------------------------------------------------------------------
def _binding_cookie(request: Request) -> str:
    return BINDING_SECURE if sessions.is_secure(request) else BINDING_PLAIN


def _set_binding(request: Request, response: Response, value: str) -> None:
    # SameSite=Lax, not Strict: the provider's redirect back is a cross-site navigation, which a Strict
    # cookie would not accompany. It only names this browser's sign-ins under way; it signs nobody in.
    response.set_cookie(
        _binding_cookie(request),
        value,
        max_age=LOGIN_TTL_S,
        path="/",
        httponly=True,
        samesite="lax",
        secure=sessions.is_secure(request),
    )


def _clear_binding(request: Request, response: Response) -> None:
    response.delete_cookie(
        _binding_cookie(request), path="/", httponly=True, samesite="lax", secure=sessions.is_secure(request)
    )


def save_login(engine: Engine, state: str, binding: str, nonce: str, verifier: str, next_path: str) -> None:
    cutoff = utcnow() - timedelta(seconds=LOGIN_TTL_S)
    with session(engine) as db:
        db.execute(delete(OidcLogin).where(OidcLogin.created_at < cutoff))  # type: ignore[arg-type]
        if db.exec(select(func.count()).select_from(OidcLogin)).one() >= MAX_PENDING:  # someone is flooding
            db.commit()
            raise _unavailable("too_many_pending")
        db.add(
            OidcLogin(
                state_hash=_sha256(state),
                binding_hash=_sha256(binding),
                nonce=nonce,
                code_verifier=verifier,
                next_path=next_path,
            )
        )
        db.commit()


def take_login(engine: Engine, state: str, binding: str) -> OidcLogin:
    """The sign-in under way that `state` names, removed (a state is good once), if it is this browser's
    and recent; else OidcRefused."""
    if not state or len(state) > 256:
        raise OidcRefused("unknown_state", "This sign-in link is not valid. Start again from the sign-in page.", 400)
    with session(engine) as db:
        row = db.get(OidcLogin, _sha256(state))
        if row is not None:
            removed = db.execute(delete(OidcLogin).where(OidcLogin.state_hash == row.state_hash))  # type: ignore[arg-type]
            db.commit()
            if removed.rowcount != 1:  # another request took it first
                row = None
    if row is None:
        raise OidcRefused(
            "unknown_state",
            "This sign-in was already used or is unknown here. Start again from the sign-in page.",
            400,
        )
    created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=utcnow().tzinfo)
    if utcnow() - created > timedelta(seconds=LOGIN_TTL_S):
        raise OidcRefused("expired_state", "This sign-in took too long. Start again from the sign-in page.", 400)
    if not binding or not hmac.compare_digest(row.binding_hash, _sha256(binding)):
        raise OidcRefused(
            "wrong_browser",
            "This sign-in was started in another browser (or its cookie is gone). Start again from the sign-in page.",
            400,
        )
    return row


# --- routes ------------------------------------------------------------------------------------------
def _refused_page(request: Request, status: int, message: str) -> Response:
    response = render(request, "error.html", status, title="Sign-in refused", message=message)
    _clear_binding(request, response)
    return response


def _refusal(request: Request, exc: OidcRefused) -> Response:
    signin.provider_refused(request.app.state.db, client_address(request), exc.reason)
    return _refused_page(request, exc.status, exc.message)


@router.get("/login/oidc")
async def oidc_start(request: Request, next: str = "/"):
    idp = provider(request)
    try:
        metadata = await idp.metadata()
        if not idp.algorithms(metadata):
            log.warning("OIDC: the provider advertises no asymmetric ID-token signing algorithm")
            raise _unavailable("no_asymmetric_algorithm")
        if not _transport_allowed(metadata["authorization_endpoint"]):
            raise _unavailable("authorization_endpoint_not_https")
    except OidcRefused as exc:
        return _refusal(request, exc)
    binding = request.cookies.get(_binding_cookie(request)) or ""
    if not re.fullmatch(r"[A-Za-z0-9_-]{32,64}", binding):
        binding = secrets.token_urlsafe(32)
    state, nonce, verifier = secrets.token_urlsafe(32), secrets.token_urlsafe(32), secrets.token_urlsafe(64)
    try:
        await asyncio.to_thread(save_login, request.app.state.db, state, binding, nonce, verifier, safe_next(next))
    except OidcRefused as exc:
        return _refusal(request, exc)
    location = idp.authorization_url(metadata, redirect_uri(request), state, nonce, verifier)
    response = Response(status_code=303, headers={"location": location})
    _set_binding(request, response, binding)
    return response


@router.get(CALLBACK_PATH)
async def oidc_callback(request: Request, state: str = "", code: str = "", error: str = ""):
    idp = provider(request)
    state_db = request.app.state
    try:
        pending = await asyncio.to_thread(
            take_login, state_db.db, state, request.cookies.get(_binding_cookie(request)) or ""
        )
        if error:
            code_name = re.sub(r"[^a-z_]", "", error.lower())[:40] or "error"
            raise OidcRefused(f"provider_{code_name}", "The sign-in service did not sign you in. Please try again.")
        if not code or len(code) > 4096:
            raise _forged("no_code")
        metadata = await idp.metadata()
        uri = redirect_uri(request)
        id_token = await idp.exchange(metadata, code, pending.code_verifier, uri)
        claims = await idp.verify_id_token(metadata, id_token, pending.nonce)
    except OidcRefused as exc:
        return _refusal(request, exc)
    address = client_address(request)
    try:
        done = await asyncio.to_thread(
            signin.with_provider, state_db.db, state_db.settings.oidc, address, idp.issuer, claims
        )
    except Forbidden as exc:  # a disabled user: refused and recorded by the sign-in
        return _refused_page(request, exc.status, exc.message)
    assert done.user.id is not None
    old = request.cookies.get(sessions.cookie_name(request))
    token = await asyncio.to_thread(sessions.create, state_db.db, done.user.id, done.stage, old)
    location = {"mfa": "/login/totp", "enrol": "/mfa/enrol"}.get(done.stage, safe_next(pending.next_path))
    # A page that moves on by itself rather than a redirect: browsers do not send the SameSite=Strict
    # session cookie on the rest of a redirect chain that began at the provider's site.
    response = render(request, "signed_in.html", title="Signed in", location=location, refresh=location)
    sessions.set_cookie(request, response, token)
    _clear_binding(request, response)
    return response
