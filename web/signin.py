"""Sign-in pages: first-run setup, password sign-in, the TOTP step, TOTP enrolment, sign-out.

Each route parses its form, checks the CSRF token, calls one step of `appliance.access.signin` (which holds
the rules, the lockout and the audit records) and starts the session it names, or shows the form again with
the step's refusal. Password sign-in starts a session in the `mfa` stage (user has TOTP), `enrol` stage (an
admin without TOTP must enrol first) or `full` stage; every step up issues a new session id.
"""

from __future__ import annotations

import asyncio
import base64

import segno
from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse

from appliance.access import signin
from appliance.access.rbac import access_for
from appliance.access.users import list_users
from appliance.errors import ApplianceError, BadRequest, Forbidden, TooManyRequests, Unauthorized
from web import sessions
from web.rendering import check_csrf, nav, render, safe_next
from web.security import check_prelogin, client_address, prelogin_token, request_actor, set_prelogin_cookie

router = APIRouter()
ENDED = {
    "idle": "Your session ended after a period of inactivity. Please sign in again.",
    "expired": "Your session reached its maximum length. Please sign in again.",
    "disabled": "Your account has been disabled.",
}
NEXT = {"mfa": "/login/totp", "enrol": "/mfa/enrol"}  # where each session stage goes on to


def _redirect(location: str) -> RedirectResponse:
    return RedirectResponse(location, status_code=303)


def _start(request: Request, done: signin.SignIn, location: str, replaces: str | None) -> RedirectResponse:
    """The session the step named (a new id, ending the one it replaces), and on to `location`."""
    assert done.user.id is not None
    token = sessions.create(request.app.state.db, done.user.id, done.stage, replaces=replaces)
    response = _redirect(NEXT.get(done.stage, location))
    sessions.set_cookie(request, response, token)
    return response


def _login_form(request: Request, status: int = 200, **context):
    token, fresh = prelogin_token(request)
    oidc = request.app.state.settings.oidc
    context.setdefault("oidc_name", oidc.oidc_display_name if oidc.enabled else "")
    response = render(request, "login.html", status=status, title="Sign in", form_csrf=token, **context)
    set_prelogin_cookie(request, response, fresh)
    return response


@router.get("/login")
async def login_page(request: Request, next: str = "/", ended: str = ""):
    if not list_users(request.app.state.db):
        return _redirect("/setup")
    signed, _ = sessions.current(request)
    if signed is not None and signed.row.stage == "full":
        return _redirect(safe_next(next))
    return _login_form(request, next=safe_next(next), notice=ENDED.get(ended, ""))


@router.post("/login")
async def login(request: Request):
    form = await request.form(max_files=0, max_fields=10)
    check_prelogin(request, form.get("csrf"))
    state = request.app.state
    name = str(form.get("username") or "").strip()[:64]
    password = str(form.get("password") or "")[:1024]
    target = safe_next(str(form.get("next") or "/"))
    try:
        done = await asyncio.to_thread(
            signin.with_password, state.db, state.settings.web, client_address(request), name, password
        )
    except (Unauthorized, TooManyRequests) as exc:
        return _login_form(request, exc.status, next=target, username=name, error=exc.message)
    return _start(request, done, target, request.cookies.get(sessions.cookie_name(request)))


def _pending(request: Request, stage: str) -> sessions.SignedIn:
    signed, _ = sessions.current(request)
    if signed is None or signed.row.stage not in (stage, "full"):
        raise Forbidden("Sign in with your password first.")
    return signed


@router.get("/login/totp")
async def totp_page(request: Request):
    signed, _ = sessions.current(request)
    if signed is None or signed.row.stage != "mfa":
        return _redirect("/login")
    return render(request, "totp.html", title="Authenticator code", csrf=signed.csrf)


