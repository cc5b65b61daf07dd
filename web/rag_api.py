"""Grounded answers over HTTP: /api/rag/search, /api/rag/ask, and `rag/<collection>` as a chat model.

Every request computes the caller's access afresh (a revoked grant applies at once). A collection
the caller cannot read is answered exactly like one that does not exist.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from sqlmodel import select

from appliance.db import Document, session
from appliance.errors import BadRequest
from appliance.inference.engine import Token
from appliance.rag import AnswerDone, require_collections
from appliance.rbac import Access, access_for
from appliance.users import Principal
from web.auth import require_user
from web.body import get, read_json
from web.responses import json_response, ndjson_response, primed

router = APIRouter(prefix="/api/rag")
RAG_NAMESPACE = "rag/"


def caller_access(request: Request, principal: Principal) -> Access:
    return access_for(request.app.state.db, principal)


def rag_collection(model: str) -> str | None:
    """`rag/<collection>[:latest]` -> the collection's name; None for any other model name."""
    if not model.lower().startswith(RAG_NAMESPACE):
        return None
    name = model[len(RAG_NAMESPACE) :]
    if name.endswith(":latest"):
        name = name[: -len(":latest")]
    if not name or "/" in name or ":" in name:
        raise BadRequest(f"invalid RAG model name '{model}': use rag/<collection>")
    return name


def readable_collections(request: Request, access: Access) -> list[str]:
    """Collections that hold documents and that the caller may read (what /api/tags lists as rag/...)."""
    with session(request.app.state.db) as db:
        existing = set(db.exec(select(Document.collection).where(Document.status == "indexed").distinct()))
    return sorted(c for c in existing if access.everything or access.can_read_collection(c))


def _options(body: dict[str, Any]) -> dict[str, Any] | None:
    return get(body, "options", dict)


@router.post("/search")
async def search(request: Request, principal: Principal = Depends(require_user)):
    body = await read_json(request)
    query = body.get("query")
    collections = require_collections(body.get("collections"))
    top_k = get(body, "top_k", int)
    access = caller_access(request, principal)
    hits = await asyncio.to_thread(request.app.state.retriever.search, query, access, collections, top_k)
    return json_response({"results": [hit.public() for hit in hits]})


@router.post("/ask")
async def ask(request: Request, principal: Principal = Depends(require_user)):
    body = await read_json(request)
    collections = require_collections(body.get("collections"))
    history = get(body, "messages", list)
    if history is not None and not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in history
    ):
        raise BadRequest("'messages' must be a list of {role, content} objects (the conversation so far)")
    events = await primed(
        request.app.state.answerer.ask(
            body.get("question"),
            caller_access(request, principal),
            collections,
            model=get(body, "model", str),
            history=history,
            options=_options(body),
            top_k=get(body, "top_k", int),
        )
    )
    if get(body, "stream", bool, True):

        async def items() -> AsyncIterator[dict[str, Any]]:
            async for event in events:
                if isinstance(event, Token):
                    yield {"response": event.text, "done": False}
                elif isinstance(event, AnswerDone):
                    yield {"response": "", "done": True, "answer": event.answer, **event.public()}

        return ndjson_response(items())
    async for event in events:
        if isinstance(event, AnswerDone):
            return json_response({"answer": event.answer, "done": True, **event.public()})
    raise BadRequest("no answer was produced")


async def rag_chat_events(
    request: Request, principal: Principal, collection: str, messages: list[dict[str, Any]], options: dict | None
) -> AsyncIterator[Token | AnswerDone]:
    """A chat request to `rag/<collection>`: the last user message is the question, the rest history.

    The stream ends with the Sources block as text, then the AnswerDone (for the structured citations).
    """
    questions = [i for i, m in enumerate(messages) if m.get("role") == "user" and m.get("content")]
    if not questions:
        raise BadRequest("a RAG chat needs a user message with the question")
    last = questions[-1]
    history = [m for m in messages[:last] if m.get("role") in ("user", "assistant")]
    events = await primed(
        request.app.state.answerer.ask(
            messages[last]["content"],
            caller_access(request, principal),
            [collection],
            history=history,
            options=options,
        )
    )

    async def stream() -> AsyncIterator[Token | AnswerDone]:
        async for event in events:
            if isinstance(event, AnswerDone) and event.citations:
                yield Token(event.sources())
            yield event

    return stream()
