"""The administration page: users, groups, collections, grants, walls, API keys, and the audit log.

Every form posts to `/admin/<action>` with the session's CSRF token; each action names the rbac action
it needs (`manage_users` or `manage_policy`) and calls the same service functions as the CLI, then
writes an audit record. Errors come back on the page as a message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from urllib.parse import urlencode

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from appliance import audit as audit_log
from appliance import rbac, users
from appliance.db import Document, session
from appliance.errors import ApplianceError, BadRequest, Forbidden, NotFound
from web.caller import caller
from web.rendering import check_csrf, render, signed_in
from web.security import audit

router = APIRouter()
AUDIT_PAGE = 50


def _require(request: Request, action: str):
    signed = signed_in(request)
    if not caller(request).may(action):
        raise Forbidden("Only administrators may do this.")
    return signed


def _field(form, name: str, required: bool = True) -> str:
    value = form.get(name)
    value = value.strip() if isinstance(value, str) else ""
    if required and not value:
        raise BadRequest(f"'{name}' is required.")
    return value[:1024]


def _subject(form) -> dict[str, str]:
    kind, name = _field(form, "kind"), _field(form, "subject")
    if kind not in rbac.SUBJECT_KINDS:
        raise BadRequest("choose a user or a group")
    return {kind: name}


# action -> (rbac action needed, audit action, function(engine, form, me) -> (target, notice, details))
Handler = Callable[..., tuple[str, str, dict]]


def _user_add(engine, form, me):
    name, role = _field(form, "name"), _field(form, "role")
    password = _field(form, "password", required=False) or None
    if password:
        users.check_password_strength(password)
    users.add_user(engine, name, role, password)
    return f"user:{name}", f"User {name} created ({role}).", {"role": role}


def _user_disable(engine, form, me):
    name = _field(form, "name")
    if name == me.name:
        raise BadRequest("You cannot disable your own account.")
    revoked = users.disable_user(engine, name)
    return f"user:{name}", f"User {name} disabled: sessions ended, {revoked} key(s) revoked.", {"keys": revoked}


def _user_enable(engine, form, me):
    name = _field(form, "name")
    users.enable_user(engine, name)
    return f"user:{name}", f"User {name} enabled (their old keys stay revoked).", {}


def _user_password(engine, form, me):
    name, password = _field(form, "name"), _field(form, "password")
    users.set_password(engine, name, password)
    return f"user:{name}", f"Password of {name} set; their sessions ended.", {}


def _user_mfa_reset(engine, form, me):
    name = _field(form, "name")
    users.reset_mfa(engine, name)
    return (
        f"user:{name}",
        f"Two-factor sign-in of {name} removed; they enrol again at sign-in.",
        {},
    )


def _user_role(engine, form, me):
    name, role = _field(form, "name"), _field(form, "role")
    old = users.set_role(engine, name, role)
    return f"user:{name}", f"{name} is now {role} (was {old}).", {"role": role, "previous": old}


def _group_add(engine, form, me):
    name = _field(form, "name")
    rbac.add_group(engine, name)
    return f"group:{name}", f"Group {name} created.", {}


def _member_add(engine, form, me):
    group, user = _field(form, "group"), _field(form, "user")
    rbac.add_member(engine, group, user)
    return f"group:{group}", f"{user} added to {group}.", {"user": user}


def _member_rm(engine, form, me):
    group, user = _field(form, "group"), _field(form, "user")
    rbac.remove_member(engine, group, user)
    return f"group:{group}", f"{user} removed from {group}.", {"user": user}


def _collection_add(engine, form, me):
    name = _field(form, "name")
    rbac.add_collection(engine, name, _field(form, "description", required=False) or None)
    return f"collection:{name}", f"Collection {name} created.", {}


def _grant_add(engine, form, me):
    collection, subject, role = _field(form, "collection"), _subject(form), _field(form, "role")
    rbac.add_grant(engine, collection, role=role, **subject)
    ((kind, name),) = subject.items()
    return f"collection:{collection}", f"{kind} {name} may now {role} {collection}.", {kind: name, "role": role}


def _grant_rm(engine, form, me):
    collection, subject = _field(form, "collection"), _subject(form)
    rbac.remove_grant(engine, collection, **subject)
    ((kind, name),) = subject.items()
    return f"collection:{collection}", f"Grant of {kind} {name} on {collection} removed.", {kind: name}


def _wall_add(engine, form, me):
    collection, subject = _field(form, "collection"), _subject(form)
    rbac.add_wall(engine, collection, **subject)
    ((kind, name),) = subject.items()
    return f"collection:{collection}", f"{kind} {name} is walled off {collection}.", {kind: name}


def _wall_rm(engine, form, me):
    collection, subject = _field(form, "collection"), _subject(form)
    rbac.remove_wall(engine, collection, **subject)
    ((kind, name),) = subject.items()
    return f"collection:{collection}", f"Wall of {kind} {name} on {collection} removed.", {kind: name}


def _key_revoke(engine, form, me):
    prefix = _field(form, "prefix")
    count = users.revoke_key(engine, prefix)
    return f"key:{prefix}", f"Key {prefix}… revoked.", {"count": count}


ACTIONS: dict[str, tuple[str, str, Handler]] = {
    "user-add": ("manage_users", "user_add", _user_add),
    "user-disable": ("manage_users", "user_disable", _user_disable),
    "user-enable": ("manage_users", "user_enable", _user_enable),
    "user-password": ("manage_users", "password_set", _user_password),
    "user-mfa-reset": ("manage_users", "mfa_reset", _user_mfa_reset),
    "user-role": ("manage_users", "role_set", _user_role),
    "group-add": ("manage_users", "group_add", _group_add),
    "member-add": ("manage_users", "member_add", _member_add),
    "member-rm": ("manage_users", "member_rm", _member_rm),
    "key-revoke": ("manage_users", "key_revoke", _key_revoke),
    "collection-add": ("manage_policy", "collection_add", _collection_add),
    "grant-add": ("manage_policy", "grant_add", _grant_add),
    "grant-rm": ("manage_policy", "grant_rm", _grant_rm),
    "wall-add": ("manage_policy", "wall_add", _wall_add),
    "wall-rm": ("manage_policy", "wall_rm", _wall_rm),
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


async def _admin_page(request: Request, signed, status: int = 200, **extra):
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
        **caller(request).nav(),
    )


@router.get("/admin")
async def admin_page(request: Request, done: str = ""):
    signed = _require(request, "manage_users")
    return await _admin_page(request, signed, notice=done[:300])


@router.post("/admin/key-create")
async def create_key(request: Request):
    """The new key is shown on the page this once (no redirect: it is never stored in clear)."""
    signed = _require(request, "manage_users")
    form = await request.form(max_files=0, max_fields=10)
    check_csrf(signed, form.get("csrf"))
    try:
        user, label = _field(form, "user"), _field(form, "label", required=False)
        key = await asyncio.to_thread(users.create_key, request.app.state.db, user, label)
    except ApplianceError as exc:
        return await _admin_page(request, signed, exc.status, error=exc.message)
    audit(request, signed.user.name, "key_create", actor_id=signed.user.id, target=f"user:{user}", prefix=key[:12])
    return await _admin_page(request, signed, new_key=key, new_key_user=user)


@router.post("/admin/break-glass")
async def break_glass(request: Request):
    """An admin's own time-limited reader grant on a collection, with a reason; audited, refusals too."""
    signed = _require(request, "manage_policy")
    form = await request.form(max_files=0, max_fields=10)
    check_csrf(signed, form.get("csrf"))
    me, state = signed.principal, request.app.state
    collection, reason = _field(form, "collection", required=False), _field(form, "reason", required=False)
    minutes_text = _field(form, "minutes", required=False) or str(rbac.BREAK_GLASS_MINUTES)
    details = {"user": me.name, "reason": reason[:500], "minutes": minutes_text[:16]}
    try:
        if not minutes_text.isdigit():
            raise BadRequest("'minutes' must be a whole number of minutes")
        grant = await asyncio.to_thread(
            rbac.break_glass,
            state.db,
            me.name,
            collection,
            reason,
            int(minutes_text),
            max_minutes=state.settings.break_glass_max_minutes,
        )
    except ApplianceError as exc:
        outcome = "denied" if isinstance(exc, Forbidden) else "failed"
        audit(request, me.name, "break_glass", actor_id=me.user_id, target=collection, outcome=outcome, **details)
        return await _admin_page(request, signed, exc.status, error=exc.message)
    assert grant.expires_at is not None
    until = grant.expires_at.isoformat()
    details.update(reason=grant.reason, minutes=int(minutes_text))
    audit(request, me.name, "break_glass", actor_id=me.user_id, target=collection, expires_at=until, **details)
    notice = f"Break-glass: you may read {collection} until {grant.expires_at:%Y-%m-%d %H:%M} UTC. This is audited."
    return RedirectResponse(f"/admin?{urlencode({'done': notice})}#break-glass", status_code=303)


