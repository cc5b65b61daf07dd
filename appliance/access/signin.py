"""Signing in: the password step, the TOTP step, TOTP enrolment, sign-out, first-run setup, and the sign-in
through the organisation's OpenID Connect provider, with the lockout and the audit records of each.

The use case behind the sign-in pages (`web.signin`) and the provider's callback (`web.oidc`). Each step
takes the client address (kept in every audit record as `address`, and counted by the lockout) and the
step's input, writes the step's audit record (signin, signin_failed, signout, setup; for the provider also
user_add, member_add and member_rm, with `via: oidc`), and returns a `SignIn`: the user and the session
stage to start — `mfa` (a TOTP code is due next), `enrol` (an admin without TOTP enrols first) or `full`.
A step that must not succeed raises: Unauthorized (wrong password or code), TooManyRequests (locked out),
BadRequest (a wrong enrolment code, a bad first admin), Forbidden (setup once an admin exists, a disabled
provider account; marked audited). Cookies, the sessions table, CSRF tokens and the exchange with the
provider stay in the web.

The lockout: failed passwords count toward the account name from the client address and toward the client
address, never toward the account alone (a stranger could then lock anyone out, admins included); failed
codes, which need the right password first, also count toward the account itself. Over the limit a key is
locked, and each further failure doubles the lock (up to a day). A sign-in forgets the failures of its name
from its address and of the account's codes, never the address's own count (or a sprayer could reset it
by signing in to an account of their own).
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pyotp
from sqlalchemy.engine import Engine
from sqlmodel import select

from appliance.access import audit, rbac, users
from appliance.config import OidcSettings, WebSettings
from appliance.db import LoginThrottle, User, serialized, session, utcnow
from appliance.errors import BadRequest, Forbidden, TooManyRequests, Unauthorized

TOTP_PERIOD = 30
SETUP_LOCK = 0x41505053  # PostgreSQL advisory lock key held while first-run setup checks and writes ("APPS")
MAX_LOCK_S = 86_400
WRONG_SIGN_IN = "Wrong user name or password, or the account is disabled."
WRONG_CODE = "That code is not right."
WRONG_ENROLMENT_CODE = "That code is not right: check the time on your phone and try again."
ADMIN_EXISTS = "The administrator already exists. Sign in instead."
ACCOUNTS_EXIST = (
    "This appliance has accounts already: create its administrator on the appliance with "
    "`appliance users add NAME --role admin`."
)
DISABLED = "Your account on this appliance has been disabled."


@dataclass(frozen=True)
class SignIn:
    """A step that succeeded: its user, and the session stage to start for them."""

    user: User
    stage: str  # "full", "mfa" (a TOTP code is due next) or "enrol" (an admin without TOTP enrols first)


def _record(
    engine: Engine,
    address: str,
    actor: str,
    action: str,
    *,
    actor_id: int | None = None,
    target: str | None = None,
    outcome: str = "ok",
    **details: Any,
) -> None:
    """One audit record of a sign-in step, with the client address."""
    audit.record(
        engine,
        actor or "-",
        action,
        actor_id=actor_id,
        target=target,
        outcome=outcome,
        details=details,
        address=address,
    )


def _stage(user: User) -> str:
    """The session a user whose first factor passed starts with (the provider is not trusted for the second)."""
    return "mfa" if user.totp_secret else ("enrol" if user.role == "admin" else "full")


def _locked_message(seconds: int) -> str:
    minutes = max(1, (seconds + 59) // 60)
    return f"Too many failed sign-ins. Try again in {minutes} minute{'s' if minutes > 1 else ''}."


# --- the lockout ---------------------------------------------------------------------------------------------
def _password_keys(name: str, address: str) -> list[str]:
    """What a password attempt counts toward: this name from this address, and this address."""
    return [f"pair:{address[:64]}|{name.lower()[:64]}", f"addr:{address[:64]}"]


def _code_keys(name: str, address: str) -> list[str]:
    """What a code attempt counts toward: the password's keys and the account itself."""
    return [*_password_keys(name, address), f"totp:{name.lower()[:64]}"]


def _locked_for(engine: Engine, keys: list[str]) -> int:
    """Seconds until every one of these keys may try again (0: none is locked)."""
    now = utcnow()
    wait = 0
    with session(engine) as db:
        for key in keys:
            row = db.get(LoginThrottle, key)
            if row is not None and row.locked_until is not None and row.locked_until > now:
                wait = max(wait, int((row.locked_until - now).total_seconds()) + 1)
    return wait


