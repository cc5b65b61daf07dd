"""The documents use cases: what a caller may read, uploading, deleting, re-parsing, and who may read one document.

Each use case takes the `Actor` who acts, applies the rule, and writes the audit records (allowed, denied
or failed) itself, so the documents API, the pages and `appliance documents` / `appliance ingest` only
parse, call and render. The reads filter in SQL by the read rule (`rbac.read_rule_sql`, the SQL form of
`Access.can_read`).

Upload rule: the editor or admin role (`Access.may_upload_by_role`), then `edit` on the collection; a caller
who may create collections (the operator, an admin) and names one that does not exist yet creates it, an
admin getting an editor grant on it. An editor without a grant is refused alike whether the name exists or
not, so refusals do not tell which collection names exist. Deleting (and replacing by an upload) follows
`Access.may_delete`; a document the caller may not read is answered exactly like a missing one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import text as sql
from sqlalchemy.engine import Engine
from sqlmodel import select

from appliance.access.actors import Actor
from appliance.access.rbac import (
    COLLECTION_NAME,
    Access,
    add_collection,
    add_grant,
    check_acl_subjects,
    ensure_collection,
    list_groups,
    read_rule_sql,
)
from appliance.db import Chunk, Collection, Document, DocumentText, Job, session
from appliance.errors import ApplianceError, BadRequest, Conflict, Forbidden, NotFound, Withheld
from ingest.filenames import allowed_suffix, display_name
from ingest.pipeline import IngestResult, ReparseResult, parse_acl

if TYPE_CHECKING:
    from appliance.retrieval.index import ChunkIndex
    from ingest.jobs import JobWorker
    from ingest.pipeline import Ingestor

DOCUMENT_ID = re.compile(r"[0-9a-f]{64}")  # matched whole (fullmatch)
JOB_ID = re.compile(r"[0-9a-f]{32}")
MAX_PASSAGE = 20_000  # characters: the longest passage a document page highlights from a link's start and end
UNREADABLE = "No such document, or you may not read it."


# --- reading ------------------------------------------------------------------------------------
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
    """Collections that hold indexed documents and that the caller may read, sorted (offered for questions)."""
    return sorted(name for name in indexed_collections(engine) if access.may("read", name))


def editable_collections(engine: Engine, access: Access) -> list[str]:
    """Existing collections the caller may upload to, sorted."""
    with session(engine) as db:
        names = list(db.exec(select(Collection.name)))
    return sorted(name for name in names if access.may("edit", name))


@dataclass(frozen=True)
class Listing:
    documents: list[Document]  # those the caller may read, within the filter
    collections: list[str]  # every collection holding a document the caller may read (the filter's choices)


def list_documents(engine: Engine, actor: Actor, collection: str = "", name: str = "") -> Listing:
    """The documents page: the readable documents in `collection` whose file name holds `name`."""
    return Listing(
        readable_documents(engine, actor.access, collection, name),
        readable_document_collections(engine, actor.access),
    )


@dataclass(frozen=True)
class DocumentView:
    document: Document
    text: str  # the extracted full text
    span: tuple[int, int] | None  # the passage to highlight in `text`
    page: int | None  # where the cited chunk is
    headings: list[str]


def view_document(
    engine: Engine, actor: Actor, document_id: str, chunk_id: str = "", start: int | None = None, end: int | None = None
) -> DocumentView:
    """One readable document's text, with the passage a citation points at: `start`..`end` when given and
    sensible, else the chunk's span. Missing and unreadable documents get the same answer."""
    with session(engine) as db:
        document = db.get(Document, document_id) if DOCUMENT_ID.fullmatch(document_id) else None
        if document is None:
            raise NotFound(UNREADABLE)
        if not actor.access.can_read(document.collection, document.acl):
            raise Withheld(UNREADABLE)  # recorded by the edge as a refused access
        text_row = db.get(DocumentText, document_id)
        chunk = db.get(Chunk, chunk_id) if chunk_id else None
    text = text_row.text if text_row else ""
    if chunk is not None and chunk.document_id != document_id:
        chunk = None
    span = None
    if start is not None and end is not None and 0 <= start < end <= len(text) and end - start <= MAX_PASSAGE:
        span = (start, end)
    elif chunk is not None and 0 <= chunk.start < chunk.end <= len(text):
        span = (chunk.start, chunk.end)
    if chunk is None:
        return DocumentView(document, text, span, None, [])
    return DocumentView(document, text, span, chunk.page, list(chunk.headings))


