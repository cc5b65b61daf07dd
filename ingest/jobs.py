"""Persistent ingestion jobs and the worker that runs them inside the server.

An upload becomes a `job` row plus its bytes under `<home>/incoming/`. The worker runs jobs one at a
time, oldest first, and parses the next one while the one before is embedded and indexed (parse-ahead;
an e-mail, or content the job before holds, is not started early); several server processes sharing one
PostgreSQL database each run a worker, and
each job is claimed by exactly one of them (`FOR UPDATE SKIP LOCKED`, then a run lock held while it
runs). After a crash or `kill -9`, `recover()` puts jobs that were running back in the queue and
finishes interrupted deletions; the pipeline itself removes a half-indexed document before indexing it
again, so every document ends fully indexed or clearly failed.

A job runs with its uploader's rights as they are when it runs: it needs `edit` on its collection, and
it replaces (or counts as the same content) only documents the uploader could delete (`Access.may_delete`,
the rule of DELETE /api/documents). Its end is audited (outcome, result, document), and so is each
document it replaced, as a delete by the uploader.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text as sql
from sqlalchemy.engine import Connection, Engine
from sqlmodel import select

from appliance.access.actors import Actor
from appliance.access.rbac import NOBODY, access_for
from appliance.access.users import Principal
from appliance.db import Document, Job, User, session, utcnow
from appliance.errors import NotFound
from ingest.pipeline import ContentInFlight, Ingestor, IngestResult, Started

log = logging.getLogger(__name__)

CLAIM_SCAN = 20  # queued jobs looked at per claim (the oldest whose upload this host holds is taken)
ORPHAN_CHECK_S = 60  # on PostgreSQL, how often a worker looks for jobs left running by a process that died
# A job's run lock: a session-level advisory lock that the running process's connection holds (released by
# PostgreSQL itself when that process dies). Two keys: a fixed class and the job id's hash.
_RUN_LOCK_CLASS = 0x4A4F4253  # "JOBS"
_RUN_LOCK = sql(f"SELECT pg_advisory_lock({_RUN_LOCK_CLASS}, hashtext(:id))")
_TRY_RUN_LOCK = sql(f"SELECT pg_try_advisory_lock({_RUN_LOCK_CLASS}, hashtext(:id))")
_RUN_UNLOCK = sql(f"SELECT pg_advisory_unlock({_RUN_LOCK_CLASS}, hashtext(:id))")


@dataclass
class _Claimed:
    """A job this worker has claimed: its uploader, with their rights as they were when it was claimed, and its
    file once started through the pipeline."""

    job: Job
    lock: Connection | None
    uploader: Actor
    denied: bool  # the uploader may no longer upload to the job's collection
    serial: bool  # run through the whole pipeline at its turn (an e-mail, or content the job before it holds)
    started: Started | None = None

    @property
    def source(self) -> str:
        return f"upload:{self.job.collection}/{self.job.filename}"

    def may_replace(self, document: Document) -> bool:
        return self.uploader.access.may_delete(document)


class JobWorker:
    def __init__(self, engine: Engine, ingestor: Ingestor, incoming: Path):
        self.engine = engine
        self.ingestor = ingestor
        self.incoming = incoming
        self.incoming.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._wake = asyncio.Event()
        self._stages: dict[str, str] = {}  # job id -> what it is doing (the running job, and the one parsed ahead)
        self._current: str | None = None  # the job being embedded and indexed
        self._ahead: _Claimed | None = None  # the next job: claimed, and parsing while the current one finishes
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop `run_forever` runs on, once it runs
        ingestor.on_stage = self._on_stage

    def _on_stage(self, stage: str, subject: str) -> None:
        if self._current is not None:
            self._stages[self._current] = stage

    def stage(self, job_id: str) -> str | None:
        """What a running job is doing now (parsing, embedding, indexing); None when it is not running."""
        return self._stages.get(job_id)

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
        self._wake_up()
        return job

    def _wake_up(self) -> None:
        """Tell `run_forever` that a job is waiting; `enqueue` may be called from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            self._wake.set()
        else:
            loop.call_soon_threadsafe(self._wake.set)

    def get(self, job_id: str) -> Job:
        with session(self.engine) as db:
            job = db.get(Job, job_id)
        if job is None:
            raise NotFound(f"job {job_id} not found")
        return job

    def recover(self) -> None:
        """After a restart: re-queue interrupted jobs, finish interrupted deletions.

        On PostgreSQL several server processes share the queue: a job counts as interrupted only when no
        process holds its run lock (the process running it died), so one process starting or checking
        does not take back the jobs another is running."""
        with session(self.engine) as db:
            running = list(db.exec(select(Job.id).where(Job.state == "running")))
            deleting = list(db.exec(select(Document.id).where(Document.status == "deleting")))
        interrupted = [job_id for job_id in running if self._requeue_if_orphaned(job_id)]
        for document_id in deleting:
            try:
                self.ingestor.remove(document_id)
            except Exception:  # another process finished it meanwhile, or it fails again: the next check retries
                log.warning("could not finish the interrupted deletion of document %s", document_id, exc_info=True)
        if interrupted or deleting:
            log.warning(
                "recovered %d interrupted job(s) and %d interrupted deletion(s)", len(interrupted), len(deleting)
            )

    def _requeue_if_orphaned(self, job_id: str) -> bool:
        requeue = sql("UPDATE job SET state = 'queued', updated_at = :now WHERE id = :id AND state = 'running'")
        with self.engine.connect() as connection:
            shared = connection.dialect.name == "postgresql"
            if shared and not connection.execute(_TRY_RUN_LOCK, {"id": job_id}).scalar():
                connection.rollback()
                return False  # a live process is running it
            try:
                changed = connection.execute(requeue, {"id": job_id, "now": utcnow()}).rowcount
                connection.commit()
            finally:
                if shared:
                    connection.execute(_RUN_UNLOCK, {"id": job_id})
                    connection.commit()
        return bool(changed)

    def _claim(self) -> tuple[Job, Connection | None] | None:
        """Take the oldest queued job: mark it running, atomically against other workers (a compare-and-set;
        on PostgreSQL `FOR UPDATE SKIP LOCKED`, so concurrent workers take different jobs without waiting).
        On PostgreSQL the returned connection holds the job's run lock until `_release`."""
        connection = self.engine.connect()
        try:
            shared = connection.dialect.name == "postgresql"
            oldest = "SELECT id, upload_path FROM job WHERE state = 'queued' ORDER BY created_at, id LIMIT :n"
            statement = sql(oldest + (" FOR UPDATE SKIP LOCKED" if shared else ""))
            candidates = connection.execute(statement, {"n": CLAIM_SCAN}).all()
            # Hosts that do not share their home directory each run only the uploads they received.
            row = next((c for c in candidates if Path(c.upload_path).exists()), None)
            if row is None:
                connection.rollback()
                connection.close()
                return None
            if shared:
                connection.execute(_RUN_LOCK, {"id": row[0]})  # held past the commit, for as long as the job runs
            taken = connection.execute(
                sql("UPDATE job SET state = 'running', updated_at = :now WHERE id = :id AND state = 'queued'"),
                {"id": row[0], "now": utcnow()},
            ).rowcount
            connection.commit()
        except Exception:
            connection.close()
            raise
        if not taken:  # another worker (another process on the same SQLite file) took it first
            self._release(row[0], connection if shared else None)
            connection.close()
            return self._claim()
        if not shared:
            connection.close()
        with session(self.engine) as db:
            job = db.get(Job, row[0])
        return job, connection if shared else None

    @staticmethod
    def _release(job_id: str, connection: Connection | None) -> None:
        if connection is None:
            return
        try:
            connection.execute(_RUN_UNLOCK, {"id": job_id})
            connection.commit()
        finally:
            connection.close()

    def run_next(self) -> bool:
        """Run the oldest queued job; False when there is none. While it is embedded and indexed, the next job is
        claimed and parsed (parse-ahead, as `appliance ingest` does), and runs on the next call."""
        current = self._ahead or self._take()
        self._ahead = None
        if current is None:
            return False
        try:
            self._begin(current)
            if current.started is not None and not current.serial:
                try:
                    self._ahead = self._take()
                    if self._ahead is not None:
                        self._begin(self._ahead, in_flight={current.started.document_id} - {None})
                except Exception:  # no parse-ahead this time; the job in hand still runs (and the next one later)
                    log.exception("claiming the next ingestion job ahead failed")
            self._run(current)
        finally:
            self._release(current.job.id, current.lock)
        return True

    def _take(self) -> _Claimed | None:
        """Claim the oldest queued job, with its uploader's rights as they are now."""
        claimed = self._claim()
        if claimed is None:
            return None
        job, lock = claimed
        uploader = self._uploader(job)
        serial = Path(job.filename).suffix.lower() == ".eml"  # its attachments follow it through the pipeline
        return _Claimed(job, lock, uploader, not uploader.may("edit", job.collection), serial)

    def _begin(self, claimed: _Claimed, in_flight: set[str] | None = None) -> None:
        """Check, store and start parsing the job's upload (not an e-mail's, nor content that `in_flight` holds:
        those go through the whole pipeline when they run)."""
        if claimed.denied or claimed.serial or claimed.started is not None:
            return
        job = claimed.job
        self._stages[job.id] = "parsing"
        try:
            claimed.started = self.ingestor.start(
                Path(job.upload_path),
                job.collection,
                job.acl,
                source=claimed.source,
                filename=job.filename,
                may_replace=claimed.may_replace,
                in_flight=in_flight or set(),
            )
        except ContentInFlight:
            claimed.serial = True  # the same content is being indexed by the job before it
        except Exception:  # an unexpected failure ends this job clearly when it runs; the worker goes on
            log.exception("starting ingestion job %s failed unexpectedly", job.id)
            claimed.serial = True

    def _uploader(self, job: Job) -> Actor:
        """Who uploaded the job (no user: the local operator), with their access as it is now."""
        if job.user_id is None:
            return Actor.operator()
        with session(self.engine) as db:
            user = db.get(User, job.user_id)
        if user is None:
            return Actor(f"user #{job.user_id}", job.user_id, NOBODY)
        return Actor(user.name, job.user_id, access_for(self.engine, Principal(job.user_id, user.name, user.role)))

    def _run(self, claimed: _Claimed) -> None:
        job = claimed.job
        upload = Path(job.upload_path)
        self._current = job.id
        self._stages[job.id] = "parsing"
        if claimed.denied:  # the grant was revoked, a wall put up or the account disabled since the upload
            reason = f"uploading to '{job.collection}' is no longer allowed"
            results = [IngestResult(claimed.source, "failed", reason=reason)]
        else:
            try:
                if claimed.started is not None:
                    results = [self.ingestor.complete(claimed.started, job.collection, claimed.may_replace)]
                else:
                    results = self.ingestor.ingest_with_attachments(
                        upload,
                        job.collection,
                        job.acl,
                        source=claimed.source,
                        filename=job.filename,
                        may_replace=claimed.may_replace,
                    )
            except Exception:  # an unexpected failure ends this job clearly; the worker goes on
                log.exception("ingestion job %s failed unexpectedly", job.id)
                results = [
                    IngestResult(claimed.source, "failed", reason="internal error while ingesting (see the log)")
                ]
        self._current = None
        self._stages.pop(job.id, None)
        result, *attachments = results
        state, outcome, document_id, reason = (
            ("failed", None, None, result.reason)
            if result.status == "failed"
            else ("done", result.status, result.document_id, None)
        )
        if attachments:
            log.info("job %s: %d attachment(s) ingested as documents of their own", job.id, len(attachments))
        outcome_word = "denied" if claimed.denied else "ok" if state == "done" else "failed"
        self._audit(job, claimed.uploader, results, outcome_word)
        with session(self.engine) as db:
            stored = db.get(Job, job.id)
            stored.state, stored.result, stored.document_id, stored.reason = state, outcome, document_id, reason
            stored.updated_at = utcnow()
            db.add(stored)
            db.commit()
        upload.unlink(missing_ok=True)  # only once the job's outcome is recorded (a crash before re-runs it)

    def _audit(self, job: Job, uploader: Actor, results: list[IngestResult], outcome: str) -> None:
        """Each document the job replaced, as a delete by the uploader; then the job's end (`outcome` ok, failed,
        or denied: the uploader may no longer upload there)."""
        for result in results:
            for old in result.replaced:
                uploader.record(
                    self.engine,
                    "delete",
                    target=old.id,
                    collection=old.collection,
                    filename=old.filename,
                    reason=f"replaced by upload {job.id}",
                    replaced_by=result.document_id,
                )
        result = results[0]
        details = {"job_id": job.id, "filename": job.filename}
        if outcome == "ok":
            details.update(state="done", result=result.status, document_id=result.document_id)
        else:
            details.update(state="failed", reason=result.reason)
        if len(results) > 1:
            details["attachments"] = [r.document_id for r in results[1:]]
        uploader.record(self.engine, "upload", target=job.collection, outcome=outcome, **details)

    async def run_forever(self) -> None:
        self._loop = asyncio.get_running_loop()
        checked = time.monotonic()
        while True:
            if self.engine.dialect.name == "postgresql" and time.monotonic() - checked > ORPHAN_CHECK_S:
                # Another server process may have died mid-job: its jobs go back to the queue.
                checked = time.monotonic()
                try:
                    await asyncio.to_thread(self.recover)
                except Exception:
                    log.exception("checking for interrupted jobs failed")
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
