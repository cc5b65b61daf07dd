"""The audit log: append-only, hash-chained records of who did what (sign-ins, uploads, deletes, policy
changes, questions), kept in the metadata database.

Each record's hash is the SHA-256 of a canonical JSON array of its fields in a fixed order (`details`
with sorted keys) ending with the previous record's hash; the first record chains from `GENESIS`.
Writers are serialized (a process lock, and on SQLite the read of the last hash and the insert share
one `BEGIN IMMEDIATE` transaction), so concurrent writers cannot fork the chain. On SQLite, triggers
refuse UPDATE and DELETE; `verify` recomputes the chain and so also catches whoever drops the
triggers or edits the database file. (Removing the newest records leaves a shorter, valid chain:
note the head hash `appliance audit verify` prints somewhere else to catch that too.)

Details carry identifiers only (collections, chunk ids, model, job id, file name): never document
text, passwords or keys. The question text is kept only when `APPLIANCE_AUDIT_QUESTION_TEXT` is on.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import insert
from sqlalchemy.engine import Engine
from sqlmodel import select

from appliance.db import AuditRecord, session, utcnow
from appliance.errors import BadRequest

GENESIS = hashlib.sha256(b"knowledge appliance audit log").hexdigest()
LOCAL_OPERATOR = "local-operator"
OUTCOMES = ("ok", "denied", "failed")
ACTIONS = (
    "signin",
    "signin_failed",
    "signout",
    "upload",
    "delete",
    "grant_add",
    "grant_rm",
    "wall_add",
    "wall_rm",
    "user_add",
    "user_disable",
    "user_enable",
    "password_set",
    "mfa_reset",
    "setup",
    "session_refused",
    "csrf_refused",
    "key_create",
    "key_revoke",
    "group_add",
    "member_add",
    "member_rm",
    "collection_add",
    "ask",
    "search",
    "break_glass",
    "role_set",
    "acl_set",
    "backup",
    "restore",
    "reparse",
    "access_refused",  # a 403, or a 404 that hides something the caller may not see
)
# Keys that must never appear in details: they would carry secrets or document text.
_FORBIDDEN_KEYS = frozenset({"password", "key", "api_key", "secret", "token", "text", "content", "answer"})
_TABLE = AuditRecord.__table__  # type: ignore[attr-defined]
_BATCH = 500
_lock = threading.Lock()


@dataclass(frozen=True)
class Verification:
    ok: bool
    first_bad_id: int | None
    reason: str | None
    records: int  # how many records were checked (all of them when ok)
    head: str  # the hash of the last good record (GENESIS for an empty log)


def actor_of(principal) -> tuple[str, int]:
    """(name, id) of an API caller for the log; the local CLI token is the local operator."""
    if principal.user_id == 0:
        return LOCAL_OPERATOR, 0
    return principal.name, principal.user_id


def _at_text(at: datetime) -> str:
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def _digest(fields: dict[str, Any]) -> str:
    """SHA-256 over the canonical JSON of a record's fields (fixed order) and its prev_hash."""
    canonical = [
        fields["id"],
        _at_text(fields["at"]),
        fields["actor"],
        fields["actor_id"],
        fields["action"],
        fields["target"],
        fields["outcome"],
        fields["details"],
        fields["prev_hash"],
    ]
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _clean_details(details: dict[str, Any] | None) -> dict[str, Any]:
    details = json.loads(json.dumps(details or {}, default=str))  # exactly what the JSON column gives back
    if not isinstance(details, dict):
        raise TypeError("audit details must be a JSON object")
    leaked = _FORBIDDEN_KEYS & set(details)
    if leaked:
        raise ValueError(f"audit details may not carry {sorted(leaked)} (no secrets or document text)")
    return details


def record(
    engine: Engine,
    actor: str,
    action: str,
    *,
    actor_id: int | None = None,
    target: str | None = None,
    outcome: str = "ok",
    details: dict[str, Any] | None = None,
    address: str | None = None,
) -> AuditRecord:
    """Append one record to the chain and return it; `address`, the client address of a request, comes first
    in the details."""
    if address is not None:
        details = {"address": address, **(details or {})}
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown audit outcome {outcome!r}")
    fields: dict[str, Any] = {
        "actor": actor[:64],
        "actor_id": actor_id,
        "action": action,
        "target": None if target is None else str(target)[:1024],
        "outcome": outcome,
        "details": _clean_details(details),
    }
    with _lock, engine.connect() as connection:
        dialect = engine.dialect.name
        if dialect == "sqlite":
            connection.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock, before the last hash is read
        elif dialect == "postgresql":
            connection.exec_driver_sql("LOCK TABLE audit_record IN EXCLUSIVE MODE")
        last = connection.execute(select(_TABLE.c.id, _TABLE.c.hash).order_by(_TABLE.c.id.desc()).limit(1)).first()
        fields["id"] = (last.id + 1) if last else 1
        fields["prev_hash"] = last.hash if last else GENESIS
        fields["at"] = utcnow()
        fields["hash"] = _digest(fields)
        connection.execute(insert(_TABLE).values(**fields))
        connection.commit()
    return AuditRecord(**fields)


