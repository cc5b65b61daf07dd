"""The chunk index keeps database, FTS5 and Chroma in step; check finds any difference. Runs on the embedded
stores and on PostgreSQL + a Chroma server (which keep no FTS5 table: BM25 runs in memory there)."""

import numpy as np
import pytest
from sqlalchemy import text as sql

from appliance.config import Settings
from appliance.db import FTS_TABLE, Document, DocumentText, create_db_engine, session
from appliance.errors import NotFound
from appliance.retrieval.index import ChunkIndex, open_vector_store
from ingest.chunking import chunk_document
from ingest.partition import Element
from ingest.pipeline import chunk_rows

pytestmark = pytest.mark.usefixtures("stores")


@pytest.fixture
def index(tmp_path, fresh_stores):
    settings = Settings(home=tmp_path)
    return ChunkIndex(create_db_engine(settings.resolved_database_url), open_vector_store(settings))


def _fts(index) -> bool:
    return index.engine.dialect.name == "sqlite"


def _document(doc_id: str, collection: str = "hospital", acl=("group:oncology",)):
    elements = [
        Element("Retention", "Title", 1, ["Retention"]),
        Element("Adult records are kept for ten years. " * 40, "NarrativeText", 1, ["Retention"]),
        Element("Minors", "Title", 2, ["Retention", "Minors"]),
        Element(
            "Records of minors are kept until the age of twenty-five.", "NarrativeText", 2, ["Retention", "Minors"]
        ),
    ]
    text, pieces = chunk_document(elements, max_chars=400, overlap_chars=60)
    chunks = chunk_rows(doc_id, pieces)
    vectors = np.random.default_rng(0).standard_normal((len(chunks), 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    document = Document(
        id=doc_id,
        collection=collection,
        source=f"/docs/{doc_id}.md",
        filename=f"{doc_id}.md",
        kind="md",
        size=1234,
        acl=list(acl),
    )
    return document, text, chunks, vectors


def _count(index, query: str, **params) -> int:
    with session(index.engine) as db:
        return db.exec(sql(query), params=params).one()[0]


def test_add_then_check_is_clean_and_searchable(index):
    document, text, chunks, vectors = _document("a" * 64)
    index.add(document, text, chunks, vectors)
    report = index.check()
    assert report.clean and report.documents == 1 and report.chunks == len(chunks) > 3
    if _fts(index):
        assert _count(index, f"SELECT count(*) FROM {FTS_TABLE} WHERE {FTS_TABLE} MATCH :q", q="minors") >= 1
    allowed = index.vectors.get(where={"acl": {"$contains": "group:oncology"}}, include=[])["ids"]
    assert sorted(allowed) == sorted(c.id for c in chunks)
    assert index.vectors.get(where={"acl": {"$contains": "group:cardiology"}}, include=[])["ids"] == []
    with session(index.engine) as db:
        stored = db.get(DocumentText, document.id).text
    assert all(stored[c.start : c.end] == c.text for c in chunks)


def test_remove_leaves_no_trace(index):
    first, text, chunks, vectors = _document("b" * 64)
    index.add(first, text, chunks, vectors)
    second = _document("c" * 64, collection="legal", acl=["user:alice"])
    index.add(*second)
    index.remove(first.id)
    report = index.check()
    assert report.clean and report.documents == 1
    assert _count(index, "SELECT count(*) FROM chunk WHERE document_id = :d", d=first.id) == 0
    if _fts(index):
        assert _count(index, f"SELECT count(*) FROM {FTS_TABLE} WHERE document_id = :d", d=first.id) == 0
    assert _count(index, "SELECT count(*) FROM documenttext WHERE document_id = :d", d=first.id) == 0
    assert index.vectors.get(where={"document_id": first.id}, include=[])["ids"] == []
    assert len(index.vectors.get(where={"document_id": second[0].id}, include=[])["ids"]) == len(second[2])
    with pytest.raises(NotFound):
        index.remove(first.id)


def test_check_reports_every_kind_of_mismatch(index):
    document, text, chunks, vectors = _document("d" * 64)
    index.add(document, text, chunks, vectors)
    index.vectors.delete(ids=[chunks[0].id])  # a crash between the stores, simulated
    index.vectors.upsert(ids=["ghost:0"], embeddings=vectors[:1], metadatas=[{"document_id": "ghost"}])
    with session(index.engine) as db:
        if _fts(index):
            db.exec(sql(f"DELETE FROM {FTS_TABLE} WHERE chunk_id = :c"), params={"c": chunks[1].id})
            db.exec(
                sql(
                    f"INSERT INTO {FTS_TABLE} (text, chunk_id, document_id, collection) VALUES ('x', 'stray:0', "
                    "'stray', 'hospital')"
                )
            )
        stored = db.get(Document, document.id)
        stored.status = "indexing"
        db.add(stored)
        db.commit()
    report = index.check()
    assert not report.clean
    assert report.missing_in_chroma == [chunks[0].id] and report.orphans_in_chroma == ["ghost:0"]
    if _fts(index):
        assert report.missing_in_fts == [chunks[1].id] and report.orphans_in_fts == ["stray:0"]
    assert report.unfinished == [document.id]


def test_rebuild_repairs_fts_and_chroma_from_the_database(index):
    document, text, chunks, vectors = _document("e" * 64)
    index.add(document, text, chunks, vectors)
    index.vectors.delete(ids=[c.id for c in chunks[:3]])
    index.vectors.upsert(ids=["ghost:0"], embeddings=vectors[:1], metadatas=[{"document_id": "ghost"}])
    if _fts(index):
        with session(index.engine) as db:
            db.exec(sql(f"DELETE FROM {FTS_TABLE} WHERE chunk_id = :c"), params={"c": chunks[0].id})
            db.commit()
    assert not index.check().clean
    lookup = {c.text: v for c, v in zip(chunks, vectors, strict=True)}
    assert index.rebuild(lambda texts: np.stack([lookup[t] for t in texts])) == len(chunks)
    assert index.check().clean
    hits = index.vectors.query(
        query_embeddings=vectors[:1], n_results=1, where={"acl": {"$contains": "group:oncology"}}
    )
    assert hits["ids"][0] == [chunks[0].id]


def test_vectors_only_chroma_holds_are_reported_and_copied_into_the_database(index):
    """An index written before the database kept vectors: check reports it, backfill_vectors repairs it."""
    document, text, chunks, vectors = _document("f" * 64)
    index.add(document, text, chunks, vectors)
    with session(index.engine) as db:
        db.exec(sql("DELETE FROM chunkvector WHERE chunk_id != :c"), params={"c": chunks[0].id})
        db.commit()
    report = index.check()
    assert not report.clean and report.missing_vectors == sorted(c.id for c in chunks[1:])
    assert index.backfill_vectors() == len(chunks) - 1
    assert index.check().clean and index.backfill_vectors() == 0
    with session(index.engine) as db:
        stored = dict(db.exec(sql("SELECT chunk_id, vector FROM chunkvector")).all())
    for chunk, vector in zip(chunks, vectors, strict=True):
        assert np.array_equal(np.frombuffer(stored[chunk.id], dtype=np.float32), vector)
