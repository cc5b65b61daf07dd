"""The server's job worker parses the next upload while the one before it is embedded and indexed (parse-ahead),
with the same documents as one at a time; an e-mail, and content the job before holds, wait their turn."""

from pathlib import Path

from appliance.db import Document, session
from ingest.jobs import JobWorker
from tests.conftest import local_ingestor

SAMPLE = Path(__file__).parent.parent / "sample_corpus"


def _worker(home: Path) -> JobWorker:
    ingestor = local_ingestor(home, database_url="", chroma_url="")
    return JobWorker(ingestor.index.engine, ingestor, home / "incoming")


def _enqueue(worker: JobWorker, name: str, content: bytes) -> str:
    job_id, upload = worker.new_upload_path(Path(name).suffix)
    upload.write_bytes(content)
    worker.enqueue(job_id, upload, name, "wards", ["collection:wards"], None)
    return job_id


def _documents(worker: JobWorker) -> dict[str, tuple[str, int]]:
    with session(worker.engine) as db:
        return {d.filename: (d.id, d.chunk_count) for d in db.exec(Document.__table__.select())}


def test_the_next_job_is_parsed_while_the_one_before_is_indexed(tmp_path):
    files = [
        ("discharge-policy.docx", (SAMPLE / "hospital" / "discharge-policy.docx").read_bytes()),
        ("fire-safety-procedures.txt", (SAMPLE / "hospital" / "fire-safety-procedures.txt").read_bytes()),
        ("again.txt", (SAMPLE / "hospital" / "fire-safety-procedures.txt").read_bytes()),  # same content
        ("thread.eml", (SAMPLE / "lawfirm" / "email-thread-2-custodian-list.eml").read_bytes()),
        ("visiting-hours.html", (SAMPLE / "hospital" / "visiting-hours.html").read_bytes()),
    ]
    worker = _worker(tmp_path / "ahead")
    jobs = [_enqueue(worker, name, content) for name, content in files]
    try:
        assert worker.run_next()
        assert worker.get(jobs[0]).state == "done"
        # The second job was claimed and its parse started while the first was embedded and indexed.
        assert worker.get(jobs[1]).state == "running" and worker.stage(jobs[1]) == "parsing"
        assert worker._ahead is not None and worker._ahead.started.parsed is not None
        assert worker.run_next()
        # The same content as the job before it waits for its turn, then counts as unchanged.
        assert worker._ahead is not None and worker._ahead.serial and worker._ahead.started is None
        while worker.run_next():
            pass
        states = [worker.get(job_id) for job_id in jobs]
        assert [j.state for j in states] == ["done"] * 5, [j.reason for j in states]
        assert [j.result for j in states] == ["added", "added", "unchanged", "added", "added"]
        assert states[2].document_id == states[1].document_id
        assert not list((tmp_path / "ahead" / "incoming").glob("*.*"))  # every upload removed once recorded
        ahead = _documents(worker)
    finally:
        worker.ingestor.close()

    # One at a time (each job run alone, nothing queued behind it): the same documents and chunks.
    worker = _worker(tmp_path / "alone")
    try:
        for name, content in files:
            _enqueue(worker, name, content)
            assert worker.run_next() and worker._ahead is None
        assert _documents(worker) == ahead
    finally:
        worker.ingestor.close()
