"""Asking and searching the documents: the one use case behind /api/rag/ask and /api/rag/search, a
`rag/<collection>` chat through the Ollama and OpenAI APIs, and `appliance ask` and `appliance search`.

It owns what a question leaves behind: its audit record (`audit.ask_details`: where, the passages retrieved and
cited, the model; the question's text only when APPLIANCE_AUDIT_QUESTION_TEXT allows it), the record of a
refused question (denied; the error is marked audited) or of an answer that broke off (failed), and the
question and its answer stored in the asker's conversation. `context` names the edge in every record (the
web's `route`, the CLI's `as_user`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from appliance.access import audit
from appliance.access.actors import Actor
from appliance.answers import conversations
from appliance.answers.rag import AnswerDone
from appliance.errors import ApplianceError, BadRequest, Forbidden, NotFound
from appliance.inference.engine import Token
from appliance.retrieval.retrieve import Hit
from appliance.services import Services


def _target(collections: list[str] | None) -> str | None:
    return ",".join(collections) if collections else None


def _details(services: Services, collections: list[str] | None, question: Any, context: dict) -> dict[str, Any]:
    """What every record of a question carries besides its outcome."""
    details = {**context, "collections": collections}
    if services.settings.audit_question_text and isinstance(question, str):
        details["question"] = question
    return details


def search(
    services: Services, actor: Actor, query: Any, collections: list[str] | None, top_k: int | None = None, **context
) -> list[Hit]:
    """The passages for `query` that `actor` may read, recorded as a `search` (a hidden or missing collection
    is a NotFound, recorded as denied)."""
    target = _target(collections)
    details = _details(services, collections, query, context)
    try:
        hits = services.retriever.search(query, actor.access, collections, top_k)
    except (NotFound, Forbidden) as exc:
        actor.refuse(services.db, "search", exc, target=target, **details)
        raise
    actor.record(services.db, "search", target=target, retrieved=[hit.chunk_id for hit in hits], **details)
    return hits


@dataclass
class Asking:
    """A question being answered: its events (Tokens, then one AnswerDone), and, once the answer is done, the
    conversation it is stored in (None when it is not stored)."""

    conversation_id: str | None
    events: AsyncIterator[Token | AnswerDone] = field(init=False)


async def ask(
    services: Services,
    actor: Actor,
    question: str,
    collections: list[str] | None = None,
    *,
    model: str | None = None,
    history: list[dict[str, str]] | None = None,
    options: dict[str, Any] | None = None,
    top_k: int | None = None,
    conversation_id: str | None = None,
    store: bool = False,
    **context,
) -> Asking:
    """Start answering `question` as `actor`. `conversation_id` continues the actor's conversation: its history,
    as they may see it now (`conversations.history`), replaces `history`; `store` keeps the question and answer
    in it (in a new conversation when none is named).

    A refusal (a collection the actor may not read, someone else's conversation) raises here, recorded as
    denied; the answer is recorded when it is done, or as failed when its stream breaks off."""
    db = services.db
    target = _target(collections)
    details = _details(services, collections, question, context)
    if conversation_id is not None:
        try:  # filtered as the conversation view is: a withheld answer reaches no model
            history = await asyncio.to_thread(conversations.history, db, actor.id, conversation_id, actor.access)
        except NotFound as exc:  # someone else's conversation is answered like a missing one
            await asyncio.to_thread(actor.refuse, db, "ask", exc, target=target, conversation=True, **details)
            raise
    events = services.answerer.ask(
        question, actor.access, collections, model=model, history=history, options=options, top_k=top_k
    )
    try:
        first = await anext(events, None)  # a refusal raises on the first step
    except (NotFound, Forbidden) as exc:
        await asyncio.to_thread(actor.refuse, db, "ask", exc, target=target, **details)
        raise
    asking = Asking(conversation_id)

    async def answered() -> AsyncIterator[Token | AnswerDone]:
        done = None
        try:
            async for event in _starting_with(first, events):
                if isinstance(event, AnswerDone):
                    done = event  # the last event: recorded (and stored) before it is passed on
                else:
                    yield event
        except ApplianceError as exc:
            failed = {**details, "reason": exc.message}
            await asyncio.to_thread(actor.record, db, "ask", target=target, outcome="failed", **failed)
            raise
        finally:
            await events.aclose()
        if done is None:
            return
        keep_question = services.settings.audit_question_text
        kept = audit.ask_details(done, collections, question=question, keep_question=keep_question)
        await asyncio.to_thread(actor.record, db, "ask", target=target, **{**context, **kept})
        if store:
            stored = await asyncio.to_thread(
                _store, services, actor, asking.conversation_id, question, collections, done
            )
            asking.conversation_id = stored
        yield done

    asking.events = answered()
    return asking


async def _starting_with(
    first: Token | AnswerDone | None, events: AsyncIterator[Token | AnswerDone]
) -> AsyncIterator[Token | AnswerDone]:
    """The answerer's events, the first of them already read (None: there were none)."""
    if first is None:
        return
    yield first
    async for event in events:
        yield event


def _store(
    services: Services, actor: Actor, conversation_id: str | None, question: str, collections, done: AnswerDone
) -> str:
    """Keep the question and its answer in the actor's conversation (a new one when none is named); its id."""
    assert actor.id is not None, "only a user or the operator keeps conversations"
    if conversation_id is None:
        conversation_id = conversations.start(services.db, actor.id, question, collections).id
    citations = [c.public() for c in done.citations]
    conversations.record(services.db, actor.id, conversation_id, question, done.answer, citations, done.grounded)
    return conversation_id


async def chat(
    services: Services,
    actor: Actor,
    collection: str,
    messages: list[dict[str, Any]],
    options: dict[str, Any] | None = None,
    **context,
) -> AsyncIterator[Token | AnswerDone]:
    """A chat with `rag/<collection>`: the last user message is the question, the user and assistant messages
    before it the history. The stream ends with the Sources block as text, then the AnswerDone (for the
    structured citations). Nothing is stored: the client keeps the conversation."""
    questions = [i for i, m in enumerate(messages) if m.get("role") == "user" and m.get("content")]
    if not questions:
        raise BadRequest("a RAG chat needs a user message with the question")
    last = questions[-1]
    history = [m for m in messages[:last] if m.get("role") in ("user", "assistant")]
    asking = await ask(
        services, actor, messages[last]["content"], [collection], history=history, options=options, **context
    )

    async def stream() -> AsyncIterator[Token | AnswerDone]:
        async with aclosing(asking.events):
            async for event in asking.events:
                if isinstance(event, AnswerDone) and event.citations:
                    yield Token(event.sources())
                yield event

    return stream()
