"""The in-memory copy of the vectors follows writes made by another process (the CLI beside a server)."""

import numpy as np
import pytest
from sqlmodel import col, select

from appliance.db import Chunk, session
from appliance.rbac import OPERATOR
from appliance.retrieve import Retriever
from tests.conftest import local_ingestor, run_cli

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
        texts = {c.id: c.text for c in db.exec(select(Chunk).where(col(Chunk.id).in_(snapshot.ids)))}
    expected = retriever.embedder.encode([texts[chunk_id] for chunk_id in snapshot.ids]).vectors
    expected = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    assert np.allclose(snapshot.vectors, expected, atol=1e-4)
    ingestor.parser.stop()
