"""Changing who may do what: users, API keys, groups, collections, grants, walls and break-glass.

The one use case behind the administration page and the `appliance users|keys|groups|collections|grants|
walls|break-glass` commands. Each function checks the actor's right (`manage_users` for users, keys, groups
and members; `manage_policy` for collections, grants, walls and break-glass), makes the change through
`appliance.access.users` or `appliance.access.rbac`, and writes the change's one audit record: `ok`; `failed`
with the error; `denied` when the actor may not (the error is marked audited). Targets: `user:NAME` for a
user or their key, the bare name for a group, a collection or a key prefix. Read-only listings stay in
`rbac` and `users`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy.engine import Engine

from appliance.access import rbac, users
from appliance.access.actors import Actor
from appliance.db import Collection, Grant, Group, User, Wall
from appliance.errors import ApplianceError, BadRequest, Forbidden

ADMINS_ONLY = "Only administrators may do this."


@contextmanager
def _change(engine: Engine, actor: Actor, right: str, action: str, target: str, **details: Any) -> Iterator[dict]:
    """Refuse (denied) an actor without `right`; then let the body make the change and record it: `ok` with the
    details the body adds to the yielded dict, or `failed` with the error the body raised."""
    if not actor.may(right):
        raise actor.refuse(engine, action, Forbidden(ADMINS_ONLY), target=target, **details)
    try:
        yield details
    except ApplianceError as exc:
        actor.record(engine, action, target=target, outcome="failed", error=exc.message[:200], **details)
        raise
    actor.record(engine, action, target=target, **details)


def _subject(user: str | None, group: str | None) -> dict[str, str]:
    """Whom a grant or wall names, for its audit record."""
    if user is not None:
        return {"subject_kind": "user", "subject": user}
    if group is not None:
        return {"subject_kind": "group", "subject": group}
    return {}


# --- users and their keys (manage_users) ---------------------------------------------------------------------
def add_user(engine: Engine, actor: Actor, name: str, role: str, password: str | None = None) -> User:
    """Create a user; a password, when given, must pass `users.check_password_strength`."""
    with_password = password is not None
    with _change(engine, actor, "manage_users", "user_add", f"user:{name}", role=role, with_password=with_password):
        if password is not None:
            users.check_password_strength(password)
        return users.add_user(engine, name, role, password)


def disable_user(engine: Engine, actor: Actor, name: str) -> int:
    """Disable a user (not oneself): their sessions end and their keys are revoked; returns how many keys."""
    with _change(engine, actor, "manage_users", "user_disable", f"user:{name}") as details:
        if name == actor.name:
            raise BadRequest("You cannot disable your own account.")
        revoked = users.disable_user(engine, name)
        details["keys_revoked"] = revoked
    return revoked


def enable_user(engine: Engine, actor: Actor, name: str) -> None:
    """Enable a user again (their old keys stay revoked)."""
    with _change(engine, actor, "manage_users", "user_enable", f"user:{name}"):
        users.enable_user(engine, name)


def set_password(engine: Engine, actor: Actor, name: str, password: str) -> None:
    """Set a user's password; their sessions end."""
    with _change(engine, actor, "manage_users", "password_set", f"user:{name}"):
        users.set_password(engine, name, password)


def reset_mfa(engine: Engine, actor: Actor, name: str) -> None:
    """Remove a user's second factor (they enrol again at sign-in); their sessions end."""
    with _change(engine, actor, "manage_users", "mfa_reset", f"user:{name}"):
        users.reset_mfa(engine, name)


def set_role(engine: Engine, actor: Actor, name: str, role: str) -> str:
    """Change a user's global role; returns the previous one."""
    with _change(engine, actor, "manage_users", "role_set", f"user:{name}", role=role) as details:
        previous = users.set_role(engine, name, role)
        details["previous"] = previous
    return previous


def create_key(engine: Engine, actor: Actor, user: str, label: str = "") -> str:
    """Issue an API key for a user and return it (shown once; the audit record keeps only its prefix)."""
    with _change(engine, actor, "manage_users", "key_create", f"user:{user}", label=label[:128]) as details:
        key = users.create_key(engine, user, label)
        details["prefix"] = key[:12]
    return key


