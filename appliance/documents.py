"""Documents as callers see them: what they may read, and where they may upload.

One home for these use cases, so that the documents page, the documents API and the `rag/<collection>`
models cannot disagree:

- `readable_documents`: the documents a caller may read, filtered in SQL by the read rule
  (`rbac.read_rule_sql`, the SQL form of `Access.can_read`), optionally within one collection and by a
  part of the file name; `readable_document_collections`: the collections those documents are in.
- `readable_collections`: the collections holding indexed documents that the caller may read (the
  collections offered for questions, and listed as `rag/<collection>` models).
- `editable_collections` and `authorize_upload`: where the caller may upload, and the upload rule: `edit`
  on the collection (an editor grant, and the editor or admin role), except that a caller who may create
  collections (`Access.may_create_collection`: the operator, an admin) and names one that does not exist
  yet creates it, an admin getting an editor grant on it. An editor without a grant is refused alike
  whether the name exists or not, so refusals do not tell which collection names exist.

An upload refused by `check_upload_role` or `authorize_upload` leaves its `upload` audit record (outcome
`denied`, the reason given) here, before the Forbidden is raised.
"""

from __future__ import annotations

from sqlalchemy import text as sql
from sqlalchemy.engine import Engine
from sqlmodel import select

from appliance import audit
from appliance.db import Collection, Document, session
from appliance.errors import Conflict, Forbidden
from appliance.rbac import Access, add_collection, add_grant, ensure_collection, read_rule_sql
from appliance.users import Principal


def _readable(engine: Engine, access: Access, query):
    """`query` (over the document table) narrowed to the documents the caller may read."""
    conditions, params, binds = read_rule_sql(access, engine.dialect.name, "document")
    if not conditions:
        return query
    return query.where(sql(" AND ".join(conditions)).bindparams(*binds).bindparams(**params))


def readable_documents(
    engine: Engine, access: Access, collection: str | None = None, name: str | None = None
) -> list[Document]:
    """The documents (any status) the caller may read, by collection then file name; only those in
    `collection` and those whose file name holds `name` (case-insensitive), when given."""
    query = select(Document).order_by(Document.collection, Document.filename)
    if collection:
        query = query.where(Document.collection == collection)
    with session(engine) as db:
        documents = list(db.exec(_readable(engine, access, query)))
    needle = (name or "").strip().lower()
    return [d for d in documents if needle in d.filename.lower()] if needle else documents


def readable_document_collections(engine: Engine, access: Access) -> list[str]:
    """The collections holding a document (any status) the caller may read, sorted."""
    with session(engine) as db:
        names = set(db.exec(_readable(engine, access, select(Document.collection).distinct())))
    return sorted(names)


def indexed_collections(engine: Engine) -> set[str]:
    """Collections that hold indexed documents (those that exist as `rag/<collection>` models)."""
    with session(engine) as db:
        return set(db.exec(select(Document.collection).where(Document.status == "indexed").distinct()))


def readable_collections(engine: Engine, access: Access) -> list[str]:
    """Collections that hold indexed documents and that the caller may read, sorted."""
    return sorted(name for name in indexed_collections(engine) if access.may("read", name))


def editable_collections(engine: Engine, access: Access) -> list[str]:
    """Existing collections the caller may upload to, sorted."""
    with session(engine) as db:
        names = list(db.exec(select(Collection.name)))
    return sorted(name for name in names if access.may("edit", name))


def record(engine: Engine, principal: Principal, action: str, target: str | None, outcome: str, **details) -> None:
    """The audit record of an upload or a delete, by the caller."""
    actor, actor_id = audit.actor_of(principal)
    audit.record(engine, actor, action, actor_id=actor_id, target=target, outcome=outcome, details=details)


def _refuse(engine: Engine, principal: Principal, target: str | None, error: Forbidden) -> Forbidden:
    record(engine, principal, "upload", target, "denied", reason=error.message)
    return error


def check_upload_role(engine: Engine, principal: Principal, access: Access) -> None:
    """Forbidden (audited) unless the caller's role lets them upload at all: a reader never uploads, and is
    told so before anything else is read."""
    if not access.may_upload_by_role():
        error = Forbidden("uploading needs the editor (or admin) role and an editor grant on the collection")
        raise _refuse(engine, principal, None, error)


def authorize_upload(engine: Engine, principal: Principal, access: Access, collection: str) -> None:
    """Let the caller upload to `collection`, or raise Forbidden (audited).

    `edit` on the collection is needed. A caller who may create collections and names one that does not
    exist yet creates it: the operator (who needs no grant), or an admin, who gets an editor grant on it. An
    editor may not: whether their refusal meant "it exists" would tell them which collection names exist.
    """
    if not _may_upload(engine, principal, access, collection):
        error = Forbidden(f"uploading to collection '{collection}' needs an editor grant on it")
        raise _refuse(engine, principal, collection, error)


def _may_upload(engine: Engine, principal: Principal, access: Access, collection: str) -> bool:
    if access.unrestricted():  # the operator needs no grant
        ensure_collection(engine, collection)
        return True
    if access.may("edit", collection):  # an editor grant: the collection exists
        return True
    if not access.may_create_collection() or not _create(engine, collection):
        return False  # not an admin, or the collection exists: an editor grant on it is needed
    add_grant(engine, collection, user=principal.name, role="editor")
    return True


def _create(engine: Engine, collection: str) -> bool:
    """Create the collection; False if it exists already (perhaps created meanwhile by someone else)."""
    try:
        add_collection(engine, collection)
    except Conflict:
        return False
    return True
