"""Documents and ingestion jobs over HTTP: upload (multipart), job state, list, delete.

Uploads are streamed to server-named files under `<home>/incoming/` and ingested by the job worker.
Editors and admins may upload and delete; listing waits for collection-level permissions (the web
issue), so it is editor-only for now rather than showing every title to every reader.
"""

from __future__ import annotations

import asyncio
import re
import shutil

from fastapi import APIRouter, Depends, Request
from sqlmodel import select
from starlette.datastructures import UploadFile

from appliance.db import Document, session
from appliance.errors import BadRequest, Forbidden, NotFound, PayloadTooLarge
from appliance.rbac import COLLECTION_NAME, ensure_collection
from appliance.users import Principal
from ingest.filenames import allowed_suffix, display_name
from ingest.pipeline import parse_acl
from web.auth import require_user

router = APIRouter(prefix="/api")
_DOCUMENT_ID = re.compile(r"^[0-9a-f]{64}$")
MAX_FILES_PER_REQUEST = 100


def require_editor(principal: Principal = Depends(require_user)) -> Principal:
    if principal.role not in ("admin", "editor"):
        raise Forbidden("this operation requires the editor or admin role")
    return principal


@router.post("/documents")
async def upload(request: Request, principal: Principal = Depends(require_editor)):
    state = request.app.state
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
    ensure_collection(state.db, collection)
    answers = []
    for item in uploads:
        filename = display_name(item.filename or "upload")
        suffix = allowed_suffix(filename)
        if suffix is None:
            answers.append({"filename": filename, "error": "unsupported file type"})
            continue
        job_id, target = state.jobs.new_upload_path(suffix)
        await asyncio.to_thread(_save, item, target)
        job = state.jobs.enqueue(job_id, target, filename, collection, acl, principal.user_id or None)
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
    if not principal.is_admin and job.user_id != principal.user_id:
        raise NotFound(f"job {job_id} not found")  # other users' jobs are answered like missing ones
    return job.summary()


@router.get("/documents")
async def list_documents(request: Request, collection: str | None = None, _: Principal = Depends(require_editor)):
    with session(request.app.state.db) as db:
        query = select(Document).order_by(Document.collection, Document.filename)
        if collection:
            query = query.where(Document.collection == collection)
        documents = list(db.exec(query))
    return {"documents": [d.summary() for d in documents]}


@router.delete("/documents/{document_id}")
async def delete_document(document_id: str, request: Request, _: Principal = Depends(require_editor)):
    if not _DOCUMENT_ID.match(document_id):
        raise BadRequest("a document id is 64 lowercase hex characters")
    await asyncio.to_thread(request.app.state.ingestor.remove, document_id)
    return {"deleted": document_id}