@router.post("/login/totp")
async def totp_check(request: Request):
    form = await request.form(max_files=0, max_fields=5)
    signed, _ = sessions.current(request)
    if signed is None or signed.row.stage != "mfa":
        return _redirect("/login")
    check_csrf(signed, form.get("csrf"))
    state = request.app.state
    code = str(form.get("code") or "")
    try:
        done = await asyncio.to_thread(
            signin.with_code, state.db, state.settings.web, client_address(request), signed.user, code
        )
    except (Unauthorized, TooManyRequests) as exc:
        return render(request, "totp.html", exc.status, title="Authenticator code", csrf=signed.csrf, error=exc.message)
    return _start(request, done, "/", signed.token)


def _enrolment(request: Request, signed: sessions.SignedIn, status: int = 200, error: str = ""):
    state = request.app.state
    secret = signed.row.pending_totp
    if not secret:
        secret = signin.new_totp_secret()
        assert signed.row.id is not None
        sessions.set_pending_totp(state.db, signed.row.id, secret)
    uri = signin.totp_uri(secret, signed.user.name, state.settings.web.totp_issuer)
    svg = segno.make(uri, error="m").svg_inline(scale=4, border=2, dark="#000", light="#fff")
    qr = "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()
    context = {"csrf": signed.csrf}
    if signed.row.stage == "full":
        access = access_for(state.db, signed.principal)
        context.update(nav(signed, access))  # the same CSRF token, with the signed-in header
    return render(
        request,
        "enrol.html",
        status,
        title="Two-factor sign-in",
        secret=" ".join(secret[i : i + 4] for i in range(0, len(secret), 4)),
        uri=uri,
        qr=qr,
        required=signed.row.stage == "enrol",
        enrolled=bool(signed.user.totp_secret),
        error=error,
        **context,
    )


@router.get("/mfa/enrol")
async def enrol_page(request: Request):
    signed, _ = sessions.current(request)
    if signed is None or signed.row.stage == "mfa":
        return _redirect("/login")
    return _enrolment(request, signed)


@router.post("/mfa/enrol")
async def enrol(request: Request):
    form = await request.form(max_files=0, max_fields=5)
    signed = _pending(request, "enrol")
    check_csrf(signed, form.get("csrf"))
    code = str(form.get("code") or "")
    try:
        done = await asyncio.to_thread(
            signin.enrol, request.app.state.db, client_address(request), signed.user, signed.row.pending_totp, code
        )
    except BadRequest as exc:
        return _enrolment(request, signed, exc.status, exc.message)
    return _start(request, done, "/", signed.token)


@router.post("/logout")
async def logout(request: Request):
    form = await request.form(max_files=0, max_fields=5)
    signed, _ = sessions.current(request)
    if signed is not None:
        check_csrf(signed, form.get("csrf"))
        sessions.end(request.app.state.db, signed.token)
        signin.sign_out(request.app.state.db, client_address(request), signed.user)
    response = _redirect("/login")
    sessions.clear_cookie(request, response)
    return response


def _setup_form(request: Request, status: int = 200, **context):
    token, fresh = prelogin_token(request)
    response = render(
        request, "setup.html", status=status, title="Create the administrator", form_csrf=token, **context
    )
    set_prelogin_cookie(request, response, fresh)
    return response


@router.get("/setup")
async def setup_page(request: Request):
    if not signin.setup_open(request.app.state.db):
        raise Forbidden(signin.closed_setup_message(request.app.state.db))
    return _setup_form(request)


@router.post("/setup")
async def setup(request: Request):
    form = await request.form(max_files=0, max_fields=10)
    check_prelogin(request, form.get("csrf"))
    name = str(form.get("username") or "").strip()
    password, repeated = str(form.get("password") or ""), str(form.get("password2") or "")
    address = client_address(request)
    try:
        actor = request_actor(request)
        done = await asyncio.to_thread(
            signin.first_admin, request.app.state.db, address, name, password, repeated, actor
        )
    except Forbidden:
        raise  # an administrator exists: refused (and recorded), not a form to correct
    except ApplianceError as exc:
        return _setup_form(request, exc.status, username=name, error=exc.message)
    return _start(request, done, "/mfa/enrol", request.cookies.get(sessions.cookie_name(request)))
