"""`Ingestor.ingest_many` (parser pool working ahead, batched embedding and indexing) against the
one-file-at-a-time path: same documents and chunks, per-file failures, order, progress, and the pool."""

import os
import signal
from pathlib import Path

import pytest
from sqlmodel import select

from appliance.config import IngestSettings, Settings
from appliance.db import Chunk, Document, session
from appliance.retrieval.embeddings import SentenceEmbedder
from ingest.pipeline import Ingestor
from ingest.sandbox import ParserPool
from tests.conftest import local_ingestor
from tests.documents import write_all, write_docx, write_eml, write_pdf

pytestmark = pytest.mark.usefixtures("fresh_stores")


@pytest.fixture(scope="module")
def embedder():
    return SentenceEmbedder(Settings().embeddings)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("files")
    documents = write_all(folder)
    pdf = write_pdf(folder / "long.pdf", pages=4)
    (folder / "truncated.pdf").write_bytes(pdf.read_bytes()[: pdf.stat().st_size // 2])
    (folder / "report.docx").write_text("plain text with a lying extension")
    (folder / "copy-of-discharge.docx").write_bytes(documents["docx"].read_bytes())  # same content twice
    write_eml(folder / "with-attachment.eml", {"rota.docx": documents["docx"].read_bytes()})
    names = ["pdf", "md", "html", "docx", "txt", "csv", "xlsx", "pptx", "eml"]
    middle = [folder / "truncated.pdf", folder / "report.docx", folder / "copy-of-discharge.docx"]
    tail = [folder / "long.pdf", folder / "with-attachment.eml"]
    return [documents[n] for n in names[:4]] + middle + [documents[n] for n in names[4:]] + tail


def _ingestor(home: Path, embedder, workers: int, embedded: bool = False) -> Ingestor:
    """`embedded`: SQLite and Chroma in the home even while the module runs on the server stores (a second,
    independent index to compare with)."""
    stores = {"database_url": "", "chroma_url": ""} if embedded else {}
    return local_ingestor(home, embedder, ingest=IngestSettings(parse_workers=workers), **stores)


def _stored(ingestor: Ingestor) -> dict[str, tuple]:
    """Each document by file name: its id, status, kind, ACL and chunks as stored."""
    with session(ingestor.index.engine) as db:
        documents = list(db.exec(select(Document)))
        chunks = list(db.exec(select(Chunk).order_by(Chunk.position)))
    return {
        d.filename: (
            d.id,
            d.status,
            d.kind,
            d.acl,
            [(c.position, c.text, c.page, c.headings, c.start, c.end) for c in chunks if c.document_id == d.id],
        )
        for d in documents
    }


def test_many_gives_the_same_documents_and_chunks_as_one_at_a_time(tmp_path, files, embedder):
    serial = _ingestor(tmp_path / "serial", embedder, workers=1, embedded=True)
    many = _ingestor(tmp_path / "many", embedder, workers=2)
    stages: list[tuple[str, str]] = []
    many.on_stage = lambda stage, subject: stages.append((stage, subject))
    try:
        expected = [serial.ingest_with_attachments(path, "c", ["collection:c"], str(path)) for path in files]
        got = list(many.ingest_many(((path, str(path)) for path in files), "c", ["collection:c"]))
        assert got == expected  # same statuses, document ids, chunk counts and reasons, in input order
        assert [results[0].source for results in got] == [str(path) for path in files]
        assert _stored(many) == _stored(serial)
        assert many.index.check().clean and many.index.check().documents == serial.index.check().documents
    finally:
        serial.close()
        many.close()
    by_name = {Path(results[0].source).name: results for results in got}
    assert by_name["truncated.pdf"][0].reason.startswith("damaged or truncated PDF")
    assert by_name["report.docx"][0].status == "failed"
    assert by_name["copy-of-discharge.docx"][0].status == "unchanged"  # its content came earlier in the run
    assert [r.status for r in by_name["with-attachment.eml"]] == ["added", "unchanged"]  # attachment = discharge.docx
    assert all(r.status == "added" for r in by_name["long.pdf"])  # files after the failures still go in
    assert {stage for stage, _subject in stages} == {"parsing", "embedding", "indexing"}
    assert any(subject.endswith("files") for stage, subject in stages if stage == "embedding"), "batched"
    remaining = {p.name for p in (tmp_path / "many" / "originals").iterdir()}
    assert len(remaining) == many.index.check().documents, "no copy of a file that was not indexed"


def test_a_changed_file_replaces_its_old_version_and_a_rerun_changes_nothing(tmp_path, embedder):
    folder = tmp_path / "files"
    paths = list(write_all(folder).values())[:4]
    ingestor = _ingestor(tmp_path / "home", embedder, workers=2)
    try:
        first = [r for rs in ingestor.ingest_many(((p, str(p)) for p in paths), "c", ["collection:c"]) for r in rs]
        assert [r.status for r in first] == ["added"] * len(paths)
        paths[1].write_text(paths[1].read_text() + "\n\nOne more paragraph about retention.\n")
        again = [r for rs in ingestor.ingest_many(((p, str(p)) for p in paths), "c", ["collection:c"]) for r in rs]
        assert [r.status for r in again] == ["unchanged", "updated", "unchanged", "unchanged"]
        report = ingestor.index.check()
        assert report.clean and report.documents == len(paths)
    finally:
        ingestor.close()


def test_a_stopped_run_leaves_no_copies_and_no_parsers(tmp_path, files, embedder):
    ingestor = _ingestor(tmp_path / "home", embedder, workers=2)
    run = ingestor.ingest_many(((path, str(path)) for path in files), "c", ["collection:c"])
    next(run)  # parsing of later files is under way
    run.close()
    report = ingestor.index.check()
    assert report.clean and 1 <= report.documents < len(files)
    assert len(list((tmp_path / "home" / "originals").iterdir())) == report.documents
    assert all(parser._process is None for parser in ingestor.parser._parsers)


def test_the_pool_replaces_a_parser_that_died(tmp_path):
    pool = ParserPool(IngestSettings(), size=2)
    docx = write_docx(tmp_path / "a.docx")
    try:
        pool.warm_up()
        children = [parser._process for parser in pool._parsers]
        assert all(child is not None and child.poll() is None for child in children)
        for child in children:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        kind, elements = pool.partition(docx)
        assert kind == "docx" and elements[0].text == "Discharge policy"
        assert any(parser._process not in children and parser._process is not None for parser in pool._parsers)
    finally:
        pool.stop()
