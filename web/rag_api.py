"""Grounded answers over HTTP: /api/rag/search, /api/rag/ask, the caller's conversations, and the helpers that
serve `rag/<collection>` as a model through the Ollama and OpenAI APIs.

Routes parse the request and call `appliance.answers.asking`, which answers as the caller and writes each question's
audit record (denied when refused); a collection the caller cannot read is answered exactly like one that does
not exist.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Request
from sqlmodel import select

from appliance import documents
from appliance.access.rbac import Access
from appliance.answers import asking, conversations
from appliance.answers.rag import AnswerDone, require_collections
from appliance.db import Collection, session
from appliance.errors import BadRequest, NotFound, Withheld
from appliance.inference.engine import Token
from appliance.models.names import parse_name
from appliance.retrieval.retrieve import check_query
from web.body import get, read_json
from web.caller import Caller, caller
from web.responses import json_response, ndjson_response

router = APIRouter(prefix="/api/rag")
RAG_NAMESPACE = "rag/"


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
    return documents.readable_collections(request.app.state.db, access)


def created_at(request: Request, collections: list[str]) -> dict[str, datetime]:
    """When each named collection was created (UTC): the date of its `rag/<collection>` model."""
    with session(request.app.state.db) as db:
        rows = db.exec(select(Collection.name, Collection.created_at).where(Collection.name.in_(collections)))  # type: ignore[attr-defined]
        dates = dict(rows.all())
    return {name: date if date.tzinfo else date.replace(tzinfo=UTC) for name, date in dates.items()}


def refuse_outside_chat(request: Request, access: Access, model: str, chat_route: str) -> None:
    """Refuse a `rag/<collection>` model on a route other than chat: a 400 that names `chat_route` when the
    caller may read the collection, else the 404 of a missing model (which collections exist is not revealed;
    a hidden one is audited as a refusal)."""
    collection = rag_collection(model)
    if collection is None:
        return
    if collection in readable_collections(request, access):
        raise BadRequest(f"rag/{collection} answers through {chat_route} only")
    refusal = Withheld if collection in documents.indexed_collections(request.app.state.db) else NotFound
    raise refusal(f"model '{parse_name(model).display}' not found")


def _history(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The request's `messages`: the conversation so far, as {role, content} objects."""
    history = get(body, "messages", list)
    if history is not None and not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in history
    ):
        raise BadRequest("'messages' must be a list of {role, content} objects (the conversation so far)")
    return history


@router.post("/search")
async def search(request: Request, me: Caller = Depends(caller)):
    body = await read_json(request)
    collections = require_collections(body.get("collections"))
    hits = await asyncio.to_thread(
        asking.search,
        request.app.state.services,
        me.actor,
        body.get("query"),
        collections,
        get(body, "top_k", int),
        route=request.url.path,
    )
    return json_response({"results": [hit.public() for hit in hits]})


@router.post("/ask")
async def ask(request: Request, me: Caller = Depends(caller)):
    """Answer a question; the question and answer are stored in the caller's conversation
    (`conversation_id` continues one, whose history then replaces `messages`; `store: false` keeps none)."""
    body = await read_json(request)
    collections = require_collections(body.get("collections"))
    question = check_query(body.get("question"))
    history = _history(body)
    asked = await asking.ask(
        request.app.state.services,
        me.actor,
        question,
        collections,
        model=get(body, "model", str),
        history=history,
        options=get(body, "options", dict),
        top_k=get(body, "top_k", int),
        conversation_id=get(body, "conversation_id", str),
        store=get(body, "store", bool, True),
        route=request.url.path,
    )

    def final(done: AnswerDone) -> dict[str, Any]:
        return {"done": True, "answer": done.answer, "conversation_id": asked.conversation_id, **done.public()}

    if get(body, "stream", bool, True):

        async def items() -> AsyncIterator[dict[str, Any]]:
            async with aclosing(asked.events):
                async for event in asked.events:
                    if isinstance(event, Token):
                        yield {"response": event.text, "done": False}
                    elif isinstance(event, AnswerDone):
                        yield {"response": "", **final(event)}

        return ndjson_response(items())
    async for event in asked.events:
        if isinstance(event, AnswerDone):
            return json_response(final(event))
    raise BadRequest("no answer was produced")


@router.get("/conversations")
async def list_conversations(request: Request, me: Caller = Depends(caller)):
    items = await asyncio.to_thread(conversations.list_for, request.app.state.db, me.actor.id)
    return json_response({"conversations": items})


@router.get("/conversations/{conversation_id}")
async def show_conversation(conversation_id: str, request: Request, me: Caller = Depends(caller)):
    shown = await asyncio.to_thread(conversations.show, request.app.state.db, me.actor.id, conversation_id, me.access)
    return json_response(shown)


@router.delete("/conversations/{conversation_id}")
async def delete_conversation(conversation_id: str, request: Request, me: Caller = Depends(caller)):
    await asyncio.to_thread(conversations.delete, request.app.state.db, me.actor.id, conversation_id)
    return json_response({"deleted": conversation_id})


async def rag_chat_events(
    request: Request, me: Caller, collection: str, messages: list[dict[str, Any]], options: dict | None
) -> AsyncIterator[Token | AnswerDone]:
    """A chat request to `rag/<collection>` (Ollama's /api/chat, OpenAI's /v1/chat/completions), answered and
    audited by `asking.chat`: the answer's Tokens, its Sources block, then the AnswerDone."""
    services = request.app.state.services
    return await asking.chat(services, me.actor, collection, messages, options, route=request.url.path)
