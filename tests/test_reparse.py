"""`appliance documents reparse`: documents indexed by an older parser get this version's passages from their
stored originals, a running server's in-memory copies follow, and nothing is lost when a parse cannot run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sqlmodel import select

from appliance import documents
from appliance.access import audit, rbac, users
from appliance.access.actors import Actor
from appliance.config import Settings
from appliance.db import Chunk, Document, IndexState, session
from appliance.services import Services
from tests.conftest import run_cli

NOTE = "# Night shift\n\nThe night shift handover happens at the nurses' station at 19:45 every evening.\n"
LEGACY = "Zephyrheader confidential page 1 of 1. The night shift handover happens at the station."


def _legacy(services: Services, document: Document) -> None:
    """What an older parser left: one passage (as many as today's) whose text differs, with its own vector."""
    [piece] = documents.document_chunks(services.db, Actor.operator(), document)
    old = [Chunk(id=piece.id, document_id=document.id, position=0, start=0, end=len(LEGACY), text=LEGACY)]
    vectors = services.embedder.encode([LEGACY]).vectors
    services.index.replace_chunks(document.id, document.kind, LEGACY, old, np.asarray(vectors))


def _texts(services: Services, document_id: str) -> list[str]:
    with session(services.db) as db:
        return [c.text for c in db.exec(select(Chunk).where(Chunk.document_id == document_id).order_by(Chunk.position))]


def _generation(services: Services) -> tuple[int, int]:
    with session(services.db) as db:
        state = db.get(IndexState, 1)
        return state.generation, state.rebuilds


@pytest.fixture
def home_with_note(tmp_path):
    note = tmp_path / "night-shift.md"
    note.write_text(NOTE)
    services = Services(Settings(home=tmp_path / "home"))
    [result] = services.ingestor.ingest_with_attachments(note, "wards", ["collection:wards"])
    assert result.status == "added"
    with session(services.db) as db:
        document = db.get(Document, result.document_id)
    yield services, document
    services.close()


def test_reparse_gives_todays_passages_and_a_warm_search_follows(home_with_note):
    services, document = home_with_note
    today = _texts(services, document.id)
    _legacy(services, document)
    retriever = services.retriever
    assert retriever.keyword_search("zephyrheader", rbac.OPERATOR, None, 5)  # the warm copy holds the old text
    assert [h.text for h in retriever.search("zephyrheader confidential", rbac.OPERATOR)][0] == LEGACY

    [result] = documents.reparse_documents(services.db, services.ingestor, Actor.operator())

    assert (result.status, result.chunks_before, result.chunks_after) == ("reparsed", 1, len(today))
    assert _texts(services, document.id) == today
    assert retriever.keyword_search("zephyrheader", rbac.OPERATOR, None, 5) == []  # same count, new text: re-read
    assert retriever.search("when is the night shift handover", rbac.OPERATOR)[0].text == today[0]
    with session(services.db) as db:
        stored = db.get(Document, document.id)
    assert (stored.collection, stored.acl, stored.filename, stored.status) == (
        "wards",
        ["collection:wards"],
        "night-shift.md",
        "indexed",
    )
    [record], _total = audit.search(services.db, action="reparse")
    assert (record["outcome"], record["details"]["reparsed"], record["details"]["documents"]) == ("ok", 1, 1)

    before = _generation(services)
    [again] = documents.reparse_documents(services.db, services.ingestor, Actor.operator(), "wards")
    assert again.status == "unchanged" and _generation(services) == before  # nothing written


def test_nothing_is_lost_without_an_original_and_others_documents_are_left_out(home_with_note):
    services, document = home_with_note
    _legacy(services, document)
    services.ingestor.original_path(document).unlink()
    [result] = documents.reparse_documents(services.db, services.ingestor, Actor.operator())
    assert result.status == "failed" and "original" in result.reason
    assert _texts(services, document.id) == [LEGACY]  # the passages it had stay searchable

    users.add_user(services.db, "rita", "reader")
    rbac.ensure_collection(services.db, "wards")
    rbac.add_grant(services.db, "wards", user="rita", role="reader")  # reads, may not edit
    reader = Actor("rita", 1, rbac.access_for_user(services.db, "rita"))
    assert documents.reparse_documents(services.db, services.ingestor, reader) == []


@pytest.mark.slow
def test_the_cli_reparses_and_reports(fresh_home, tmp_path):
    note = tmp_path / "night-shift.md"
    note.write_text(NOTE)
    run_cli(fresh_home, "ingest", str(note), "--collection", "wards")
    shown = run_cli(fresh_home, "documents", "reparse")
    assert "unchanged" in shown.stdout and "0 reparsed, 1 unchanged, 0 failed" in shown.stdout
    listed = json.loads(run_cli(fresh_home, "documents", "reparse", "--collection", "wards", "--json").stdout)
    assert (listed["unchanged"], listed["documents"][0]["filename"]) == (1, "night-shift.md")
    missing = run_cli(fresh_home, "documents", "reparse", "000000", check=False)
    assert missing.returncode == 1 and "not found" in missing.stderr