def find_document(engine: Engine, actor: Actor, prefix: str) -> Document:
    """The readable document whose id starts with `prefix` (at least 6 hex characters), as the CLI names one."""
    if len(prefix) < 6 or not all(c in "0123456789abcdef" for c in prefix):
        raise BadRequest("give the document id (at least its first 6 hex characters)")
    query = select(Document).where(Document.id.startswith(prefix))  # type: ignore[attr-defined]
    with session(engine) as db:
        matches = list(db.exec(_readable(engine, actor.access, query)))
    if not matches:
        raise NotFound(f"document {prefix} not found")
    if len(matches) > 1:
        raise BadRequest(f"document id {prefix} is ambiguous; give more characters")
    return matches[0]


def document_chunks(engine: Engine, actor: Actor, document: Document) -> list[Chunk]:
    """A readable document's chunks, in order."""
    if not actor.access.can_read(document.collection, document.acl):
        raise NotFound(f"document {document.id} not found")
    with session(engine) as db:
        return list(db.exec(select(Chunk).where(Chunk.document_id == document.id).order_by(Chunk.position)))


# --- uploading ----------------------------------------------------------------------------------
def _record(engine: Engine, actor: Actor, action: str, target: str | None, outcome: str = "ok", **details) -> None:
    """An `upload` or `delete` record (with the client address of a web request, as every use case's)."""
    actor.record(engine, action, target=target, outcome=outcome, **details)


def _refuse(engine: Engine, actor: Actor, action: str, target: str | None, error: Forbidden) -> Forbidden:
    """Record a refused upload or delete (outcome `denied`, the reason given) and mark the error audited."""
    return actor.refuse(engine, action, error, target=target)


@dataclass(frozen=True)
class UploadChoices:
    collections: list[str]  # existing collections the caller may upload to
    can_create: bool  # whether naming a new collection creates it
    groups: list[str]  # group names an access list may name


def upload_choices(engine: Engine, actor: Actor) -> UploadChoices:
    """What the upload page offers: the same rule as `authorize_upload`."""
    groups = [group["name"] for group in list_groups(engine)]
    return UploadChoices(editable_collections(engine, actor.access), actor.access.may_create_collection(), groups)


def check_upload_role(engine: Engine, actor: Actor) -> None:
    """Forbidden (audited) unless the actor's role lets them upload at all: a reader never uploads, and is
    told so before anything else is read."""
    if not actor.access.may_upload_by_role():
        error = Forbidden("uploading needs the editor (or admin) role and an editor grant on the collection")
        raise _refuse(engine, actor, "upload", None, error)


def authorize_upload(engine: Engine, actor: Actor, collection: str) -> None:
    """Let the actor upload to `collection`, or raise Forbidden (audited).

    `edit` on the collection is needed. A caller who may create collections and names one that does not
    exist yet creates it: the operator (who needs no grant), or an admin, who gets an editor grant on it. An
    editor may not: whether their refusal meant "it exists" would tell them which collection names exist.
    """
    if not _may_upload(engine, actor, collection):
        error = Forbidden(f"uploading to collection '{collection}' needs an editor grant on it")
        raise _refuse(engine, actor, "upload", collection, error)


def _may_upload(engine: Engine, actor: Actor, collection: str) -> bool:
    access = actor.access
    if access.unrestricted():  # the operator needs no grant
        ensure_collection(engine, collection)
        return True
    if access.may("edit", collection):  # an editor grant: the collection exists
        return True
    if not access.may_create_collection() or not _create(engine, collection):
        return False  # not an admin, or the collection exists: an editor grant on it is needed
    add_grant(engine, collection, user=actor.name, role="editor")
    return True


def _create(engine: Engine, collection: str) -> bool:
    """Create the collection; False if it exists already (perhaps created meanwhile by someone else)."""
    try:
        add_collection(engine, collection)
    except Conflict:
        return False
    return True


