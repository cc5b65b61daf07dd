"""Documents and ingestion jobs over HTTP: upload (multipart), job state, list, delete.

Uploads are streamed to server-named files under `<home>/incoming/` and ingested by the job worker.
Every decision asks the one policy (`rbac.access_for` / `allowed`): uploading needs `edit` on the
target collection (an editor grant, and the editor or admin role; the admin role alone is not enough),
except that an editor or admin who names a collection that does not exist yet creates it and gets
an editor grant on it. Deleting needs `edit` on the document's collection. The listing shows only
the documents the caller may read, and a document the caller may not read is answered exactly like
a missing one (404). A job is shown to its owner and to admins who may read its collection. Uploads
and deletes, allowed or denied, leave audit records.
"""

from __future__ import annotations

import asyncio
import re
import shutil

from fastapi import APIRouter, Depends, Request
from sqlmodel import select
from starlette.datastructures import UploadFile

from appliance import audit
from appliance.db import Document, session
from appliance.errors import BadRequest, Conflict, Forbidden, NotFound, PayloadTooLarge
from appliance.rbac import COLLECTION_NAME, Access, access_for, add_collection, add_grant, allowed, ensure_collection
from appliance.users import Principal
from ingest.filenames import allowed_suffix, display_name
from ingest.pipeline import parse_acl
from web.auth import require_user

router = APIRouter(prefix="/api")
_DOCUMENT_ID = re.compile(r"^[0-9a-f]{64}$")
MAX_FILES_PER_REQUEST = 100


def _record(request: Request, principal: Principal, action: str, target: str | None, outcome: str, **details) -> None:
    actor, actor_id = audit.actor_of(principal)
    audit.record(
        request.app.state.db, actor, action, actor_id=actor_id, target=target, outcome=outcome, details=details
    )


async def _denied(request: Request, principal: Principal, action: str, target: str | None, error: Forbidden):
    await asyncio.to_thread(_record, request, principal, action, target, "denied", reason=error.message)
    return error


def _may_upload(db, principal: Principal, access: Access, collection: str) -> bool:
    """`edit` on the collection; an editor or admin who names a new collection creates it and becomes its
    editor (the local operator may do everything and needs no grant)."""
    if access.everything:
        ensure_collection(db, collection)
        return True
    if allowed(access, "edit", collection):  # an editor grant: the collection exists
        return True
    if "edit" not in access.actions or not _create(db, collection):
        return False  # not an editing role, or the collection exists: an editor grant on it is needed
    add_grant(db, collection, user=principal.name, role="editor")
    return True


def _create(db, collection: str) -> bool:
    """Create the collection; False if it exists already (perhaps created meanwhile by someone else)."""
    try:
        add_collection(db, collection)
    except Conflict:
        return False
    return True


@router.post("/documents")
async def upload(request: Request, principal: Principal = Depends(require_user)):
    state = request.app.state
    access = await asyncio.to_thread(access_for, state.db, principal)
    if not access.everything and "edit" not in access.actions:  # a reader never uploads: say so before reading
        raise await _denied(
            request,
            principal,
            "upload",
            None,
            Forbidden("uploading needs the editor (or admin) role and an editor grant on the collection"),
        )
    limit = state.settings.ingest.max_upload_mb * 2**20
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + 2**20:
        raise PayloadTooLarge(f"upload larger than {state.settings.ingest.max_upload_mb} MB (APPLIANCE_MAX_UPLOAD_MB)")
    form = await request.form(max_files=MAX_FILES_PER_REQUEST, max_fields=10)
    collection = form.get("collection")
    if not isinstance(collection, str) or not COLLECTION_NAME.match(collection):
        raise BadRequest("'collection' is required: 1-128 letters, digits or _.- starting with a letter or digit")
    acl_field = form.get("acl")
    acl = parse_acl(acl_field if isinstance(acl_field, str) else None, collection)
    uploads = [item for item in form.getlist("file") if isinstance(item, UploadFile)]
    if not uploads:
        raise BadRequest("no 'file' parts in the upload")
    if not await asyncio.to_thread(_may_upload, state.db, principal, access, collection):
        await form.close()
        error = Forbidden(f"uploading to collection '{collection}' needs an editor grant on it")
        raise await _denied(request, principal, "upload", collection, error)
    answers = []
    for item in uploads:
        filename = display_name(item.filename or "upload")
        suffix = allowed_suffix(filename)
        if suffix is None:
            answers.append({"filename": filename, "error": "unsupported file type"})
            await asyncio.to_thread(
                _record, request, principal, "upload", collection, "failed", filename=filename, reason="unsupported"
            )
            continue
        job_id, target = state.jobs.new_upload_path(suffix)
        await asyncio.to_thread(_save, item, target)
        job = state.jobs.enqueue(job_id, target, filename, collection, acl, principal.user_id or None)
        await asyncio.to_thread(
            _record, request, principal, "upload", collection, "ok", filename=filename, job_id=job.id, acl=acl
        )
        answers.append({"filename": filename, "job_id": job.id, "state": job.state})
    await form.close()
    return {"jobs": answers}


