"""Documents and ingestion jobs over HTTP: upload (multipart), job state, list, delete.

This module owns reading the request: the multipart body is counted as it arrives, whatever its transfer
encoding, and refused (413) past one document's size limit plus room for the form's fields; each file is
held in the parser's temporary file until `appliance.documents.upload` stores it under `<home>/incoming/`
for the job worker. The rules and their audit records are `appliance.documents`'s.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from appliance import documents
from appliance.errors import BadRequest, PayloadTooLarge
from web.caller import Caller, caller

router = APIRouter(prefix="/api")
MAX_FILES_PER_REQUEST = 100
FORM_ROOM = 2**20  # bytes a request may carry beyond one document: its fields and the parts' headers


@router.post("/documents")
async def upload(request: Request, me: Caller = Depends(caller)):
    state = request.app.state
    await asyncio.to_thread(documents.check_upload_role, state.db, me.actor)  # a reader is refused before reading
    max_mb = state.settings.ingest.max_upload_mb
    form = await _read_form(request, max_mb * 2**20 + FORM_ROOM, max_mb)
    try:
        collection, acl = _text(form, "collection"), _text(form, "acl")
        files = [_incoming(item) for item in form.getlist("file") if isinstance(item, UploadFile)]
        answers = await asyncio.to_thread(
            documents.upload, state.db, state.jobs, me.actor, collection, acl, files, max_mb
        )
        return {"jobs": answers}
    finally:
        await form.close()  # the parser's temporary files


def _text(form: FormData, name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) else None


def _incoming(item: UploadFile) -> documents.IncomingFile:
    def save(target: Path) -> None:
        item.file.seek(0)
        try:
            with target.open("wb") as out:
                shutil.copyfileobj(item.file, out, 1 << 20)
        except BaseException:
            target.unlink(missing_ok=True)
            raise

    return documents.IncomingFile(item.filename or "", item.size or 0, save)


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


@router.get("/jobs/{job_id}")
async def job_state(job_id: str, request: Request, me: Caller = Depends(caller)):
    return await asyncio.to_thread(documents.job_state, request.app.state.jobs, me.actor, job_id)


@router.get("/documents")
async def list_documents(request: Request, collection: str | None = None, me: Caller = Depends(caller)):
    readable = await asyncio.to_thread(documents.readable_documents, request.app.state.db, me.access, collection)
    return {"documents": [d.summary() for d in readable]}


@router.delete("/documents/{document_id}")
async def delete_document(document_id: str, request: Request, me: Caller = Depends(caller)):
    state = request.app.state
    await asyncio.to_thread(documents.delete_document, state.db, state.ingestor, me.actor, document_id)
    return {"deleted": document_id}
