"""Hybrid retrieval on a real index (SQLite + FTS5 + Chroma + the bundled MiniLM, and PostgreSQL + a Chroma
server), with the access filter inside both searches: a passage the caller may not read never takes a place
in the results."""

import pytest
from sqlmodel import select

from appliance.access.rbac import OPERATOR, access_for_user, add_collection, add_grant, add_group, add_member, add_wall
from appliance.access.users import add_user
from appliance.db import Document, session
from appliance.errors import BadRequest, NotFound
from appliance.retrieval.retrieve import Retriever, document_frequencies, fts_query, fuse
from tests.conftest import local_ingestor

RETENTION = """# Records retention

## Adult records

Adult medical records are kept for eight years after the last treatment.

## Maternity records

Maternity records are kept for twenty-five years after the birth.
"""
ONCOLOGY = """# Chemotherapy protocol

## Dose checks

Two registered nurses check every chemotherapy dose against the prescription before it is given.
"""
CONFLICTS = """# Conflict checks

## New matters

Every new matter is checked against the conflicts database before the engagement letter is sent.
"""


pytestmark = pytest.mark.usefixtures("stores")


@pytest.fixture(scope="module")
def world(tmp_path_factory, stores):
    """Two collections, group-restricted and wall-restricted users, and a handful of documents."""
    home = tmp_path_factory.mktemp("retrieve")
    ingestor = local_ingestor(home)
    engine, index, embedder = ingestor.index.engine, ingestor.index, ingestor.embedder
    files = home / "files"
    files.mkdir()
    documents = {
        ("hospital", "retention.md", None): RETENTION,
        ("hospital", "oncology-protocol.md", "group:oncology"): ONCOLOGY,
        ("lawfirm", "conflicts.md", None): CONFLICTS,
    }
    # Many look-alike restricted documents, all matching a question better than the one readable answer.
    for n in range(12):
        documents[("hospital", f"secret-{n}.md", "user:nobody")] = (
            f"# Secret {n}\n\nAdult medical records retention secret number {n}: adult records are kept for ever.\n"
        )
    for (collection, name, acl), text in documents.items():
        path = files / name
        path.write_text(text)
        result = ingestor.ingest(path, collection, [acl] if acl else [f"collection:{collection}"])
        assert result.status == "added", result.reason
    ingestor.parser.stop()
    for name in ("alice", "bob", "carol", "dave"):
        add_user(engine, name, "reader")
    add_user(engine, "root", "admin")
    for name in ("hospital", "lawfirm"):
        add_collection(engine, name)
    add_group(engine, "oncology")
    add_group(engine, "staff")
    add_member(engine, "oncology", "alice")
    add_member(engine, "staff", "carol")
    add_member(engine, "staff", "dave")
    add_grant(engine, "hospital", group="staff")
    add_grant(engine, "hospital", user="alice")
    add_grant(engine, "lawfirm", user="bob")
    add_wall(engine, "hospital", user="dave")  # granted through staff, walled by name: the wall wins
    retriever = Retriever(index, embedder, ingestor.settings.retrieval)
    return engine, retriever


def _titles(hits):
    return [h.title for h in hits]


def test_operator_finds_the_answer_first(world):
    _, retriever = world
    hits = retriever.search("How long are maternity records kept?", OPERATOR, ["hospital"], top_k=3)
    assert hits[0].title == "retention.md"
    assert hits[0].section.endswith("Maternity records")
    assert "twenty-five years" in hits[0].text
    assert hits[0].similarity is not None and hits[0].dense_rank and hits[0].keyword_rank
    assert all(h.collection == "hospital" for h in hits)


def test_group_acl_is_applied_inside_both_searches(world):
    engine, retriever = world
    question = "Who checks chemotherapy doses?"
    alice, carol = access_for_user(engine, "alice"), access_for_user(engine, "carol")
    assert "oncology-protocol.md" in _titles(retriever.search(question, alice, ["hospital"]))
    assert "oncology-protocol.md" not in _titles(retriever.search(question, carol, ["hospital"]))
    # Each search on its own admits nothing carol may not read.
    vector = retriever.embedder.encode([question]).vectors[0]
    for chunk_id, _ in retriever.dense_search(vector, carol, ["hospital"], 100):
        assert not chunk_id.startswith(_doc_id(engine, "oncology-protocol.md"))
    assert retriever.keyword_search("chemotherapy", carol, ["hospital"], 100) == []
    assert retriever.keyword_search("chemotherapy", alice, ["hospital"], 100)


def test_filter_comes_before_top_k(world):
    """Twelve forbidden passages outrank the readable one; top-1 is still the readable one."""
    engine, retriever = world
    carol = access_for_user(engine, "carol")
    question = "adult medical records retention"
    assert _titles(retriever.search(question, OPERATOR, ["hospital"], top_k=1))[0].startswith("secret-")
    hits = retriever.search(question, carol, ["hospital"], top_k=1)
    assert _titles(hits) == ["retention.md"]


def test_walls_beat_grants(world):
    engine, retriever = world
    dave = access_for_user(engine, "dave")
    with pytest.raises(NotFound):
        retriever.search("maternity records", dave, ["hospital"])
    assert retriever.search("maternity records", dave) == []  # every readable collection: none