def _count_failure(engine: Engine, settings: WebSettings, keys: list[str]) -> None:
    now = utcnow()
    window = timedelta(seconds=max(900, settings.login_lockout_s))
    with session(engine) as db:
        for key in keys:
            limit = settings.login_max_failures_per_address if key.startswith("addr:") else settings.login_max_failures
            row = db.get(LoginThrottle, key) or LoginThrottle(key=key)
            unlocked = row.locked_until is None or row.locked_until <= now
            if unlocked and now - row.updated_at > window and row.failures < limit:
                row.failures = 0  # old failures below the limit are forgotten
            row.failures += 1
            if row.failures >= limit:
                lock = min(MAX_LOCK_S, settings.login_lockout_s * 2 ** min(20, row.failures - limit))
                row.locked_until = now + timedelta(seconds=lock)
            row.updated_at = now
            db.add(row)
        db.commit()


def _clear_failures(engine: Engine, name: str, address: str) -> None:
    """After a sign-in: forget the failures of this name from this address and of the account's codes."""
    with session(engine) as db:
        for key in _code_keys(name, address):
            if key.startswith("addr:"):
                continue
            row = db.get(LoginThrottle, key)
            if row is not None:
                db.delete(row)
        db.commit()


# --- TOTP ----------------------------------------------------------------------------------------------------
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


def new_totp_secret() -> str:
    """A fresh secret for an enrolment (kept with the session until its first code is right)."""
    return pyotp.random_base32()


def totp_uri(secret: str, name: str, issuer: str) -> str:
    """The otpauth:// URI an authenticator app reads (as a QR code) to enrol `secret`."""
    return pyotp.TOTP(secret, interval=TOTP_PERIOD).provisioning_uri(name=name, issuer_name=issuer)


# --- the steps -----------------------------------------------------------------------------------------------
def with_password(engine: Engine, settings: WebSettings, address: str, name: str, password: str) -> SignIn:
    """The password step. Refused while the name from this address, or the address, is locked out
    (TooManyRequests); a wrong password (or a disabled account) counts a failure (Unauthorized, telling of
    the lock it may have caused). A user with no second factor due is signed in now (`full`)."""
    keys = _password_keys(name, address)
    wait = _locked_for(engine, keys)
    if wait:
        _record(engine, address, name, "signin_failed", outcome="denied", reason="locked")
        raise TooManyRequests(_locked_message(wait), wait)
    user = users.verify_password(engine, name, password) if name and password else None
    if user is None:
        _count_failure(engine, settings, keys)
        _record(engine, address, name, "signin_failed", outcome="failed", reason="password")
        wait = _locked_for(engine, keys)
        raise Unauthorized(_locked_message(wait) if wait else WRONG_SIGN_IN)
    assert user.id is not None
    stage = _stage(user)
    if stage == "full":
        _clear_failures(engine, user.name, address)
        _record(engine, address, user.name, "signin", actor_id=user.id, factor="password")
    return SignIn(user, stage)


def with_code(engine: Engine, settings: WebSettings, address: str, user: User, code: str) -> SignIn:
    """The TOTP step of a user whose password passed. Refused while locked out (TooManyRequests); a wrong
    or reused code counts a failure, for the account itself too (Unauthorized)."""
    assert user.id is not None
    keys = _code_keys(user.name, address)
    wait = _locked_for(engine, keys)
    if wait:
        _record(engine, address, user.name, "signin_failed", actor_id=user.id, outcome="denied", reason="locked")
        raise TooManyRequests(_locked_message(wait), wait)
    step = totp_step(user.totp_secret or "", code, user.totp_last_step)
    if step is None:
        _count_failure(engine, settings, keys)
        _record(engine, address, user.name, "signin_failed", actor_id=user.id, outcome="failed", reason="totp")
        raise Unauthorized(WRONG_CODE)
    users.set_totp(engine, user.id, user.totp_secret, step)  # the step is used: its code is good once
    _clear_failures(engine, user.name, address)
    _record(engine, address, user.name, "signin", actor_id=user.id, factor="totp")
    return SignIn(user, "full")


def enrol(engine: Engine, address: str, user: User, secret: str | None, code: str) -> SignIn:
    """TOTP enrolment: the first code of the pending `secret` confirms it as the user's second factor, and
    signs them in (BadRequest when it is not right)."""
    assert user.id is not None
    step = totp_step(secret, code, None) if secret else None
    if step is None:
        _record(
            engine, address, user.name, "signin_failed", actor_id=user.id, outcome="failed", reason="totp_enrolment"
        )
        raise BadRequest(WRONG_ENROLMENT_CODE)
    users.set_totp(engine, user.id, secret, step)
    _clear_failures(engine, user.name, address)
    _record(engine, address, user.name, "signin", actor_id=user.id, factor="totp", enrolled=True)
    return SignIn(user, "full")


def sign_out(engine: Engine, address: str, user: User) -> None:
    """The record of a sign-out (the web ends the session)."""
    _record(engine, address, user.name, "signout", actor_id=user.id)