def _save(item: UploadFile, target) -> None:
    item.file.seek(0)
    with target.open("wb") as out:
        shutil.copyfileobj(item.file, out, 1 << 20)


@router.get("/jobs/{job_id}")
async def job_state(job_id: str, request: Request, principal: Principal = Depends(require_user)):
    if not re.fullmatch(r"[0-9a-f]{32}", job_id):
        raise NotFound(f"job {job_id} not found")
    job = request.app.state.jobs.get(job_id)
    if job.user_id != principal.user_id:
        # Another user's job names a file and a collection: shown only to an admin who may read that collection.
        access = await asyncio.to_thread(access_for, request.app.state.db, principal)
        if not (principal.is_admin and allowed(access, "read", job.collection)):
            raise NotFound(f"job {job_id} not found")  # answered like a missing one
    summary = job.summary()
    if job.state == "running":
        summary["stage"] = request.app.state.jobs.stage(job.id) or "parsing"  # parsing | embedding | indexing
    return summary


def _readable_documents(db, access: Access, collection: str | None) -> list[Document]:
    with session(db) as s:
        query = select(Document).order_by(Document.collection, Document.filename)
        if collection:
            query = query.where(Document.collection == collection)
        return [d for d in s.exec(query) if access.can_read(d.collection, d.acl)]


@router.get("/documents")
async def list_documents(request: Request, collection: str | None = None, principal: Principal = Depends(require_user)):
    db = request.app.state.db
    access = await asyncio.to_thread(access_for, db, principal)
    documents = await asyncio.to_thread(_readable_documents, db, access, collection)
    return {"documents": [d.summary() for d in documents]}


def _document(db, document_id: str) -> Document | None:
    with session(db) as s:
        return s.get(Document, document_id)


@router.delete("/documents/{document_id}")
async def delete_document(document_id: str, request: Request, principal: Principal = Depends(require_user)):
    if not _DOCUMENT_ID.match(document_id):
        raise BadRequest("a document id is 64 lowercase hex characters")
    state = request.app.state
    access = await asyncio.to_thread(access_for, state.db, principal)
    document = await asyncio.to_thread(_document, state.db, document_id)
    if document is None or not access.can_read(document.collection, document.acl):
        if document is not None:
            await asyncio.to_thread(_record, request, principal, "delete", document_id, "denied", reason="cannot read")
        raise NotFound(f"document {document_id} not found")  # unreadable: exactly like a missing one
    if not allowed(access, "edit", document.collection):
        error = Forbidden(f"deleting from collection '{document.collection}' needs an editor grant on it")
        raise await _denied(request, principal, "delete", document_id, error)
    await asyncio.to_thread(state.ingestor.remove, document_id)
    await asyncio.to_thread(
        _record,
        request,
        principal,
        "delete",
        document_id,
        "ok",
        collection=document.collection,
        filename=document.filename,
    )
    return {"deleted": document_id}
