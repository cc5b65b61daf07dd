"""Grounded answers over HTTP: /api/rag/search, /api/rag/ask, and `rag/<collection>` as a chat model.

Every request computes the caller's access afresh (a revoked grant applies at once). A collection
the caller cannot read is answered exactly like one that does not exist. Every question (search, ask,
a `rag/<collection>` chat through the Ollama or OpenAI API) leaves an audit record: who, where, the
chunks retrieved and cited, the model; a refused one is recorded as denied.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Request
from sqlmodel import select

from appliance import audit, conversations, documents
from appliance.db import Collection, session
from appliance.errors import ApplianceError, BadRequest, Forbidden, NotFound, Withheld
from appliance.inference.engine import Token
from appliance.models.names import parse_name
from appliance.rag import AnswerDone, require_collections
from appliance.rbac import Access, access_for
from appliance.retrieve import check_query
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
    return documents.readable_collections(request.app.state.db, access)


def created_at(request: Request, collections: list[str]) -> dict[str, datetime]:
    """When each named collection was created (UTC): the date of its `rag/<collection>` model."""
    with session(request.app.state.db) as db:
        rows = db.exec(select(Collection.name, Collection.created_at).where(Collection.name.in_(collections)))  # type: ignore[attr-defined]
        dates = dict(rows.all())
    return {name: date if date.tzinfo else date.replace(tzinfo=UTC) for name, date in dates.items()}


def refuse_outside_chat(request: Request, principal: Principal, model: str, chat_route: str) -> None:
    """Refuse a `rag/<collection>` model on a route other than chat: a 400 that names `chat_route` when the
    caller may read the collection, else the 404 of a missing model (which collections exist is not revealed;
    a hidden one is audited as a refusal)."""
    collection = rag_collection(model)
    if collection is None:
        return
    if collection in readable_collections(request, caller_access(request, principal)):
        raise BadRequest(f"rag/{collection} answers through {chat_route} only")
    refusal = Withheld if collection in documents.indexed_collections(request.app.state.db) else NotFound
    raise refusal(f"model '{parse_name(model).display}' not found")


def _options(body: dict[str, Any]) -> dict[str, Any] | None:
    return get(body, "options", dict)


async def record_question(
    request: Request,
    principal: Principal,
    action: str,
    collections: list[str] | None,
    question: str | None,
    outcome: str = "ok",
    **details: Any,
) -> None:
    """The audit record of one question (the text only when APPLIANCE_AUDIT_QUESTION_TEXT allows it)."""
    state = request.app.state
    actor, actor_id = audit.actor_of(principal)
    details = {"route": request.url.path, "collections": collections, **details}
    if state.settings.audit_question_text and question is not None:
        details["question"] = question
    target = ",".join(collections) if collections else None
    await asyncio.to_thread(
        audit.record, state.db, actor, action, actor_id=actor_id, target=target, outcome=outcome, details=details
    )


async def audited_answer(
    request: Request,
    principal: Principal,
    question: str,
    collections: list[str] | None,
    events: AsyncIterator[Token | AnswerDone],
    **extra: Any,
) -> AsyncIterator[Token | AnswerDone]:
    """The answer's events, primed (a refused collection raises here, recorded as denied); the answer is
    recorded once it is done (or failed, if the stream breaks first)."""
    try:
        events = await primed(events)
    except (NotFound, Forbidden) as exc:
        await record_question(request, principal, "ask", collections, question, "denied", reason=exc.message, **extra)
        raise

    async def stream() -> AsyncIterator[Token | AnswerDone]:
        try:
            async for event in events:
                if isinstance(event, AnswerDone):
                    details = audit.ask_details(event, collections, **extra)
                    del details["collections"]
                    await record_question(request, principal, "ask", collections, question, **details)
                yield event
        except ApplianceError as exc:
            await record_question(
                request, principal, "ask", collections, question, "failed", reason=exc.message, **extra
            )
            raise

    return stream()


@router.post("/search")
async def search(request: Request, principal: Principal = Depends(require_user)):
    body = await read_json(request)
    query = body.get("query")
    collections = require_collections(body.get("collections"))
    top_k = get(body, "top_k", int)
    access = caller_access(request, principal)
    question = query if isinstance(query, str) else None
    try:
        hits = await asyncio.to_thread(request.app.state.retriever.search, query, access, collections, top_k)
    except (NotFound, Forbidden) as exc:
        await record_question(request, principal, "search", collections, question, "denied", reason=exc.message)
        raise
    retrieved = [hit.chunk_id for hit in hits]
    await record_question(request, principal, "search", collections, question, retrieved=retrieved)
    return json_response({"results": [hit.public() for hit in hits]})


@router.post("/ask")
async def ask(request: Request, principal: Principal = Depends(require_user)):
    """Answer a question; the question and answer are stored in the caller's conversation
    (`conversation_id` continues one, whose history then replaces `messages`; `store: false` keeps none)."""
    body = await read_json(request)
    state = request.app.state
    collections = require_collections(body.get("collections"))
    question = check_query(body.get("question"))
    history = get(body, "messages", list)
    if history is not None and not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in history
    ):
        raise BadRequest("'messages' must be a list of {role, content} objects (the conversation so far)")
    access = caller_access(request, principal)
    conversation_id = get(body, "conversation_id", str)
    if conversation_id is not None:
        try:  # filtered as the conversation view is: a withheld answer reaches no model
            history = await asyncio.to_thread(
                conversations.history, state.db, principal.user_id, conversation_id, access
            )
        except NotFound as exc:  # someone else's conversation is answered like a missing one
            await record_question(
                request, principal, "ask", collections, question, "denied", reason=exc.message, conversation=True
            )
            raise
    events = await audited_answer(
        request,
        principal,
        question,
        collections,
        state.answerer.ask(
            question,
            access,
            collections,
            model=get(body, "model", str),
            history=history,
            options=_options(body),
            top_k=get(body, "top_k", int),
        ),
    )
    store = get(body, "store", bool, True)

    async def finish(done: AnswerDone) -> dict[str, Any]:
        nonlocal conversation_id
        if store:
            if conversation_id is None:
                started = await asyncio.to_thread(
                    conversations.start, state.db, principal.user_id, question, collections
                )
                conversation_id = started.id
            citations = [c.public() for c in done.citations]
            await asyncio.to_thread(
                conversations.record,
                state.db,
                principal.user_id,
                conversation_id,
                question,
                done.answer,
                citations,
                done.grounded,
            )
        return {"done": True, "answer": done.answer, "conversation_id": conversation_id, **done.public()}

    if get(body, "stream", bool, True):

        async def items() -> AsyncIterator[dict[str, Any]]:
            async for event in events:
                if isinstance(event, Token):
                    yield {"response": event.text, "done": False}
                elif isinstance(event, AnswerDone):
                    yield {"response": "", **(await finish(event))}

        return ndjson_response(items())
    async for event in events:
        if isinstance(event, AnswerDone):
            return json_response(await finish(event))
    raise BadRequest("no answer was produced")


@router.get("/conversations")
async def list_conversations(request: Request, principal: Principal = Depends(require_user)):
    items = await asyncio.to_thread(conversations.list_for, request.app.state.db, principal.user_id)
    return json_response({"conversations": items})


@router.get("/conversations/{conversation_id}")
async def show_conversation(conversation_id: str, request: Request, principal: Principal = Depends(require_user)):
    access = caller_access(request, principal)
    shown = await asyncio.to_thread(
        conversations.show, request.app.state.db, principal.user_id, conversation_id, access
    )
    return json_response(shown)


@router.delete("/conversations/{conversation_id}")
async def delete_conversation(conversation_id: str, request: Request, principal: Principal = Depends(require_user)):
    await asyncio.to_thread(conversations.delete, request.app.state.db, principal.user_id, conversation_id)
    return json_response({"deleted": conversation_id})


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
    question = messages[last]["content"]
    events = await audited_answer(
        request,
        principal,
        question,
        [collection],
        request.app.state.answerer.ask(
            question, caller_access(request, principal), [collection], history=history, options=options
        ),
    )

    async def stream() -> AsyncIterator[Token | AnswerDone]:
        async for event in events:
            if isinstance(event, AnswerDone) and event.citations:
                yield Token(event.sources())
            yield event

    return stream()