def setup_open(engine: Engine) -> bool:
    """Whether first-run setup may create the administrator: only on a new install, with no account at all
    (as `GET /login` offers it). Accounts the operator made with the CLI close it, so nobody who reaches the
    page can claim the first administrator of an install that is already in use."""
    return not users.list_users(engine)


def closed_setup_message(engine: Engine) -> str:
    """Why setup is closed, for the one who asks (`setup_open` is False)."""
    return ADMIN_EXISTS if users.count_admins(engine) else ACCOUNTS_EXIST


def first_admin(
    engine: Engine,
    address: str,
    name: str,
    password: str,
    repeated: str,
    requester: tuple[str, int | None] = ("-", None),
) -> SignIn:
    """First-run setup: the administrator, who enrols TOTP next. Once an administrator exists it is refused
    (Forbidden, audited, naming the `requester`: who sent the request, "-" for nobody signed in); two
    passwords that differ, a weak password or a bad name are BadRequest."""
    if not setup_open(engine):
        _refuse_setup(engine, address, requester)
    if password != repeated:
        raise BadRequest("The two passwords differ.")
    users.check_password_strength(password)
    user = users.new_user(name, "admin", password)  # checked and hashed before the lock is taken
    # Two first-run forms sent at once, to one server process or to two sharing the database, create one
    # administrator: whether an account exists is read and the administrator written under one lock.
    with serialized(engine, SETUP_LOCK) as db:
        taken = db.exec(select(User.id).limit(1)).first() is not None
        if not taken:
            db.add(user)
    if taken:
        _refuse_setup(engine, address, requester)
    assert user.id is not None
    _record(engine, address, user.name, "setup", actor_id=user.id, target=f"user:{user.name}", role="admin")
    return SignIn(user, "enrol")


def _refuse_setup(engine: Engine, address: str, requester: tuple[str, int | None]) -> None:
    actor, actor_id = requester
    message = closed_setup_message(engine)
    reason = "an administrator exists" if message == ADMIN_EXISTS else "accounts exist"
    _record(engine, address, actor, "setup", actor_id=actor_id, outcome="denied", reason=reason)
    error = Forbidden(message)
    error.audited = True
    raise error


# --- through the organisation's identity provider ------------------------------------------------------------
def claimed_groups(claims: dict[str, Any], claim: str) -> set[str]:
    """The values of the groups claim (a list of strings, or one string); a dotted name reaches nested
    objects (`realm_access.roles`) when no claim has that name itself."""
    value: Any = claims.get(claim)
    if value is None and "." in claim:
        value = claims
        for part in claim.split("."):
            value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, str):
        return {value}
    if isinstance(value, list):
        return {item for item in value if isinstance(item, str)}
    return set()


def with_provider(engine: Engine, settings: OidcSettings, address: str, issuer: str, claims: dict[str, Any]) -> SignIn:
    """The sign-in of the provider's user whose verified ID token carried `claims` (`sub` checked).

    The user is found by issuer + subject only, created on the first sign-in (no password, the configured
    default role; user_add). The groups claim joins them to the mapped groups it names and takes them out
    of the mapped groups it no longer names (member_add, member_rm; other groups are left alone). A
    disabled user is refused (Forbidden, audited). Then the same stages as the password step.
    """
    preferred = str(claims.get("preferred_username") or claims.get("email") or claims.get("name") or "")
    user, created = users.oidc_user(engine, issuer, claims["sub"], preferred, settings.oidc_default_role)
    assert user.id is not None
    if created:
        _record(
            engine,
            address,
            user.name,
            "user_add",
            actor_id=user.id,
            target=f"user:{user.name}",
            via="oidc",
            role=user.role,
        )
    if user.disabled:
        _record(
            engine,
            address,
            user.name,
            "signin_failed",
            actor_id=user.id,
            outcome="denied",
            reason="disabled",
            via="oidc",
        )
        error = Forbidden(DISABLED)
        error.audited = True
        raise error
    mapping = settings.oidc_group_map
    wanted = {mapping[value] for value in claimed_groups(claims, settings.oidc_groups_claim) if value in mapping}
    joined, left = rbac.sync_mapped_groups(engine, user.id, wanted, set(mapping.values()))
    # Group targets are the bare group name, as `appliance.access.policy` writes them.
    for action, groups in (("member_add", joined), ("member_rm", left)):
        for group in groups:
            _record(engine, address, user.name, action, actor_id=user.id, target=group, user=user.name, via="oidc")
    stage = _stage(user)
    if stage == "full":
        _record(engine, address, user.name, "signin", actor_id=user.id, factor="oidc")
    return SignIn(user, stage)


def provider_refused(engine: Engine, address: str, reason: str) -> None:
    """The record of a sign-in through the provider that the web's checks of the provider's answer refused
    (`reason`: a short code, never a token, code or secret)."""
    _record(engine, address, "-", "signin_failed", outcome="denied", reason=reason, via="oidc")