def revoke_key(engine: Engine, actor: Actor, prefix: str) -> int:
    """Revoke the live keys with this prefix; returns how many."""
    with _change(engine, actor, "manage_users", "key_revoke", prefix) as details:
        revoked = users.revoke_key(engine, prefix)
        details["revoked"] = revoked
    return revoked


# --- groups (manage_users) -----------------------------------------------------------------------------------
def add_group(engine: Engine, actor: Actor, name: str) -> Group:
    with _change(engine, actor, "manage_users", "group_add", name):
        return rbac.add_group(engine, name)


def add_member(engine: Engine, actor: Actor, group: str, user: str) -> None:
    with _change(engine, actor, "manage_users", "member_add", group, user=user):
        rbac.add_member(engine, group, user)


def remove_member(engine: Engine, actor: Actor, group: str, user: str) -> None:
    with _change(engine, actor, "manage_users", "member_rm", group, user=user):
        rbac.remove_member(engine, group, user)


# --- collections, grants and walls (manage_policy) -----------------------------------------------------------
def add_collection(engine: Engine, actor: Actor, name: str, description: str | None = None) -> Collection:
    with _change(engine, actor, "manage_policy", "collection_add", name):
        return rbac.add_collection(engine, name, description)


def add_grant(
    engine: Engine,
    actor: Actor,
    collection: str,
    *,
    user: str | None = None,
    group: str | None = None,
    role: str = "reader",
) -> Grant:
    """Grant a user or group reader or editor on a collection (replacing the role of an earlier grant)."""
    with _change(engine, actor, "manage_policy", "grant_add", collection, **_subject(user, group), role=role):
        return rbac.add_grant(engine, collection, user=user, group=group, role=role)


def remove_grant(
    engine: Engine,
    actor: Actor,
    collection: str,
    *,
    user: str | None = None,
    group: str | None = None,
    role: str | None = None,
) -> None:
    """Revoke a user's or group's grant on a collection; with `role`, only a grant of that role."""
    with_role = {"role": role} if role is not None else {}
    with _change(engine, actor, "manage_policy", "grant_rm", collection, **_subject(user, group), **with_role):
        rbac.remove_grant(engine, collection, user=user, group=group, role=role)


def add_wall(
    engine: Engine, actor: Actor, collection: str, *, user: str | None = None, group: str | None = None
) -> Wall:
    """Wall a user or group off a collection, whatever else grants it."""
    with _change(engine, actor, "manage_policy", "wall_add", collection, **_subject(user, group)):
        return rbac.add_wall(engine, collection, user=user, group=group)


def remove_wall(
    engine: Engine, actor: Actor, collection: str, *, user: str | None = None, group: str | None = None
) -> None:
    with _change(engine, actor, "manage_policy", "wall_rm", collection, **_subject(user, group)):
        rbac.remove_wall(engine, collection, user=user, group=group)


# --- break-glass (manage_policy) -----------------------------------------------------------------------------
def break_glass(
    engine: Engine, actor: Actor, user: str, collection: str, reason: str, minutes: int, *, max_minutes: int
) -> Grant:
    """An administrator's own time-limited reader grant on a collection, with a reason (`rbac.break_glass`).

    An administrator takes it for themself; the local operator may name any administrator. Every attempt is
    recorded, with its reason: `ok` (with the expiry), `denied` (no right, not an administrator, walled off) or
    `failed`. The `reason` detail is always the reason given, so a refusal's message goes in `error`.
    """
    details: dict[str, Any] = {"user": user, "reason": reason[:500], "minutes": minutes}
    try:
        if not actor.may("manage_policy") or (user != actor.name and not actor.access.unrestricted()):
            raise Forbidden("only an administrator may break the glass, and only for themself")
        grant = rbac.break_glass(engine, user, collection, reason, minutes, max_minutes=max_minutes)
    except ApplianceError as exc:
        denied = isinstance(exc, Forbidden)
        outcome = "denied" if denied else "failed"
        actor.record(engine, "break_glass", target=collection, outcome=outcome, error=exc.message[:200], **details)
        if denied:
            exc.audited = True  # this is the refusal's record: the web adds no generic one
        raise
    assert grant.expires_at is not None
    details["reason"] = grant.reason
    actor.record(engine, "break_glass", target=collection, expires_at=grant.expires_at.isoformat(), **details)
    return grant