def _set_document_acl(index, document_id: str, acl_field: str):
    """Who may read one document: its collection's readers, or named users and groups. The chunk index keeps
    the document row and the vector store's metadata in step. Returns (document, new ACL)."""
    from ingest.pipeline import parse_acl

    with session(index.engine) as db:
        document = db.get(Document, document_id) if len(document_id) == 64 else None
    if document is None:
        raise NotFound(f"document {document_id[:64]} not found")
    acl = parse_acl(acl_field, document.collection)
    rbac.check_acl_subjects(index.engine, acl, document.collection)
    index.set_acl(document.id, acl)
    return document, acl


@router.post("/admin/document-acl")
async def document_acl(request: Request):
    """The access form of the document page; back to that page with a notice."""
    signed = _require(request, "manage_policy")
    form = await request.form(max_files=0, max_fields=10)
    check_csrf(signed, form.get("csrf"))
    me = signed.principal
    try:
        document_id = _field(form, "document")
        document, acl = await asyncio.to_thread(
            _set_document_acl, request.app.state.ingestor.index, document_id, _field(form, "acl", required=False)
        )
    except ApplianceError as exc:
        audit(request, me.name, "acl_set", actor_id=me.user_id, outcome="failed", error=exc.message[:200])
        return await _admin_page(request, signed, exc.status, error=exc.message)
    details = {"collection": document.collection, "acl": acl, "previous": document.acl}
    audit(request, me.name, "acl_set", actor_id=me.user_id, target=f"document:{document.id}", **details)
    notice = f"{document.filename} is now readable by {', '.join(acl)}."
    return RedirectResponse(f"/documents/{document.id}?{urlencode({'done': notice})}", status_code=303)


@router.post("/admin/{action}")
async def admin_action(request: Request, action: str):
    if action not in ACTIONS:
        _require(request, "manage_users")  # who is not an administrator learns nothing about the forms
        raise BadRequest("no such administration action")
    needed, audit_action, handler = ACTIONS[action]
    signed = _require(request, needed)
    form = await request.form(max_files=0, max_fields=20)
    check_csrf(signed, form.get("csrf"))
    me = signed.principal
    try:
        target, notice, details = await asyncio.to_thread(handler, request.app.state.db, form, me)
    except ApplianceError as exc:
        audit(request, me.name, audit_action, actor_id=me.user_id, outcome="failed", error=exc.message[:200])
        return await _admin_page(request, signed, exc.status, error=exc.message)
    audit(request, me.name, audit_action, actor_id=me.user_id, target=target, **details)
    section = action.split("-")[0]
    return RedirectResponse(f"/admin?{urlencode({'done': notice})}#{section}", status_code=303)


@router.get("/admin/audit.jsonl")
async def export_audit(request: Request):
    """The matching audit records as JSON lines, downloaded (never rendered)."""
    _require(request, "manage_users")
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
