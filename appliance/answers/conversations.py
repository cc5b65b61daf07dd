"""Conversations with the documents, stored per user: create, continue, list, show, delete.

Only the owner ever sees a conversation; anyone else gets the same 404 as for one that does not
exist. The stored history feeds question rewriting and the answer's chat, so follow-ups are understood;
it is filtered first by the same rule as the conversation view (`visible`), so an answer its owner may no
longer read reaches no model.
"""

from __future__ import annotations

import re
import secrets

from sqlalchemy.engine import Engine
from sqlmodel import select

from appliance.access.rbac import Access
from appliance.db import Conversation, ConversationMessage, Document, session, utcnow
from appliance.errors import NotFound, Withheld

_ID = re.compile(r"^[0-9a-f]{32}$")
HISTORY_MESSAGES = 12  # the most recent messages a follow-up is read against


def _owned(db, user_id: int, conversation_id: str) -> Conversation:
    conversation = db.get(Conversation, conversation_id) if _ID.match(conversation_id or "") else None
    if conversation is None:
        raise NotFound(f"conversation '{conversation_id}' not found")
    if conversation.user_id != user_id:
        raise Withheld(f"conversation '{conversation_id}' not found")  # another's: answered like a missing one
    return conversation


def start(engine: Engine, user_id: int, question: str, collections: list[str] | None) -> Conversation:
    title = " ".join(question.split())
    conversation = Conversation(
        id=secrets.token_hex(16),
        user_id=user_id,
        title=title if len(title) <= 120 else title[:117] + "...",
        collections=list(collections or []),
    )
    with session(engine) as db:
        db.add(conversation)
        db.commit()
    return conversation


def get(engine: Engine, user_id: int, conversation_id: str) -> Conversation:
    with session(engine) as db:
        return _owned(db, user_id, conversation_id)


def history(engine: Engine, user_id: int, conversation_id: str, access: Access) -> list[dict[str, str]]:
    """The conversation's recent messages as {role, content}, oldest first, as `visible` lets its owner see
    them now: this is what a follow-up is read against, so a withheld answer never reaches a model."""
    with session(engine) as db:
        _owned(db, user_id, conversation_id)
        rows = db.exec(
            select(ConversationMessage)
            .where(ConversationMessage.conversation_id == conversation_id)
            .order_by(ConversationMessage.id.desc())  # type: ignore[union-attr]
            .limit(HISTORY_MESSAGES)
        ).all()
        shown = visible(db, list(reversed(rows)), access)
    return [{"role": m["role"], "content": m["content"]} for m in shown]


def record(
    engine: Engine,
    user_id: int,
    conversation_id: str,
    question: str,
    answer: str,
    citations: list[dict],
    grounded: bool,
) -> None:
    """Append one question and its answer."""
    with session(engine) as db:
        conversation = _owned(db, user_id, conversation_id)
        db.add(ConversationMessage(conversation_id=conversation_id, role="user", content=question))
        db.add(
            ConversationMessage(
                conversation_id=conversation_id,
                role="assistant",
                content=answer,
                citations=citations,
                grounded=grounded,
            )
        )
        conversation.updated_at = utcnow()
        db.add(conversation)
        db.commit()


def list_for(engine: Engine, user_id: int) -> list[dict]:
    with session(engine) as db:
        rows = db.exec(
            select(Conversation).where(Conversation.user_id == user_id).order_by(Conversation.updated_at.desc())  # type: ignore[attr-defined]
        ).all()
    return [summary(c) for c in rows]


def summary(conversation: Conversation) -> dict:
    return {
        "id": conversation.id,
        "title": conversation.title,
        "collections": conversation.collections,
        "created_at": conversation.created_at.isoformat(),
        "updated_at": conversation.updated_at.isoformat(),
    }


WITHHELD = "(withheld: this answer cites documents you can no longer access)"


def visible(db, messages: list[ConversationMessage], access: Access) -> list[dict]:
    """The messages as `access` may see them now: an answer citing a document it can no longer read (or one
    since deleted) is replaced by WITHHELD, without its citations. The one rule for the conversation view and
    for the history a follow-up is read against (a revoked grant applies to stored conversations too)."""
    cited = {c.get("document_id") for m in messages for c in m.citations}
    documents = db.exec(select(Document).where(Document.id.in_(cited))).all()  # type: ignore[attr-defined]
    readable = {d.id for d in documents if access.can_read(d.collection, d.acl)}
    shown = []
    for m in messages:
        if any(c.get("document_id") not in readable for c in m.citations):
            shown.append({"role": m.role, "content": WITHHELD, "citations": [], "grounded": m.grounded})
        else:
            shown.append({"role": m.role, "content": m.content, "citations": m.citations, "grounded": m.grounded})
    return shown


def show(engine: Engine, user_id: int, conversation_id: str, access: Access) -> dict:
    """The conversation as its owner may see it now (`visible`)."""
    with session(engine) as db:
        conversation = _owned(db, user_id, conversation_id)
        messages = db.exec(
            select(ConversationMessage)
            .where(ConversationMessage.conversation_id == conversation_id)
            .order_by(ConversationMessage.id)  # type: ignore[arg-type]
        ).all()
        shown = visible(db, list(messages), access)
    return {**summary(conversation), "messages": shown}


def delete(engine: Engine, user_id: int, conversation_id: str) -> None:
    with session(engine) as db:
        conversation = _owned(db, user_id, conversation_id)
        for message in db.exec(
            select(ConversationMessage).where(ConversationMessage.conversation_id == conversation_id)
        ):
            db.delete(message)
        db.flush()
        db.delete(conversation)
        db.commit()
