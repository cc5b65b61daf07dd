"""The administration page: users, groups, collections, grants, walls, API keys, break-glass and the audit log.

Every form posts to `/admin/<action>` with the session's CSRF token; its route parses the form and makes one
call into `appliance.access.policy`, which checks the caller's right and writes the audit record, then goes back to the
page with a notice (or the error). Viewing the page and its audit export needs `manage_users`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from urllib.parse import urlencode

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.engine import Engine
from starlette.datastructures import FormData

from appliance.access import audit as audit_log
from appliance.access import policy, rbac, users
from appliance.access.actors import Actor
from appliance.errors import ApplianceError, BadRequest
from web.caller import Caller, caller, requires
from web.rendering import render

router = APIRouter()
AUDIT_PAGE = 50
VIEW = "manage_users"  # the right to see the page (it lists users and their keys) and its audit log
viewer = requires(VIEW, policy.ADMINS_ONLY)


def _field(form: FormData, name: str, required: bool = False) -> str:
    """A form field, trimmed ('' when missing). The administration forms check nothing here: their use case
    checks the caller's right first, then the values, so that who may not learns nothing about a form."""
    value = form.get(name)
    value = value.strip() if isinstance(value, str) else ""
    if required and not value:
        raise BadRequest(f"'{name}' is required.")
    return value[:1024]


def _subject(form: FormData) -> dict[str, str]:
    """The user or group a grant or wall form names, as `user=` or `group=` (none when the kind is not one)."""
    kind = _field(form, "kind")
    return {kind: _field(form, "subject")} if kind in rbac.SUBJECT_KINDS else {}


def _named(subject: dict[str, str]) -> str:
    """'user NAME' or 'group NAME', for a notice (once the change is made, the form named one)."""
    ((kind, name),) = subject.items()
    return f"{kind} {name}"


# Each form: parse it, make its one change through appliance.access.policy, and say what was done.
Form = Callable[[Engine, Actor, FormData], str]


def _user_add(engine: Engine, me: Actor, form: FormData) -> str:
    name, role = _field(form, "name"), _field(form, "role")
    user = policy.add_user(engine, me, name, role, _field(form, "password") or None)
    return f"User {user.name} created ({user.role})."


def _user_disable(engine: Engine, me: Actor, form: FormData) -> str:
    name = _field(form, "name")
    revoked = policy.disable_user(engine, me, name)
    return f"User {name} disabled: sessions ended, {revoked} key(s) revoked."


def _user_enable(engine: Engine, me: Actor, form: FormData) -> str:
    name = _field(form, "name")
    policy.enable_user(engine, me, name)
    return f"User {name} enabled (their old keys stay revoked)."


def _user_password(engine: Engine, me: Actor, form: FormData) -> str:
    name = _field(form, "name")
    policy.set_password(engine, me, name, _field(form, "password"))
    return f"Password of {name} set; their sessions ended."


def _user_mfa_reset(engine: Engine, me: Actor, form: FormData) -> str:
    name = _field(form, "name")
    policy.reset_mfa(engine, me, name)
    return f"Two-factor sign-in of {name} removed; they enrol again at sign-in."


def _user_role(engine: Engine, me: Actor, form: FormData) -> str:
    name, role = _field(form, "name"), _field(form, "role")
    previous = policy.set_role(engine, me, name, role)
    return f"{name} is now {role} (was {previous})."


def _group_add(engine: Engine, me: Actor, form: FormData) -> str:
    group = policy.add_group(engine, me, _field(form, "name"))
    return f"Group {group.name} created."


def _member_add(engine: Engine, me: Actor, form: FormData) -> str:
    group, user = _field(form, "group"), _field(form, "user")
    policy.add_member(engine, me, group, user)
    return f"{user} added to {group}."


def _member_rm(engine: Engine, me: Actor, form: FormData) -> str:
    group, user = _field(form, "group"), _field(form, "user")
    policy.remove_member(engine, me, group, user)
    return f"{user} removed from {group}."


def _key_revoke(engine: Engine, me: Actor, form: FormData) -> str:
    prefix = _field(form, "prefix")
    policy.revoke_key(engine, me, prefix)
    return f"Key {prefix}… revoked."


def _collection_add(engine: Engine, me: Actor, form: FormData) -> str:
    description = _field(form, "description") or None
    collection = policy.add_collection(engine, me, _field(form, "name"), description)
    return f"Collection {collection.name} created."


def _grant_add(engine: Engine, me: Actor, form: FormData) -> str:
    collection, subject, role = _field(form, "collection"), _subject(form), _field(form, "role")
    grant = policy.add_grant(engine, me, collection, role=role, **subject)
    return f"{_named(subject)} may now {grant.role} {collection}."


def _grant_rm(engine: Engine, me: Actor, form: FormData) -> str:
    collection, subject = _field(form, "collection"), _subject(form)
    policy.remove_grant(engine, me, collection, **subject)
    return f"Grant of {_named(subject)} on {collection} removed."


def _wall_add(engine: Engine, me: Actor, form: FormData) -> str:
    collection, subject = _field(form, "collection"), _subject(form)
    policy.add_wall(engine, me, collection, **subject)
    return f"{_named(subject)} is walled off {collection}."


def _wall_rm(engine: Engine, me: Actor, form: FormData) -> str:
    collection, subject = _field(form, "collection"), _subject(form)
    policy.remove_wall(engine, me, collection, **subject)
    return f"Wall of {_named(subject)} on {collection} removed."


