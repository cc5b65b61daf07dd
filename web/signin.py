"""Sign-in pages: first-run setup, password sign-in, the TOTP step, TOTP enrolment, sign-out.

Password sign-in creates a session in the `mfa` stage (user has TOTP), `enrol` stage (an admin without
TOTP must enrol first) or `full` stage; every step up issues a new session id. Failed passwords count toward
the lockout of the account name from the client address and of the client address, never of the account
alone (a stranger could then lock anyone out); failed codes, which need the right password first, also
count toward the account's own lockout. The policy is in web.security.
"""

from __future__ import annotations

import base64
import hmac
import time

import pyotp
import segno
from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse

from appliance.access.rbac import access_for
from appliance.access.users import (
    add_user,
    check_password_strength,
    count_admins,
    list_users,
    set_totp,
    verify_password,
)
from appliance.errors import ApplianceError, BadRequest, Forbidden
from web import sessions
from web.rendering import check_csrf, nav, render, safe_next
from web.security import (
    audit,
    check_prelogin,
    clear_failures,
    client_address,
    locked_for,
    prelogin_token,
    record_failure,
    request_actor,
    set_prelogin_cookie,
    throttle_keys,
    totp_keys,
)

router = APIRouter()
ENDED = {
    "idle": "Your session ended after a period of inactivity. Please sign in again.",
    "expired": "Your session reached its maximum length. Please sign in again.",
    "disabled": "Your account has been disabled.",
}
TOTP_PERIOD = 30


def _redirect(location: str) -> RedirectResponse:
    return RedirectResponse(location, status_code=303)


