"""The everyday pages: ask (chat with citations), documents (list, filter, open, delete), the document
view with the cited passage highlighted, and upload.

Each route authorizes through the caller's rbac Access, and reads through `appliance.documents`:
collections offered on the ask page are the readable ones, the document list shows only documents
`can_read` allows, delete and upload are offered only where `access.may("edit", collection)`. The
pages' scripts call the JSON APIs with the session cookie and the session's CSRF token in a header.
Document text is only ever rendered escaped.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from appliance import documents as documents_service
from appliance.db import Chunk, Document, DocumentText, session
from appliance.errors import NotFound, Withheld
from appliance.rbac import list_groups
from web.caller import caller
from web.rendering import render, serve_asset

router = APIRouter()
MAX_PASSAGE = 20_000


@router.get("/static/{name}")
async def static_file(name: str):
    return serve_asset(name)


async def ask_page(request: Request):
    me = caller(request)
    access = me.access
    collections = await asyncio.to_thread(documents_service.readable_collections, request.app.state.db, access)
    return render(
        request,
        "ask.html",
        title="Ask",
        collections=collections,
        scripts=["common.js", "ask.js"],
        **me.nav(),
    )


@router.get("/documents")
async def documents_page(request: Request, collection: str = "", name: str = ""):
    me = caller(request)
    access = me.access
    db = request.app.state.db
    documents = await asyncio.to_thread(documents_service.readable_documents, db, access, collection[:128], name[:200])
    readable = await asyncio.to_thread(documents_service.readable_document_collections, db, access)
    rows = [{"doc": d, "can_delete": access.may("edit", d.collection)} for d in documents]
    return render(
        request,
        "documents.html",
        title="Documents",
        rows=rows,
        collections=readable,
        collection=collection,
        name=name,
        scripts=["common.js", "documents.js"],
        **me.nav(),
    )


def _document_view(request: Request, access, document_id: str, chunk_id: str, start: int | None, end: int | None):
    with session(request.app.state.db) as db:
        document = db.get(Document, document_id) if len(document_id) == 64 else None
        if document is None:
            raise NotFound("No such document, or you may not read it.")
        if not access.can_read(document.collection, document.acl):
            raise Withheld("No such document, or you may not read it.")  # the same answer for both
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
    parts = {"before": text, "passage": "", "after": ""}
    if span:
        parts = {"before": text[: span[0]], "passage": text[span[0] : span[1]], "after": text[span[1] :]}
    page = chunk.page if chunk is not None else None
    section = " › ".join(chunk.headings) if chunk is not None else ""
    return document, parts, page, section


@router.get("/documents/{document_id}")
async def document_page(
    request: Request, document_id: str, chunk: str = "", start: int | None = None, end: int | None = None
):
    me = caller(request)
    access = me.access
    document, parts, page, section = await asyncio.to_thread(
        _document_view, request, access, document_id, chunk[:100], start, end
    )
    return render(
        request,
        "document.html",
        title=document.filename,
        doc=document,
        parts=parts,
        page=page,
        section=section,
        can_delete=access.may("edit", document.collection),
        can_set_access=access.may("manage_policy"),
        done=request.query_params.get("done", "")[:300],
        scripts=["common.js", "documents.js"],
        **me.nav(),
    )


@router.get("/upload")
async def upload_page(request: Request):
    me = caller(request)
    access = me.access
    state = request.app.state
    editable = await asyncio.to_thread(documents_service.editable_collections, state.db, access)
    # As uploads do (documents.authorize_upload): an admin may name a new collection and becomes its editor.
    can_create = access.may_create_collection()
    groups = [g["name"] for g in await asyncio.to_thread(list_groups, state.db)]
    return render(
        request,
        "upload.html",
        title="Upload",
        collections=editable,
        can_create=can_create,
        groups=groups,
        max_mb=state.settings.ingest.max_upload_mb,
        scripts=["common.js", "upload.js"],
        **me.nav(),
    )