ACTIONS: dict[str, Form] = {
    "user-add": _user_add,
    "user-disable": _user_disable,
    "user-enable": _user_enable,
    "user-password": _user_password,
    "user-mfa-reset": _user_mfa_reset,
    "user-role": _user_role,
    "group-add": _group_add,
    "member-add": _member_add,
    "member-rm": _member_rm,
    "key-revoke": _key_revoke,
    "collection-add": _collection_add,
    "grant-add": _grant_add,
    "grant-rm": _grant_rm,
    "wall-add": _wall_add,
    "wall-rm": _wall_rm,
}


def _audit_filters(request: Request) -> dict[str, str]:
    query = request.query_params
    return {k: query.get(k, "").strip()[:64] for k in ("actor", "action", "since")}


def _page_data(engine, filters: dict[str, str]) -> dict:
    data = {
        "users": users.list_users(engine),
        "groups": rbac.list_groups(engine),
        "collections": rbac.list_collections(engine),
        "grants": rbac.list_grants(engine),
        "walls": rbac.list_walls(engine),
        "keys": users.list_keys(engine),
        "audit_actions": audit_log.ACTIONS,
        "audit_error": "",
    }
    try:
        records, total = audit_log.search(
            engine,
            actor=filters["actor"] or None,
            action=filters["action"] or None,
            since=filters["since"] or None,
            limit=AUDIT_PAGE,
        )
    except ApplianceError as exc:
        records, total, data["audit_error"] = [], 0, exc.message
    data.update(audit=records, audit_total=total)
    return data


async def _admin_page(request: Request, me: Caller, status: int = 200, **extra):
    filters = _audit_filters(request)
    data = await asyncio.to_thread(_page_data, request.app.state.db, filters)
    return render(
        request,
        "admin.html",
        status,
        title="Administration",
        roles=users.ROLES,
        break_glass_max=request.app.state.settings.break_glass_max_minutes,
        grant_roles=rbac.GRANT_ROLES,
        filters=filters,
        scripts=["common.js"],
        **data,
        **extra,
        **me.nav(),
    )


async def _page_with_error(request: Request, me: Caller, error: ApplianceError):
    """Back to the page with the error, for whom may see the page; anyone else gets only the error."""
    if not me.may(VIEW):
        raise error
    return await _admin_page(request, me, error.status, error=error.message)


@router.get("/admin")
async def admin_page(request: Request, done: str = "", me: Caller = Depends(viewer)):
    return await _admin_page(request, me, notice=done[:300])


@router.post("/admin/key-create")
async def create_key(request: Request, me: Caller = Depends(caller)):
    """The new key is shown on the page this once (no redirect: it is never stored in clear)."""
    form = await request.form(max_files=0, max_fields=10)
    me.check_csrf(form.get("csrf"))
    user, label = _field(form, "user"), _field(form, "label")
    try:
        key = await asyncio.to_thread(policy.create_key, request.app.state.db, me.actor, user, label)
    except ApplianceError as exc:
        return await _page_with_error(request, me, exc)
    return await _admin_page(request, me, new_key=key, new_key_user=user)


@router.post("/admin/break-glass")
async def break_glass(request: Request, me: Caller = Depends(caller)):
    """The caller's own time-limited reader grant on a collection, with a reason (audited, refusals too)."""
    form = await request.form(max_files=0, max_fields=10)
    me.check_csrf(form.get("csrf"))
    collection, reason = _field(form, "collection"), _field(form, "reason")
    minutes = _field(form, "minutes") or str(rbac.BREAK_GLASS_MINUTES)
    max_minutes = request.app.state.settings.break_glass_max_minutes
    try:
        if not minutes.isdigit():
            raise BadRequest("'minutes' must be a whole number of minutes")
        grant = await asyncio.to_thread(
            policy.break_glass,
            request.app.state.db,
            me.actor,
            me.actor.name,
            collection,
            reason,
            int(minutes),
            max_minutes=max_minutes,
        )
    except ApplianceError as exc:
        return await _page_with_error(request, me, exc)
    notice = f"Break-glass: you may read {collection} until {grant.expires_at:%Y-%m-%d %H:%M} UTC. This is audited."
    return RedirectResponse(f"/admin?{urlencode({'done': notice})}#break-glass", status_code=303)


@router.post("/admin/{action}")
async def admin_action(request: Request, action: str, me: Caller = Depends(caller)):
    if action not in ACTIONS:
        me.require(VIEW, message=policy.ADMINS_ONLY)  # who is not an administrator learns nothing about the forms
        raise BadRequest("no such administration action")
    form = await request.form(max_files=0, max_fields=20)
    me.check_csrf(form.get("csrf"))
    try:
        notice = await asyncio.to_thread(ACTIONS[action], request.app.state.db, me.actor, form)
    except ApplianceError as exc:
        return await _page_with_error(request, me, exc)
    section = action.split("-")[0]
    return RedirectResponse(f"/admin?{urlencode({'done': notice})}#{section}", status_code=303)


@router.get("/admin/audit.jsonl", dependencies=[Depends(viewer)])
async def export_audit(request: Request):
    """The matching audit records as JSON lines, downloaded (never rendered)."""
    filters = _audit_filters(request)

    def lines() -> bytes:
        rows = audit_log.export(
            request.app.state.db,
            since=filters["since"] or None,
            actor=filters["actor"] or None,
            action=filters["action"] or None,
        )
        return b"".join(orjson.dumps(row) + b"\n" for row in rows)

    body = await asyncio.to_thread(lines)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return Response(
        body,
        media_type="application/x-ndjson",
        headers={"Content-Disposition": f'attachment; filename="audit-{stamp}.jsonl"'},
    )
