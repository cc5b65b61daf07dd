"""Browser-facing protections: security headers, the pre-sign-in CSRF token, the edge's own audit records.

Every response carries a strict CSP (no inline script or style, nothing from another origin), nosniff,
no referrer and no framing. Forms before sign-in (login, setup) carry a token bound to a random cookie
(HMAC with a per-process key); after sign-in forms and fetch calls carry the session's own token.
Sign-in throttling (lockouts per name and address) is a rule of signing in: `appliance.access.signin`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from fastapi import Request, Response

from appliance.access import audit as audit_log
from appliance.errors import ApplianceError, Forbidden

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}
PRELOGIN_SECURE = "__Host-prelogin"
PRELOGIN_PLAIN = "appliance_prelogin"
STALE_FORM = "This form has expired or did not come from this site. Reload the page and try again."


class CsrfRefused(Forbidden):
    """A state-changing request without the right CSRF token."""


def add_security_headers(response: Response, path: str) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if not path.startswith("/static/"):
        response.headers.setdefault("Cache-Control", "no-store")


# --- CSRF before sign-in -------------------------------------------------------------------------
def _prelogin_cookie(request: Request) -> str:
    from web.sessions import is_secure

    return PRELOGIN_SECURE if is_secure(request) else PRELOGIN_PLAIN


def _form_token(request: Request, nonce: str) -> str:
    return hmac.new(request.app.state.form_key, nonce.encode(), hashlib.sha256).hexdigest()


def prelogin_token(request: Request) -> tuple[str, str | None]:
    """(token for the form, new cookie nonce to set or None when the browser already has one)."""
    nonce = request.cookies.get(_prelogin_cookie(request))
    fresh = None
    if not nonce or len(nonce) > 64:
        nonce = fresh = secrets.token_urlsafe(24)
    return _form_token(request, nonce), fresh


def set_prelogin_cookie(request: Request, response: Response, nonce: str | None) -> None:
    if nonce:
        from web.sessions import is_secure

        response.set_cookie(
            _prelogin_cookie(request), nonce, path="/", httponly=True, samesite="strict", secure=is_secure(request)
        )


def check_prelogin(request: Request, sent: object) -> None:
    nonce = request.cookies.get(_prelogin_cookie(request))
    if not nonce or not isinstance(sent, str) or not hmac.compare_digest(sent, _form_token(request, nonce)):
        raise CsrfRefused(STALE_FORM)


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


# --- audit ---------------------------------------------------------------------------------------
def request_actor(request: Request) -> tuple[str, int | None]:
    """Who sent the request, for the audit log: the API caller, else the browser session's user, else "-"."""
    known = getattr(request.state, "caller", None)
    if known is not None:
        return known.actor.name, known.actor.id
    principal = getattr(request.state, "principal", None)
    if principal is not None:
        return audit_log.actor_of(principal)
    from web.sessions import current

    signed, _ = current(request)
    return (signed.user.name, signed.user.id) if signed is not None else ("-", None)


def audit_refusal(request: Request, error: ApplianceError) -> None:
    """The generic record of a refused request (a 403, or a Withheld 404), unless the route already wrote
    one of its own: who (key, session or nobody), which route, and the reason the caller was given."""
    if error.audited:
        return
    actor, actor_id = request_actor(request)
    audit(
        request,
        actor,
        "access_refused",
        actor_id=actor_id,
        target=f"{request.method} {request.url.path[:200]}",  # never the query string: it may carry a secret
        outcome="denied",
        status=error.status,
        reason=error.message[:200],
    )


def audit(
    request: Request,
    actor: str,
    action: str,
    *,
    actor_id: int | None = None,
    target: str | None = None,
    outcome: str = "ok",
    **details,
) -> None:
    """One of the edge's own audit records (access_refused, csrf_refused, session_refused: about the request, not
    a use case), with the client address. Never a secret or document text in `details`."""
    audit_log.record(
        request.app.state.db,
        actor or "-",
        action,
        actor_id=actor_id,
        target=target,
        outcome=outcome,
        details=details,
        address=client_address(request),
    )
