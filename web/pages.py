"""The everyday pages: ask, the documents list, one document with a cited passage highlighted, upload, and
the document page's access form (`/admin/document-acl`).

Each route takes its caller from `web.caller`, makes one call into `appliance.documents` (which holds the
rules and writes the audit records) and renders. The pages' scripts call the JSON APIs with the session
cookie and the session's CSRF token in a header. Document text is only ever rendered escaped.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse

from appliance import documents
from appliance.errors import BadRequest
from web.caller import Caller, caller
from web.rendering import render, serve_asset

router = APIRouter()


@router.get("/static/{name}")
async def static_file(name: str):
    return serve_asset(name)


async def ask_page(request: Request):
    """The ask page (web.app serves it at / to browsers)."""
    me = await asyncio.to_thread(caller, request)
    collections = await asyncio.to_thread(documents.readable_collections, request.app.state.db, me.access)
    return render(
        request,
        "ask.html",
        title="Ask",
        collections=collections,
        scripts=["common.js", "ask.js"],
        **me.nav(),
    )


@router.get("/documents")
async def documents_page(request: Request, collection: str = "", name: str = "", me: Caller = Depends(caller)):
    listing = await asyncio.to_thread(
        documents.list_documents, request.app.state.db, me.actor, collection[:128], name[:200]
    )
    rows = [{"doc": d, "can_delete": me.access.may_delete(d)} for d in listing.documents]
    return render(
        request,
        "documents.html",
        title="Documents",
        rows=rows,
        collections=listing.collections,
        collection=collection,
        name=name,
        scripts=["common.js", "documents.js"],
        **me.nav(),
    )


@router.get("/documents/{document_id}")
async def document_page(
    request: Request,
    document_id: str,
    chunk: str = "",
    start: int | None = None,
    end: int | None = None,
    done: str = "",
    me: Caller = Depends(caller),
):
    view = await asyncio.to_thread(
        documents.view_document, request.app.state.db, me.actor, document_id, chunk[:100], start, end
    )
    text, span = view.text, view.span
    parts = {"before": text, "passage": "", "after": ""}
    if span:
        parts = {"before": text[: span[0]], "passage": text[span[0] : span[1]], "after": text[span[1] :]}
    return render(
        request,
        "document.html",
        title=view.document.filename,
        doc=view.document,
        parts=parts,
        page=view.page,
        section=" › ".join(view.headings),
        can_delete=me.access.may_delete(view.document),
        can_set_access=me.may("manage_policy"),
        done=done[:300],
        scripts=["common.js", "documents.js"],
        **me.nav(),
    )


@router.post("/admin/document-acl")
async def document_acl(request: Request, me: Caller = Depends(caller)):
    """The document page's access form; back to that page with a notice."""
    form = await request.form(max_files=0, max_fields=10)
    me.check_csrf(form.get("csrf"))
    document_id, acl_text = _field(form, "document"), _field(form, "acl")
    if not document_id:
        raise BadRequest("'document' is required.")
    state = request.app.state
    document, acl = await asyncio.to_thread(
        documents.set_document_acl, state.db, state.ingestor.index, me.actor, document_id, acl_text
    )
    notice = f"{document.filename} is now readable by {', '.join(acl)}."
    return RedirectResponse(f"/documents/{document.id}?{urlencode({'done': notice})}", status_code=303)


def _field(form, name: str) -> str:
    value = form.get(name)
    return value.strip()[:1024] if isinstance(value, str) else ""


@router.get("/upload")
async def upload_page(request: Request, me: Caller = Depends(caller)):
    state = request.app.state
    choices = await asyncio.to_thread(documents.upload_choices, state.db, me.actor)
    return render(
        request,
        "upload.html",
        title="Upload",
        collections=choices.collections,
        can_create=choices.can_create,
        groups=choices.groups,
        max_mb=state.settings.ingest.max_upload_mb,
        scripts=["common.js", "upload.js"],
        **me.nav(),
    )
