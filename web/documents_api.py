"""Documents and ingestion jobs over HTTP: upload (multipart), job state, list, delete.

Uploads are streamed to server-named files under `<home>/incoming/` and ingested by the job worker.
The request body is counted as it arrives, whatever its transfer encoding: past one document's size
limit (plus room for the form's fields) it is refused at once, and each file is held to that limit.
Every decision asks the one policy (`rbac.access_for` / `allowed`). Who may upload where is
`appliance.documents.authorize_upload` (uploading needs `edit` on the target collection, the admin role
alone is not enough; an admin who names a collection that does not exist yet creates it and gets an editor
grant on it), which also audits a refusal. Deleting follows `Access.may_delete`, as replacing a document by a
new upload does. The listing (`appliance.documents.readable_documents`) shows only the documents the
caller may read, and a document the caller may not read is answered exactly like a missing one (404). A
job is shown to its owner and to admins who may read its collection. Uploads (queued, then their job's
end) and deletes, allowed or denied, leave audit records.
"""

from __future__ import annotations

import asyncio
import re
import shutil

from fastapi import APIRouter, Depends, Request
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from appliance import documents
from appliance.db import Document, session
from appliance.errors import BadRequest, Forbidden, NotFound, PayloadTooLarge, Withheld
from appliance.rbac import COLLECTION_NAME, access_for, check_acl_subjects
from appliance.users import Principal
from ingest.filenames import allowed_suffix, display_name
from ingest.pipeline import parse_acl
from web.auth import require_user

router = APIRouter(prefix="/api")
_DOCUMENT_ID = re.compile(r"^[0-9a-f]{64}$")
MAX_FILES_PER_REQUEST = 100
FORM_ROOM = 2**20  # bytes a request may carry beyond one document: its fields and the parts' headers


def _record(request: Request, principal: Principal, action: str, target: str | None, outcome: str, **details) -> None:
    documents.record(request.app.state.db, principal, action, target, outcome, **details)


async def _denied(request: Request, principal: Principal, action: str, target: str | None, error: Forbidden):
    await asyncio.to_thread(_record, request, principal, action, target, "denied", reason=error.message)
    request.state.refusal_audited = True  # recorded here: the error handler adds no generic record
    return error


async def _authorized(request: Request, check, *args) -> None:
    """Run an upload check of `appliance.documents`, which audits its own refusals: the error handler then
    adds no generic record."""
    try:
        await asyncio.to_thread(check, request.app.state.db, *args)
    except Forbidden:
        request.state.refusal_audited = True
        raise


@router.post("/documents")
async def upload(request: Request, principal: Principal = Depends(require_user)):
    state = request.app.state
    access = await asyncio.to_thread(access_for, state.db, principal)
    await _authorized(request, documents.check_upload_role, principal, access)  # a reader is refused before reading
    max_mb = state.settings.ingest.max_upload_mb
    form = await _read_form(request, max_mb * 2**20 + FORM_ROOM, max_mb)
    try:
        collection = form.get("collection")
        if not isinstance(collection, str) or not COLLECTION_NAME.match(collection):
            raise BadRequest("'collection' is required: 1-128 letters, digits or _.- starting with a letter or digit")
        acl_field = form.get("acl")
        acl = parse_acl(acl_field if isinstance(acl_field, str) else None, collection)
        uploads = [item for item in form.getlist("file") if isinstance(item, UploadFile)]
        if not uploads:
            raise BadRequest("no 'file' parts in the upload")
        await _authorized(request, documents.authorize_upload, principal, access, collection)
        await asyncio.to_thread(check_acl_subjects, state.db, acl, collection)  # only once allowed: names exist
        answers = []
        for item in uploads:
            filename = display_name(item.filename or "upload")
            suffix = allowed_suffix(filename)
            refusal = _refused(item, suffix, max_mb)
            if refusal is not None:
                reason, message = refusal
                answers.append({"filename": filename, "error": message})
                await asyncio.to_thread(
                    _record, request, principal, "upload", collection, "failed", filename=filename, reason=reason
                )
                continue
            job_id, target = state.jobs.new_upload_path(suffix)
            await asyncio.to_thread(_save, item, target)
            job = state.jobs.enqueue(job_id, target, filename, collection, acl, principal.user_id or None)
            await asyncio.to_thread(
                _record,
                request,
                principal,
                "upload",
                collection,
                "ok",
                filename=filename,
                job_id=job.id,
                acl=acl,
                state="queued",
            )
            answers.append({"filename": filename, "job_id": job.id, "state": job.state})
        return {"jobs": answers}
    finally:
        await form.close()  # the parser's temporary files


def _refused(item: UploadFile, suffix: str | None, max_mb: int) -> tuple[str, str] | None:
    """Why a file is not queued, as (reason for the audit log, answer), or None."""
    if suffix is None:
        return "unsupported", "unsupported file type"
    if (item.size or 0) > max_mb * 2**20:
        return "too large", f"file larger than {max_mb} MB (APPLIANCE_MAX_UPLOAD_MB)"
    return None


async def _read_form(request: Request, limit: int, max_mb: int) -> FormData:
    """The multipart form, refused (413) as soon as the body passes `limit` bytes: counted as it arrives, since
    a chunked body declares no length. On refusal the parser closes (and so removes) its temporary files."""
    too_large = PayloadTooLarge(f"upload larger than {max_mb} MB (APPLIANCE_MAX_UPLOAD_MB)")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large
    content_type, _ = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data":
        raise BadRequest("an upload is a multipart/form-data request")

    async def counted():
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise too_large
            yield chunk

    parser = MultiPartParser(request.headers, counted(), max_files=MAX_FILES_PER_REQUEST, max_fields=10)
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise BadRequest(exc.message) from None


def _save(item: UploadFile, target) -> None:
    item.file.seek(0)
    try:
        with target.open("wb") as out:
            shutil.copyfileobj(item.file, out, 1 << 20)
    except BaseException:
        target.unlink(missing_ok=True)
        raise


@router.get("/jobs/{job_id}")
async def job_state(job_id: str, request: Request, principal: Principal = Depends(require_user)):
    if not re.fullmatch(r"[0-9a-f]{32}", job_id):
        raise NotFound(f"job {job_id} not found")
    job = request.app.state.jobs.get(job_id)
    if job.user_id != principal.user_id:
        # Another user's job names a file and a collection: shown only to an admin who may read that collection.
        access = await asyncio.to_thread(access_for, request.app.state.db, principal)
        if not (principal.is_admin and access.may("read", job.collection)):
            raise Withheld(f"job {job_id} not found")  # answered like a missing one
    summary = job.summary()
    if job.state == "running":
        summary["stage"] = request.app.state.jobs.stage(job.id) or "parsing"  # parsing | embedding | indexing
    return summary


@router.get("/documents")
async def list_documents(request: Request, collection: str | None = None, principal: Principal = Depends(require_user)):
    db = request.app.state.db
    access = await asyncio.to_thread(access_for, db, principal)
    readable = await asyncio.to_thread(documents.readable_documents, db, access, collection)
    return {"documents": [d.summary() for d in readable]}


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
    if not access.may_delete(document):
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