def _locked_message(seconds: int) -> str:
    minutes = max(1, (seconds + 59) // 60)
    return f"Too many failed sign-ins. Try again in {minutes} minute{'s' if minutes > 1 else ''}."


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
    keys = throttle_keys(name, client_address(request))
    wait = locked_for(state.db, keys)
    if wait:
        audit(request, name, "signin_failed", outcome="denied", reason="locked")
        return _login_form(request, 429, next=target, username=name, error=_locked_message(wait))
    user = verify_password(state.db, name, password) if name and password else None
    if user is None:
        record_failure(state.db, state.settings.web, keys)
        audit(request, name, "signin_failed", outcome="failed", reason="password")
        wait = locked_for(state.db, keys)
        message = _locked_message(wait) if wait else "Wrong user name or password, or the account is disabled."
        return _login_form(request, 401, next=target, username=name, error=message)
    assert user.id is not None
    stage = "mfa" if user.totp_secret else ("enrol" if user.role == "admin" else "full")
    if stage == "full":
        clear_failures(state.db, user.name, client_address(request))
    old = request.cookies.get(sessions.cookie_name(request))
    token = sessions.create(state.db, user.id, stage, replaces=old)
    if stage == "full":
        audit(request, user.name, "signin", actor_id=user.id, factor="password")
    location = {"mfa": "/login/totp", "enrol": "/mfa/enrol"}.get(stage, target)
    response = _redirect(location)
    sessions.set_cookie(request, response, token)
    return response


def _pending(request: Request, stage: str) -> sessions.SignedIn:
    signed, _ = sessions.current(request)
    if signed is None or signed.row.stage not in (stage, "full"):
        raise Forbidden("Sign in with your password first.")
    return signed


def totp_step(secret: str, code: str, after: int | None) -> int | None:
    """The time step whose code this is (now, or one step either side), if not used before; else None."""
    code = "".join(str(code).split())
    if len(code) != 6 or not code.isdigit():
        return None
    totp = pyotp.TOTP(secret, interval=TOTP_PERIOD)
    now = int(time.time()) // TOTP_PERIOD
    for step in (now - 1, now, now + 1):
        if hmac.compare_digest(totp.generate_otp(step), code) and (after is None or step > after):
            return step
    return None


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
    user = signed.user
    keys = totp_keys(user.name, client_address(request))
    wait = locked_for(state.db, keys)
    if wait:
        audit(request, user.name, "signin_failed", actor_id=user.id, outcome="denied", reason="locked")
        return render(
            request, "totp.html", 429, title="Authenticator code", csrf=signed.csrf, error=_locked_message(wait)
        )
    step = totp_step(user.totp_secret or "", str(form.get("code") or ""), user.totp_last_step)
    if step is None:
        record_failure(state.db, state.settings.web, keys)
        audit(request, user.name, "signin_failed", actor_id=user.id, outcome="failed", reason="totp")
        return render(
            request, "totp.html", 401, title="Authenticator code", csrf=signed.csrf, error="That code is not right."
        )
    assert user.id is not None
    set_totp(state.db, user.id, user.totp_secret, step)
    clear_failures(state.db, user.name, client_address(request))
    token = sessions.create(state.db, user.id, "full", replaces=signed.token)
    audit(request, user.name, "signin", actor_id=user.id, factor="totp")
    response = _redirect("/")
    sessions.set_cookie(request, response, token)
    return response


def _enrolment(request: Request, signed: sessions.SignedIn, status: int = 200, error: str = ""):
    state = request.app.state
    secret = signed.row.pending_totp
    if not secret:
        secret = pyotp.random_base32()
        assert signed.row.id is not None
        sessions.set_pending_totp(state.db, signed.row.id, secret)
    uri = pyotp.TOTP(secret, interval=TOTP_PERIOD).provisioning_uri(
        name=signed.user.name, issuer_name=state.settings.web.totp_issuer
    )
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
    state = request.app.state
    secret = signed.row.pending_totp
    step = totp_step(secret, str(form.get("code") or ""), None) if secret else None
    if step is None:
        audit(
            request,
            signed.user.name,
            "signin_failed",
            actor_id=signed.user.id,
            outcome="failed",
            reason="totp_enrolment",
        )
        return _enrolment(request, signed, 400, "That code is not right: check the time on your phone and try again.")
    assert signed.user.id is not None and secret
    set_totp(state.db, signed.user.id, secret, step)
    clear_failures(state.db, signed.user.name, client_address(request))
    token = sessions.create(state.db, signed.user.id, "full", replaces=signed.token)
    audit(request, signed.user.name, "signin", actor_id=signed.user.id, factor="totp", enrolled=True)
    response = _redirect("/")
    sessions.set_cookie(request, response, token)
    return response


@router.post("/logout")
async def logout(request: Request):
    form = await request.form(max_files=0, max_fields=5)
    signed, _ = sessions.current(request)
    if signed is not None:
        check_csrf(signed, form.get("csrf"))
        sessions.end(request.app.state.db, signed.token)
        audit(request, signed.user.name, "signout", actor_id=signed.user.id)
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
    if count_admins(request.app.state.db):
        raise Forbidden("The administrator already exists. Sign in instead.")
    return _setup_form(request)


@router.post("/setup")
async def setup(request: Request):
    form = await request.form(max_files=0, max_fields=10)
    check_prelogin(request, form.get("csrf"))
    state = request.app.state
    if count_admins(state.db):
        actor, actor_id = request_actor(request)
        audit(request, actor, "setup", actor_id=actor_id, outcome="denied", reason="an administrator exists")
        raise Forbidden("The administrator already exists. Sign in instead.")
    name = str(form.get("username") or "").strip()
    password = str(form.get("password") or "")
    try:
        if password != str(form.get("password2") or ""):
            raise BadRequest("The two passwords differ.")
        check_password_strength(password)
        user = add_user(state.db, name, "admin", password)
    except ApplianceError as exc:
        return _setup_form(request, exc.status, username=name, error=exc.message)
    assert user.id is not None
    audit(request, user.name, "setup", actor_id=user.id, target=f"user:{user.name}", role="admin")
    token = sessions.create(state.db, user.id, "enrol", replaces=request.cookies.get(sessions.cookie_name(request)))
    response = _redirect("/mfa/enrol")
    sessions.set_cookie(request, response, token)
    return response