@dataclass(frozen=True)
class IncomingFile:
    """One file of an upload as the edge received it."""

    name: str  # as the client named it (only ever shown, never a path)
    size: int  # bytes
    save: Callable[[Path], None]  # writes its bytes to the given path


def upload(
    engine: Engine,
    jobs: JobWorker,
    actor: Actor,
    collection: str | None,
    acl_text: str | None,
    files: list[IncomingFile],
    max_mb: int,
) -> list[dict]:
    """Queue uploaded files as ingestion jobs in `collection`, readable by `acl_text` (empty: the collection's
    readers). Refused (audited) without the role or a grant; each file is then audited: queued, or not
    (`failed`: an unsupported type, or over `max_mb`). Returns each file's answer: its job, or its error."""
    check_upload_role(engine, actor)
    if collection is None or not COLLECTION_NAME.match(collection):
        raise BadRequest("'collection' is required: 1-128 letters, digits or _.- starting with a letter or digit")
    acl = parse_acl(acl_text, collection)
    if not files:
        raise BadRequest("no 'file' parts in the upload")
    authorize_upload(engine, actor, collection)
    check_acl_subjects(engine, acl, collection)  # only once allowed: what names exist is not told to others
    return [_queue(engine, jobs, actor, collection, acl, item, max_mb) for item in files]


def _queue(
    engine: Engine, jobs: JobWorker, actor: Actor, collection: str, acl: list[str], item: IncomingFile, max_mb: int
) -> dict:
    filename = display_name(item.name or "upload")
    suffix = allowed_suffix(filename)
    if suffix is None:
        reason, message = "unsupported", "unsupported file type"
    elif item.size > max_mb * 2**20:
        reason, message = "too large", f"file larger than {max_mb} MB (APPLIANCE_MAX_UPLOAD_MB)"
    else:
        job_id, target = jobs.new_upload_path(suffix)
        item.save(target)
        job = jobs.enqueue(job_id, target, filename, collection, acl, actor.id or None)
        _record(engine, actor, "upload", collection, filename=filename, job_id=job.id, acl=acl, state="queued")
        return {"filename": filename, "job_id": job.id, "state": job.state}
    _record(engine, actor, "upload", collection, "failed", filename=filename, reason=reason)
    return {"filename": filename, "error": message}


def ingest_files(
    engine: Engine,
    ingestor: Ingestor,
    actor: Actor,
    files: list[Path],
    collection: str,
    acl_text: str | None,
    on_file: Callable[[list[IngestResult]], None] | None = None,
) -> list[IngestResult]:
    """Ingest files now (not as jobs) into `collection`, readable by `acl_text`: the upload rule, then one
    `upload` record per result (an e-mail's attachments are results of their own). `on_file` sees each
    file's results as they come. Returns them all."""
    check_upload_role(engine, actor)
    authorize_upload(engine, actor, collection)
    acl = parse_acl(acl_text, collection)
    check_acl_subjects(engine, acl, collection)
    results: list[IngestResult] = []
    for file_results in ingestor.ingest_many(((path, str(path.resolve())) for path in files), collection, acl):
        for result in file_results:
            _record(
                engine,
                actor,
                "upload",
                collection,
                "failed" if result.status == "failed" else "ok",
                source=result.source,
                document_id=result.document_id,
                result=result.status,
                reason=result.reason or None,
            )
        results.extend(file_results)
        if on_file is not None:
            on_file(file_results)
    return results


# --- jobs ---------------------------------------------------------------------------------------
def may_see_job(actor: Actor, job: Job) -> bool:
    """A job names a file and a collection: shown to its uploader, and to an administrator who may read that
    collection."""
    if job.user_id == (actor.id or None):
        return True
    return actor.access.may_administer() and actor.may("read", job.collection)


def job_state(jobs: JobWorker, actor: Actor, job_id: str) -> dict:
    """An upload's job as its uploader sees it (a running one with its stage: parsing, embedding, indexing).
    A job the actor may not see is answered like a missing one."""
    if not JOB_ID.fullmatch(job_id):
        raise NotFound(f"job {job_id} not found")
    job = jobs.get(job_id)
    if not may_see_job(actor, job):
        raise Withheld(f"job {job_id} not found")  # recorded by the edge as a refused access
    summary = job.summary()
    if job.state == "running":
        summary["stage"] = jobs.stage(job.id) or "parsing"
    return summary