def test_unreadable_collection_is_answered_like_a_missing_one(world):
    engine, retriever = world
    bob = access_for_user(engine, "bob")
    with pytest.raises(NotFound) as unreadable:
        retriever.search("maternity records", bob, ["hospital"])
    with pytest.raises(NotFound) as missing:
        retriever.search("maternity records", bob, ["no-such-collection"])
    assert str(unreadable.value).replace("hospital", "X") == str(missing.value).replace("no-such-collection", "X")
    assert _titles(retriever.search("conflict check for a new matter", bob))[0] == "conflicts.md"


def test_admin_reads_nothing_without_a_grant(world):
    engine, retriever = world
    root = access_for_user(engine, "root")
    with pytest.raises(NotFound):
        retriever.search("maternity records", root, ["hospital"])
    assert retriever.search("maternity records", root) == []


@pytest.mark.parametrize("question", ["", "   ", "x" * 100_000, None])
def test_bad_questions_are_refused(world, question):
    _, retriever = world
    with pytest.raises(BadRequest):
        retriever.search(question, OPERATOR)


@pytest.mark.parametrize(
    "query", ['"unbalanced', "NEAR(a b)", "records*", "a AND OR NOT", "col:umn", "^start", "(((", "‘quoted’"]
)
def test_fts_syntax_in_questions_is_data(world, query):
    _, retriever = world
    retriever.keyword_search(query + " records", OPERATOR, None, 10)  # must not raise
    assert fts_query("!!! ???") is None


def test_fusion_rewards_agreement():
    scores = fuse([(["a", "b", "c"], 1.0), (["c", "a"], 1.0)], k=60)
    assert max(scores, key=scores.get) == "a"
    assert scores["c"] > scores["b"]
    assert fuse([(["a"], 0.0), (["b"], 1.0)], k=60)["a"] == 0


def _doc_id(engine, filename: str) -> str:
    from sqlmodel import select

    from appliance.db import Document, session

    with session(engine) as db:
        return db.exec(select(Document.id).where(Document.filename == filename)).one()


def test_chroma_and_memory_vector_searches_admit_the_same_chunks(world):
    """The in-memory exact search (default) and Chroma's filtered query agree for every caller."""
    engine, retriever = world
    in_chroma = Retriever(
        retriever.index, retriever.embedder, retriever.settings.model_copy(update={"vector_search": "chroma"})
    )
    vector = retriever.embedder.encode(["adult medical records retention"]).vectors[0]
    for name in ("alice", "bob", "carol", "dave", "root"):
        access = access_for_user(engine, name)
        scope = retriever.scope(access, None)
        memory = retriever.dense_search(vector, access, scope, 100)
        if scope == []:  # walled off everything, or no grant: Chroma refuses an empty $in, search never asks
            assert memory == [], name
            continue
        chroma = in_chroma.dense_search(vector, access, scope, 100)
        assert {c for c, _ in memory} == {c for c, _ in chroma}, name
        for (_, a), (_, b) in zip(memory, chroma, strict=True):
            assert a == pytest.approx(b, abs=1e-4)
    everything = retriever.dense_search(vector, OPERATOR, None, 100)
    assert len(everything) == len(in_chroma.dense_search(vector, OPERATOR, None, 100)) > 12


def test_near_universal_words_are_left_out_of_the_bm25_query(world):
    """'records' is in most chunks: with a rarer word beside it, it is dropped; alone, it is kept; and nothing is
    dropped while the index is small beside the number of candidates asked for."""
    _, retriever = world
    if retriever.index.engine.dialect.name != "sqlite":
        pytest.skip("FTS5's vocabulary is SQLite's")
    strict = Retriever(
        retriever.index, retriever.embedder, retriever.settings.model_copy(update={"keyword_max_df": 0.3})
    )
    with session(retriever.index.engine) as db:
        frequency = document_frequencies(db, ["records", "Records", "kept", "chemotherapy", "zzzunknown"])
        assert frequency["records"] >= 13  # stemmed like the index: 'records' and 'record' are one term
        assert 1 <= frequency["chemotherapy"] <= 2 and frequency["zzzunknown"] == 0
        assert frequency["Records"] == frequency["records"]
        assert strict._selective_words(db, ["records", "chemotherapy"], 1) == ["chemotherapy"]
        assert strict._selective_words(db, ["records", "kept"], 1) == ["records", "kept"]  # nothing rarer: all kept
        assert strict._selective_words(db, ["records", "chemotherapy"], 10) == ["records", "chemotherapy"]  # small
    hits = strict.keyword_search("records of chemotherapy", OPERATOR, None, 1)
    assert hits and hits[0].startswith(_doc_id(retriever.index.engine, "oncology-protocol.md"))


def test_permitted_documents_in_sql_agree_with_the_access_rule(world):
    """The SQL filter (json_each on SQLite, json_array_elements_text on PostgreSQL) admits exactly the documents
    that `Access.can_read` admits, row by row."""
    engine, retriever = world
    with session(engine) as db:
        rows = db.exec(select(Document.id, Document.collection, Document.acl)).all()
    for name in ("alice", "bob", "carol", "dave", "root"):
        access = access_for_user(engine, name)
        for scope in (retriever.scope(access, None), ["hospital"], ["lawfirm"]):
            expected = [
                doc_id
                for doc_id, collection, acl in rows
                if (scope is None or collection in scope) and access.can_read(collection, acl)
            ]
            assert sorted(retriever.permitted_documents(access, scope)) == sorted(expected), (name, scope)
    assert len(retriever.permitted_documents(OPERATOR, ["hospital"])) == 14
    assert retriever.permitted_documents(OPERATOR, None) is None