def _batches(engine: Engine, query) -> Iterator[AuditRecord]:
    """Records of `query` in id order, read a batch at a time (keyset pagination)."""
    after = 0
    while True:
        with session(engine) as db:
            rows = list(db.exec(query.where(AuditRecord.id > after).order_by(AuditRecord.id).limit(_BATCH)))
        yield from rows
        if len(rows) < _BATCH:
            return
        after = rows[-1].id or 0


def check(engine: Engine) -> Verification:
    """Recompute the whole chain; the first record that breaks it, and why."""
    expected_prev, count = GENESIS, 0
    for row in _batches(engine, select(AuditRecord)):
        fields = row.model_dump()
        if row.prev_hash != expected_prev:
            reason = (
                "its prev_hash is not the hash of the record before it "
                "(a record before it was removed, inserted, reordered, or edited and re-hashed)"
            )
            return Verification(False, row.id, reason, count, expected_prev)
        if _digest(fields) != row.hash:
            return Verification(
                False, row.id, "its contents do not match its hash (the record was edited)", count, expected_prev
            )
        expected_prev = row.hash
        count += 1
    return Verification(True, None, None, count, expected_prev)


def verify(engine: Engine) -> tuple[bool, int | None, str | None]:
    """(ok, id of the first bad record, why it is bad)."""
    result = check(engine)
    return result.ok, result.first_bad_id, result.reason


def parse_since(value: str | datetime | date | None) -> datetime | None:
    """An ISO date or date-time (UTC when it names no zone)."""
    if value is None or isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day)
    else:
        try:
            moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise BadRequest(f"not an ISO date or time: {value!r} (e.g. 2026-11-21 or 2026-11-21T08:00:00Z)") from None
    if moment is not None and moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment


def _filtered(
    since: str | datetime | None = None,
    actor: str | None = None,
    action: str | None = None,
    *,
    until: str | datetime | None = None,
    outcome: str | None = None,
    target: str | None = None,
):
    query = select(AuditRecord)
    start, end = parse_since(since), parse_since(until)
    if start is not None:
        query = query.where(AuditRecord.at >= start)
    if end is not None:
        query = query.where(AuditRecord.at < end)
    if actor:
        query = query.where(AuditRecord.actor == actor)
    if action:
        query = query.where(AuditRecord.action == action)
    if outcome:
        query = query.where(AuditRecord.outcome == outcome)
    if target:
        query = query.where(AuditRecord.target == target)
    return query


def as_dict(row: AuditRecord) -> dict[str, Any]:
    return {
        "id": row.id,
        "at": _at_text(row.at),
        "actor": row.actor,
        "actor_id": row.actor_id,
        "action": row.action,
        "target": row.target,
        "outcome": row.outcome,
        "details": row.details,
        "prev_hash": row.prev_hash,
        "hash": row.hash,
    }


def export(
    engine: Engine, since: str | datetime | None = None, actor: str | None = None, action: str | None = None
) -> Iterator[dict[str, Any]]:
    """Every matching record, oldest first, as a dict (what `appliance audit export` prints)."""
    for row in _batches(engine, _filtered(since, actor, action)):
        yield as_dict(row)


def search(
    engine: Engine,
    *,
    since: str | datetime | None = None,
    until: str | datetime | None = None,
    actor: str | None = None,
    action: str | None = None,
    outcome: str | None = None,
    target: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    """One page of matching records, newest first, and how many match in all (for an admin page)."""
    from sqlalchemy import func

    if not 1 <= limit <= 1000 or offset < 0:
        raise BadRequest("limit must be 1-1000 and offset not negative")
    query = _filtered(since, actor, action, until=until, outcome=outcome, target=target)
    with session(engine) as db:
        total = db.exec(select(func.count()).select_from(query.subquery())).one()
        rows = list(db.exec(query.order_by(AuditRecord.id.desc()).offset(offset).limit(limit)))
    return [as_dict(row) for row in rows], int(total)


def ask_details(
    done, collections: list[str] | None, *, question: str | None = None, keep_question: bool = False, **extra: Any
) -> dict[str, Any]:
    """What a question's record keeps: where it was asked, the passages retrieved and cited, the model,
    the kind of answer; the question's text only when the setting allows it (never the answer)."""
    details: dict[str, Any] = {
        "collections": collections,
        "retrieved": list(done.retrieved),
        "cited": [c.chunk_id for c in done.citations],
        "model": done.model,
        "mode": done.mode,
        "grounded": done.grounded,
        **extra,
    }
    if keep_question and question is not None:
        details["question"] = question
    return details
