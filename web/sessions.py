"""Browser sessions: server-side rows (only the SHA-256 of the random id is stored), the cookie, timeouts.

A session is looked up afresh on every request: it ends after `APPLIANCE_SESSION_IDLE_S` without a
request, `APPLIANCE_SESSION_MAX_S` after sign-in, at logout, and at once when its user is disabled.
Sign-in always issues a new id (no fixation), and so does each step up (password -> TOTP -> signed in).

The cookie is `__Host-session` (Secure, Path=/, no Domain) when the request came over TLS or
`APPLIANCE_COOKIE_SECURE` is set. Browsers refuse `__Host-` cookies without Secure, so on plain http
(the appliance on localhost, before a TLS proxy is put in front) it is `appliance_session`, with the
same HttpOnly, SameSite=Strict and Path=/.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from fastapi import Request, Response
from sqlalchemy import delete
from sqlalchemy.engine import Engine
from sqlmodel import select

from appliance.access.users import Principal
from appliance.config import WebSettings
from appliance.db import User, WebSession, session, utcnow

SECURE_COOKIE = "__Host-session"
PLAIN_COOKIE = "appliance_session"
STAGES = ("full", "mfa", "enrol")


@dataclass(frozen=True)
class SignedIn:
    """The browser's session and its user, as found on this request."""

    row: WebSession
    user: User
    token: str

    @property
    def principal(self) -> Principal:
        assert self.user.id is not None
        return Principal(self.user.id, self.user.name, self.user.role)

    @property
    def csrf(self) -> str:
        return self.row.csrf_token


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def is_secure(request: Request) -> bool:
    return request.url.scheme == "https" or request.app.state.settings.web.cookie_secure


def cookie_name(request: Request) -> str:
    return SECURE_COOKIE if is_secure(request) else PLAIN_COOKIE


def set_cookie(request: Request, response: Response, token: str) -> None:
    # No Max-Age: a browser session cookie; the server enforces the timeouts.
    response.set_cookie(
        cookie_name(request), token, path="/", httponly=True, samesite="strict", secure=is_secure(request)
    )


def clear_cookie(request: Request, response: Response) -> None:
    response.delete_cookie(cookie_name(request), path="/", httponly=True, samesite="strict", secure=is_secure(request))


def create(engine: Engine, user_id: int, stage: str, replaces: str | None = None) -> str:
    """A new session for the user (ending the one whose token `replaces` names); returns its token."""
    assert stage in STAGES
    token = secrets.token_urlsafe(32)
    with session(engine) as db:
        if replaces:
            db.execute(delete(WebSession).where(WebSession.token_hash == _hash(replaces)))
        db.add(WebSession(token_hash=_hash(token), user_id=user_id, stage=stage, csrf_token=secrets.token_urlsafe(32)))
        db.commit()
    return token


def end(engine: Engine, token: str) -> None:
    with session(engine) as db:
        db.execute(delete(WebSession).where(WebSession.token_hash == _hash(token)))
        db.commit()


def set_pending_totp(engine: Engine, row_id: int, secret: str | None) -> None:
    with session(engine) as db:
        row = db.get(WebSession, row_id)
        if row is not None:
            row.pending_totp = secret
            db.add(row)
            db.commit()


def lookup(engine: Engine, settings: WebSettings, token: str) -> tuple[SignedIn | None, str]:
    """The live session for a cookie value and why not when there is none: unknown, or idle, expired,
    disabled followed by `:USER`."""
    if not token or len(token) > 128:
        return None, "unknown"
    now = utcnow()
    with session(engine) as db:
        found = db.exec(
            select(WebSession, User)
            .join(User, User.id == WebSession.user_id)
            .where(WebSession.token_hash == _hash(token))
        ).first()
        if found is None:
            return None, "unknown"
        row, user = found
        reason = ""
        if user.disabled:
            reason = "disabled"
        elif now - row.created_at > timedelta(seconds=settings.session_max_s):
            reason = "expired"
        elif now - row.last_seen_at > timedelta(seconds=settings.session_idle_s):
            reason = "idle"
        if reason:
            db.delete(row)
            db.commit()
            return None, f"{reason}:{user.name}"
        # Refresh the idle clock, but not on every request of a busy page (one write per few seconds).
        if now - row.last_seen_at > timedelta(seconds=min(5, settings.session_idle_s / 10)):
            row.last_seen_at = now
            db.add(row)
            db.commit()
        return SignedIn(row, user, token), ""


def current(request: Request) -> tuple[SignedIn | None, str]:
    """The request's session (looked up once per request) and why not: "" (no cookie), unknown, idle,
    expired or disabled (the user's name is then in `request.state.ended_user`)."""
    cached = getattr(request.state, "signed_in", None)
    if cached is not None:
        return cached
    token = request.cookies.get(cookie_name(request))
    if not token:
        result: tuple[SignedIn | None, str] = (None, "")
    else:
        state = request.app.state
        signed, reason = lookup(state.db, state.settings.web, token)
        reason, _, request.state.ended_user = reason.partition(":")
        result = (signed, reason)
    request.state.signed_in = result
    return result


def csrf_matches(sent: str | None, expected: str) -> bool:
    return bool(sent) and hmac.compare_digest(str(sent).encode(), expected.encode())