# --- changing a document ------------------------------------------------------------------------
def delete_document(engine: Engine, ingestor: Ingestor, actor: Actor, document_id: str) -> Document:
    """Delete a document the actor may delete (`Access.may_delete`): its chunks everywhere, its text and its
    original. One that they may not read is answered like a missing one. Audited, allowed or denied."""
    if not DOCUMENT_ID.fullmatch(document_id):
        raise BadRequest("a document id is 64 lowercase hex characters")
    with session(engine) as db:
        document = db.get(Document, document_id)
    if document is None or not actor.access.can_read(document.collection, document.acl):
        if document is not None:
            _record(engine, actor, "delete", document_id, "denied", reason="cannot read")
        raise NotFound(f"document {document_id} not found")  # unreadable: exactly like a missing one
    if not actor.access.may_delete(document):
        error = Forbidden(f"deleting from collection '{document.collection}' needs an editor grant on it")
        raise _refuse(engine, actor, "delete", document_id, error)
    ingestor.remove(document_id)
    _record(engine, actor, "delete", document_id, collection=document.collection, filename=document.filename)
    return document


def set_document_acl(
    engine: Engine, index: ChunkIndex, actor: Actor, document_id: str, acl_text: str | None
) -> tuple[Document, list[str]]:
    """Who may read one document: named users, groups and collections (`acl_text`), or its collection's
    readers (empty). Needs `manage_policy`; every name must exist. The index keeps the document row and the
    vector store's metadata in step, effective on the next request. Audited: `acl_set` ok, denied or failed.
    Returns the document as it was, and its new access list."""
    target = f"document:{document_id[:64]}"
    if not actor.may("manage_policy"):
        raise actor.refuse(engine, "acl_set", Forbidden("Only administrators may do this."), target=target)
    try:
        with session(engine) as db:
            document = db.get(Document, document_id) if DOCUMENT_ID.fullmatch(document_id) else None
        if document is None:
            raise NotFound(f"document {document_id[:64]} not found")
        acl = parse_acl(acl_text, document.collection)
        check_acl_subjects(engine, acl, document.collection)
        index.set_acl(document.id, acl)
    except ApplianceError as exc:
        actor.record(engine, "acl_set", target=target, outcome="failed", error=exc.message[:200])
        raise
    details = {"collection": document.collection, "acl": acl, "previous": document.acl}
    actor.record(engine, "acl_set", target=target, **details)
    return document, acl


def reparse_documents(
    engine: Engine,
    ingestor: Ingestor,
    actor: Actor,
    collection: str | None = None,
    document_ids: list[str] | None = None,
    on_result: Callable[[ReparseResult], None] = lambda result: None,
) -> list[ReparseResult]:
    """Parse indexed documents again from their stored originals with this version's parser (after an upgrade
    that reads some formats better), so their passages are what a new upload would give. The actor must be
    able to delete each document (`Access.may_delete`: read it, edit its collection); the others are left
    out, as are documents still being indexed. One `reparse` audit record for the run, with the counts.

    Earlier answers keep the quotes they showed; their links open the document at the span recorded then,
    which may have moved if its text changed."""
    query = select(Document).where(Document.status == "indexed").order_by(Document.collection, Document.filename)
    if collection:
        query = query.where(Document.collection == collection)
    if document_ids:
        query = query.where(Document.id.in_(document_ids))  # type: ignore[attr-defined]
    with session(engine) as db:
        documents = [d for d in db.exec(query) if actor.access.may_delete(d)]
    results = []
    try:
        for document in documents:
            result = ingestor.reparse(document)
            results.append(result)
            on_result(result)
    finally:
        counts = {status: sum(r.status == status for r in results) for status in ("reparsed", "unchanged", "failed")}
        if counts["reparsed"]:
            ingestor.index.mark_reparsed()  # in-memory copies read the index again: texts changed, not only counts
        outcome = "ok" if len(results) == len(documents) else "failed"
        actor.record(engine, "reparse", target=collection or None, outcome=outcome, documents=len(documents), **counts)
    return results
