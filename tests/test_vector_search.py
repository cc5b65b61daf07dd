"""The in-memory copy of the vectors follows writes made by another process (the CLI beside a server), on the
embedded stores and on PostgreSQL + a Chroma server."""

import itertools

import numpy as np
import pytest
from sqlmodel import col, select

from appliance.access.rbac import OPERATOR
from appliance.db import Chunk, session
from appliance.retrieval.retrieve import Retriever
from tests.conftest import local_ingestor, run_cli

pytestmark = pytest.mark.usefixtures("fresh_stores")

FIRST = "# Parking\n\nStaff park in the multi-storey car park behind the laboratory building.\n"
SECOND = "# Flu vaccine\n\nEvery member of staff is offered the seasonal flu vaccine in October.\n"


@pytest.mark.slow
def test_copy_follows_ingest_remove_and_rebuild_from_another_process(tmp_path):
    home = tmp_path / "home"
    ingestor = local_ingestor(home)  # this process plays the server: it keeps the copy
    retriever = Retriever(ingestor.index, ingestor.embedder, ingestor.settings.retrieval)
    files = tmp_path / "files"
    files.mkdir()
    (files / "parking.md").write_text(FIRST)
    (files / "flu.md").write_text(SECOND)

    def found(question: str) -> set[str]:
        vector = retriever.embedder.encode([question]).vectors[0]
        return {chunk_id.split(":")[0] for chunk_id, _ in retriever.dense_search(vector, OPERATOR, None, 10)}

    assert found("where do staff park") == set()
    run_cli(home, "ingest", str(files / "parking.md"), "--collection", "estates")
    parking = found("where do staff park")
    assert len(parking) == 1
    run_cli(home, "ingest", str(files / "flu.md"), "--collection", "estates")
    both = found("flu vaccine")
    assert parking < both and len(both) == 2
    generation = retriever.mirror.current().generation

    run_cli(home, "documents", "rm", next(iter(parking)))
    assert found("where do staff park") == both - parking
    run_cli(home, "index", "rebuild")
    snapshot = retriever.mirror.current()
    assert snapshot.generation[1] == generation[1] + 1  # a rebuild reads everything again
    assert found("flu vaccine") == both - parking
    run_cli(home, "ingest", str(files / "parking.md"), "--collection", "estates")  # the same bytes come back
    assert found("where do staff park") == both

    # Each row of the copy is the embedding of its chunk's text.
    snapshot = retriever.mirror.current()
    with session(ingestor.index.engine) as db:
        texts = {c.id: c.text for c in db.exec(select(Chunk).where(col(Chunk.id).in_(snapshot.live_ids())))}
    expected = retriever.embedder.encode([texts[chunk_id] for chunk_id in snapshot.live_ids()]).vectors
    expected = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    assert np.allclose(snapshot.all_vectors()[snapshot.alive], expected, atol=1e-4)
    ingestor.parser.stop()


def _version(doc_id: str, count: int, seed: int):
    from appliance.db import Document

    document = Document(id=doc_id, collection="c", source="s", filename="f.md", kind="md", size=1, acl=["user:a"])
    chunks = [
        Chunk(id=f"{doc_id}:{n}", document_id=doc_id, position=n, start=0, end=1, headings=[], text=f"t{n}")
        for n in range(count)
    ]
    vectors = np.random.default_rng(seed).standard_normal((count, 8)).astype(np.float32)
    return document, "text", chunks, vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_a_document_indexed_again_between_two_queries_is_read_again(tmp_path):
    """Same id (the same bytes), other chunks (say, new chunking settings): the copy must not keep the old rows."""
    from appliance.config import Settings
    from appliance.db import create_db_engine
    from appliance.retrieval.index import ChunkIndex, open_vector_store
    from appliance.retrieval.vector_search import VectorMirror

    settings = Settings(home=tmp_path)
    index = ChunkIndex(create_db_engine(settings.resolved_database_url), open_vector_store(settings))
    mirror = VectorMirror(index)
    index.add(*_version("d" * 64, 3, seed=1))
    assert len(mirror.current().ids) == 3
    index.remove("d" * 64)
    document, text, chunks, vectors = _version("d" * 64, 2, seed=2)
    index.add(document, text, chunks, vectors)
    snapshot = mirror.current()
    assert snapshot.live_ids() == [c.id for c in chunks]
    assert np.allclose(snapshot.all_vectors()[snapshot.alive], vectors, atol=1e-6)
    assert mirror.search(vectors[1], ["d" * 64], 5)[0][0] == chunks[1].id
    assert mirror.search(vectors[1], [], 5) == []  # nothing permitted: nothing found


@pytest.mark.parametrize(
    "shares",
    [(0.0, 0.0), (100.0, 100.0), (0.3, 0.2)],
    ids=["folded-every-time", "never-folded", "folded-now-and-then"],
)
def test_patched_copy_equals_a_fresh_read(tmp_path, monkeypatch, shares):
    """Documents added, removed and indexed again one at a time, the copy patched after each write: it finds
    what a copy read afresh finds, with the same similarities, whether writes are folded in or kept apart."""
    from appliance.config import Settings
    from appliance.db import create_db_engine
    from appliance.retrieval import vector_search
    from appliance.retrieval.index import ChunkIndex, open_vector_store
    from appliance.retrieval.vector_search import VectorMirror

    monkeypatch.setattr(vector_search, "READ_DOCUMENTS", 2)
    monkeypatch.setattr(vector_search, "RECENT_SHARE", shares[0])
    monkeypatch.setattr(vector_search, "DEAD_SHARE", shares[1])
    settings = Settings(home=tmp_path)
    index = ChunkIndex(create_db_engine(settings.resolved_database_url), open_vector_store(settings))
    mirror = VectorMirror(index)
    names, seen = [], []
    for n in range(12):
        name = f"{n:x}" * 64
        index.add(*_version(name[:64], 3 + n % 4, seed=n))
        names.append(name[:64])
        if n % 3 == 2:
            index.remove(names.pop(0))
        if n == 7:  # the same id indexed again with other chunks
            index.remove(names[-1])
            index.add(*_version(names[-1], 2, seed=100))
        patched = mirror.current()
        seen.append((len(patched.recent) > 0, patched.live < len(patched.ids)))
    monkeypatch.undo()
    fresh = VectorMirror(index).current()
    assert sorted(patched.live_ids()) == sorted(fresh.ids)
    folds = sum(before[0] and not after[0] for before, after in itertools.pairwise(seen))
    if shares[0] == 0:
        assert set(seen) == {(False, False)}
    elif shares[0] == 100:
        assert folds == 0 and seen[-1] == (True, True)
    else:
        assert folds >= 2 and (True, True) in seen
    queries = np.random.default_rng(5).standard_normal((10, 8)).astype(np.float32)
    some = names[::2]
    for query in queries:
        for documents in (None, some, []):
            got = mirror.search(query, documents, 8)
            want = VectorMirror(index).search(query, documents, 8)
            assert [c for c, _ in got] == [c for c, _ in want]
            assert np.allclose([s for _, s in got], [s for _, s in want], atol=1e-6)
