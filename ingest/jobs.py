"""Persistent ingestion jobs and the worker that runs them inside the server.

An upload becomes a `job` row plus its bytes under `<home>/incoming/`. The worker takes jobs one at
a time, oldest first. After a crash or `kill -9`, `recover()` puts jobs that were running back in
the queue and finishes interrupted deletions; the pipeline itself removes a half-indexed document
before indexing it again, so every document ends fully indexed or clearly failed.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import select

from appliance.db import Document, Job, session, utcnow
from appliance.errors import NotFound
from ingest.pipeline import Ingestor

log = logging.getLogger(__name__)


class JobWorker:
    def __init__(self, engine: Engine, ingestor: Ingestor, incoming: Path):
        self.engine = engine
        self.ingestor = ingestor
        self.incoming = incoming
        self.incoming.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._wake = asyncio.Event()
        self._stage: tuple[str, str] | None = None  # (job id, stage) of the running job, for progress
        ingestor.on_stage = self._on_stage

    def _on_stage(self, stage: str, subject: str) -> None:
        if self._stage is not None:
            self._stage = (self._stage[0], stage)

    def stage(self, job_id: str) -> str | None:
        """What the running job is doing now (parsing, embedding, indexing); None when it is not running."""
        current = self._stage
        return current[1] if current and current[0] == job_id else None

    def new_upload_path(self, suffix: str) -> tuple[str, Path]:
        job_id = uuid.uuid4().hex
        return job_id, self.incoming / f"{job_id}{suffix}"

    def enqueue(
        self, job_id: str, upload: Path, filename: str, collection: str, acl: list[str], user_id: int | None
    ) -> Job:
        job = Job(
            id=job_id, collection=collection, acl=acl, filename=filename, upload_path=str(upload), user_id=user_id
        )
        with session(self.engine) as db:
            db.add(job)
            db.commit()
            db.refresh(job)
        self._wake.set()
        return job

    def get(self, job_id: str) -> Job:
        with session(self.engine) as db:
            job = db.get(Job, job_id)
        if job is None:
            raise NotFound(f"job {job_id} not found")
        return job

    def recover(self) -> None:
        """After a restart: re-queue interrupted jobs, finish interrupted deletions."""
        with session(self.engine) as db:
            interrupted = list(db.exec(select(Job).where(Job.state == "running")))
            for job in interrupted:
                job.state, job.updated_at = "queued", utcnow()
                db.add(job)
            db.commit()
            deleting = list(db.exec(select(Document.id).where(Document.status == "deleting")))
        for document_id in deleting:
            self.ingestor.remove(document_id)
        if interrupted or deleting:
            log.warning(
                "recovered %d interrupted job(s) and %d interrupted deletion(s)", len(interrupted), len(deleting)
            )

    def run_next(self) -> bool:
        """Run the oldest queued job; False when there is none."""
        with session(self.engine) as db:
            job = db.exec(select(Job).where(Job.state == "queued").order_by(Job.created_at)).first()
            if job is None:
                return False
            job.state, job.updated_at = "running", utcnow()
            db.add(job)
            db.commit()
            db.refresh(job)
        upload = Path(job.upload_path)
        source = f"upload:{job.collection}/{job.filename}"
        self._stage = (job.id, "parsing")
        try:
            result, *attachments = self.ingestor.ingest_with_attachments(
                upload, job.collection, job.acl, source=source, filename=job.filename
            )
            state, outcome, document_id, reason = (
                ("failed", None, None, result.reason)
                if result.status == "failed"
                else ("done", result.status, result.document_id, None)
            )
            if attachments:
                log.info("job %s: %d attachment(s) ingested as documents of their own", job.id, len(attachments))
        except Exception:  # an unexpected failure ends this job clearly; the worker goes on
            log.exception("ingestion job %s failed unexpectedly", job.id)
            state, outcome, document_id, reason = "failed", None, None, "internal error while ingesting (see the log)"
        self._stage = None
        with session(self.engine) as db:
            stored = db.get(Job, job.id)
            stored.state, stored.result, stored.document_id, stored.reason = state, outcome, document_id, reason
            stored.updated_at = utcnow()
            db.add(stored)
            db.commit()
        upload.unlink(missing_ok=True)  # only once the job's outcome is recorded (a crash before re-runs it)
        return True

    async def run_forever(self) -> None:
        while True:
            try:
                ran = await asyncio.to_thread(self.run_next)
            except Exception:  # one bad job must not stop the worker
                log.exception("ingestion job failed unexpectedly")
                ran = False
                await asyncio.sleep(1)
            if not ran:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=5)
                except TimeoutError:
                    pass
