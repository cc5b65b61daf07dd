"""appliance.answers.asking, with a stand-in answerer and retriever over a real database: one audit record per question
(denied when refused, marked so the web adds no generic one; failed when the answer breaks off), and the
question and answer kept in the asker's conversation."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from appliance.access import audit
from appliance.access.actors import Actor
from appliance.access.rbac import OPERATOR
from appliance.answers import asking, conversations
from appliance.answers.rag import AnswerDone
from appliance.db import create_db_engine
from appliance.errors import ApplianceError, NotFound, RunnerFailed
from appliance.inference.engine import Token


class Answerer:
    async def ask(self, question, access, collections=None, **kwargs):
        if collections == ["hidden"]:
            raise NotFound("collection 'hidden' not found")
        yield Token("Kept ")
        if collections == ["broken"]:
            raise RunnerFailed("the model runner stopped")
        yield Token("for ever.")
        yield AnswerDone("Kept for ever.", [], [], False, "extractive", None, ["c1", "c2"], question)


class Retriever:
    def search(self, query, access, collections=None, top_k=None):
        if collections == ["hidden"]:
            raise NotFound("collection 'hidden' not found")
        return []


@pytest.fixture
def services(tmp_path):
    engine = create_db_engine(f"sqlite:///{tmp_path / 'appliance.db'}")
    settings = SimpleNamespace(audit_question_text=False)
    return SimpleNamespace(db=engine, settings=settings, answerer=Answerer(), retriever=Retriever())


ALICE = Actor("alice", 7, OPERATOR, "10.0.0.9")


async def _answer(services, collections, **kwargs):
    asked = await asking.ask(services, ALICE, "How long?", collections, route="/api/rag/ask", **kwargs)
    return [event async for event in asked.events], asked.conversation_id


def test_an_answer_is_recorded_once_done_and_stored_in_a_conversation(services):
    events, conversation_id = asyncio.run(_answer(services, ["wards"], store=True))
    assert [type(e) for e in events] == [Token, Token, AnswerDone]
    [record] = list(audit.export(services.db))
    assert (record["actor"], record["actor_id"], record["action"], record["target"]) == ("alice", 7, "ask", "wards")
    assert record["details"] == {
        "address": "10.0.0.9",
        "route": "/api/rag/ask",
        "collections": ["wards"],
        "retrieved": ["c1", "c2"],
        "cited": [],
        "model": None,
        "mode": "extractive",
        "grounded": False,
    }
    messages = conversations.show(services.db, 7, conversation_id, OPERATOR)["messages"]
    assert [(m["role"], m["content"]) for m in messages] == [("user", "How long?"), ("assistant", "Kept for ever.")]
    _, again = asyncio.run(_answer(services, ["wards"], store=True, conversation_id=conversation_id))
    assert again == conversation_id


def test_the_question_text_is_kept_only_when_the_setting_allows(services):
    services.settings.audit_question_text = True
    asyncio.run(_answer(services, None))
    [record] = list(audit.export(services.db))
    assert record["details"]["question"] == "How long?" and record["target"] is None


def test_a_refusal_is_recorded_as_denied_and_marked_audited(services):
    with pytest.raises(NotFound) as refused:
        asyncio.run(_answer(services, ["hidden"]))
    assert refused.value.audited
    with pytest.raises(NotFound) as other:
        asyncio.run(_answer(services, ["wards"], conversation_id="0" * 32))
    assert other.value.audited
    with pytest.raises(NotFound):
        asking.search(services, ALICE, "How long?", ["hidden"], route="/api/rag/search")
    records = list(audit.export(services.db))
    assert [(r["action"], r["outcome"], r["details"]["reason"]) for r in records] == [
        ("ask", "denied", "collection 'hidden' not found"),
        ("ask", "denied", f"conversation '{'0' * 32}' not found"),
        ("search", "denied", "collection 'hidden' not found"),
    ]
    assert records[1]["details"]["conversation"] is True


def test_an_answer_that_breaks_off_is_recorded_as_failed(services):
    with pytest.raises(ApplianceError):
        asyncio.run(_answer(services, ["broken"], store=True))
    [record] = list(audit.export(services.db))
    assert (record["outcome"], record["details"]["reason"]) == ("failed", "the model runner stopped")
    assert conversations.list_for(services.db, 7) == []


def test_a_rag_chat_asks_the_last_user_message_and_ends_with_its_sources(services):
    messages = [{"role": "user", "content": "Earlier?"}, {"role": "assistant", "content": "Yes."}]
    messages.append({"role": "user", "content": "How long?"})

    async def chat():
        events = await asking.chat(services, ALICE, "wards", messages, None, route="/api/chat")
        return [event async for event in events]

    events = asyncio.run(chat())
    assert isinstance(events[-1], AnswerDone) and events[-1].question == "How long?"
    [record] = list(audit.export(services.db))
    assert record["details"]["route"] == "/api/chat" and record["details"]["collections"] == ["wards"]
