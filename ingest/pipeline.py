"""The ingestion pipeline: identify a file, store the original, parse (sandboxed), chunk, embed,
index, and replace the previous version of the same source.

`ingest` does that for one file (the server's job worker and upload API); `ingest_many` for a stream
of files (`appliance ingest`): parser processes work ahead on the next files while the main thread
embeds and indexes earlier ones, and embedding and index writes are batched across files. Both run
the same steps, so a file gives the same document and chunks either way.

A document's id hashes its collection with its content's SHA-256, so de-duplication is per collection.
An upload acts for someone: `may_replace` says which existing documents they could delete. Only those
count, as the same content (`unchanged`) or as the older version a new one replaces; the others are
left alone and change nothing in the answer, so an upload neither overwrites nor reveals a document
its uploader may not see (its content then becomes a further copy, with an id of its own).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from sqlmodel import col, select

from appliance.config import Settings
from appliance.db import Chunk, Document, session
from appliance.errors import ApplianceError, BadRequest
from appliance.retrieval.embeddings import SentenceEmbedder
from appliance.retrieval.index import ChunkIndex
from ingest.attachments import extract_attachments
from ingest.chunking import Chunk as Piece
from ingest.chunking import chunk_document
from ingest.filenames import allowed_suffix, display_name
from ingest.safety import check_size
from ingest.sandbox import ParserPool

log = logging.getLogger(__name__)
_PRINCIPAL_KINDS = ("user", "group", "collection")
EMBED_GROUP_CHUNKS = 256  # chunks of several files embedded in one call (sorted by length, they pad little)
# Chunks are long (~200 tokens): in batches of 16 the model's activations stay in the CPU caches; measured
# on 2 cores, batches of 64 cost ~25% more CPU time per chunk.
EMBED_BATCH = 16


@dataclass
class IngestResult:
    source: str
    status: str  # added | unchanged | updated | failed
    document_id: str | None = None
    chunks: int = 0
    reason: str = ""
    replaced: list[Document] = field(default_factory=list)  # older versions removed by this one


@dataclass
class ReparseResult:
    document: Document
    status: str  # reparsed | unchanged | failed
    chunks_before: int = 0
    chunks_after: int = 0
    reason: str = ""


MayReplace = Callable[[Document], bool]  # may the one ingesting delete (and so replace or reuse) this document?


def _anything(document: Document) -> bool:
    return True


def parse_acl(raw: str | None, collection: str) -> list[str]:
    """`group:oncology,user:alice` -> principals; none given means everyone who may read the collection."""
    if not raw:
        return [f"collection:{collection}"]
    principals = []
    for item in (part.strip() for part in raw.split(",")):
        kind, _, name = item.partition(":")
        if kind not in _PRINCIPAL_KINDS or not name or len(item) > 200:
            raise BadRequest(f"invalid ACL entry '{item}': use user:NAME, group:NAME or collection:NAME")
        principals.append(item)
    return sorted(set(principals))


def chunk_rows(document_id: str, pieces: list[Piece]) -> list[Chunk]:
    """Database rows for a document's chunks, with ids `<document id>:<n>`."""
    return [
        Chunk(
            id=f"{document_id}:{p.index}",
            document_id=document_id,
            position=p.index,
            start=p.start,
            end=p.end,
            page=p.page,
            headings=p.headings,
            text=p.text,
        )
        for p in pieces
    ]


def document_id(collection: str, digest: str, copy: int = 0) -> str:
    """The id of content (its SHA-256 `digest`) in a collection; `copy` numbers further copies of it there,
    made for uploaders who may not see the earlier ones."""
    return hashlib.sha256(f"{collection}\n{digest}\n{copy}".encode()).hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class ContentInFlight(Exception):
    """The same content is already on its way through the pipeline (started and not yet indexed)."""


@dataclass
class _Work:
    """One file between its checks and its indexing."""

    source: str
    document: Document
    original: Path
    previous_known: bool = False
    text: str = ""
    chunks: list[Chunk] = field(default_factory=list)


@dataclass
class Started:
    """A file checked, stored and handed to the parser (`Ingestor.start`); `Ingestor.complete` embeds and indexes
    it. `result` is set when it was decided without parsing (unchanged content, a refused file)."""

    source: str
    result: IngestResult | None = None
    work: _Work | None = None
    parsed: Future | None = None

    @property
    def document_id(self) -> str | None:
        return self.work.document.id if self.work is not None else None


@dataclass
class _Entry:
    """One input of `ingest_many`, in input order."""

    path: Path
    source: str
    results: list[IngestResult] | None = None  # set once final
    work: _Work | None = None
    parsed: Future | None = None
    serial: bool = False  # e-mails and repeated content go through `ingest_with_attachments`


class Ingestor:
    def __init__(self, settings: Settings, index: ChunkIndex, embedder: SentenceEmbedder):
        self.settings = settings
        self.index = index
        self.embedder = embedder
        self.parser = ParserPool(settings.ingest, settings.ingest.parser_count)
        # `start` hands parsing to this thread (the parse itself runs in a parser process).
        self._parse_ahead = ThreadPoolExecutor(1, thread_name_prefix="parse-ahead")
        # Progress: stage (parsing, embedding, indexing) and what it works on (a file name, "12 files").
        self.on_stage: Callable[[str, str], None] = lambda stage, subject: None
        self.timings: dict[str, float] = {}  # seconds spent per stage (parse, chunk, embed, index), summed
        self._timings_lock = threading.Lock()
        self.originals = settings.home / "originals"
        self.originals.mkdir(parents=True, exist_ok=True, mode=0o700)

    @property
    def max_bytes(self) -> int:
        return self.settings.ingest.max_upload_mb * 2**20

    def original_path(self, document: Document) -> Path:
        return self.originals / f"{document.id}{Path(document.filename).suffix.lower()}"

    def warm_up(self) -> None:
        """Start the parser processes and load the embedding model now rather than on the first file."""
        self.parser.warm_up()
        self.embedder.load()

    def close(self) -> None:
        self.parser.stop()

    def ingest(
        self,
        path: Path,
        collection: str,
        acl: list[str],
        source: str | None = None,
        filename: str | None = None,
        may_replace: MayReplace = _anything,
    ) -> IngestResult:
        """Ingest one file. `source` identifies it across versions (default: its path); `filename` is the
        name people see (default: the file's own name); `may_replace` (default: anything) limits what it
        may replace or count as the same content."""
        started = self.start(path, collection, acl, source, filename, may_replace)
        return self.complete(started, collection, may_replace)

    def start(
        self,
        path: Path,
        collection: str,
        acl: list[str],
        source: str | None = None,
        filename: str | None = None,
        may_replace: MayReplace = _anything,
        in_flight: set[str] | frozenset[str] = frozenset(),
    ) -> Started:
        """Check and store one file and start parsing it on the parse-ahead thread, so that the caller can embed
        and index an earlier file meanwhile (the server's job worker). Raises `ContentInFlight` when the same
        content is among `in_flight` (document ids started and not yet completed): start it after those."""
        source = source or str(path.resolve())
        started = Started(source)
        try:
            work = self._prepare(path, collection, acl, source, filename or path.name, in_flight, may_replace)
        except ContentInFlight:
            raise
        except (ApplianceError, OSError) as exc:
            started.result = _failed(source, exc)
            return started
        if isinstance(work, IngestResult):
            started.result = work
        else:
            started.work = work
            started.parsed = self._parse_ahead.submit(self._parse, work)
        return started

    def complete(self, started: Started, collection: str, may_replace: MayReplace = _anything) -> IngestResult:
        """Wait for a started file's parse, then embed and index it (`start`)."""
        if started.result is not None:
            return started.result
        work = started.work
        try:
            self.on_stage("parsing", work.document.filename)
            started.parsed.result()
            return self._finish([work], collection, may_replace)[0]
        except (ApplianceError, OSError) as exc:
            return _failed(started.source, exc)

    def ingest_with_attachments(
        self,
        path: Path,
        collection: str,
        acl: list[str],
        source: str | None = None,
        filename: str | None = None,
        may_replace: MayReplace = _anything,
    ) -> list[IngestResult]:
        """Ingest a file and, for an e-mail, each of its attachments as a document of its own."""
        source = source or str(path.resolve())
        results = [self.ingest(path, collection, acl, source, filename, may_replace)]
        if results[0].status == "failed" or path.suffix.lower() != ".eml":
            return results
        scratch_root = self.settings.home / "incoming"
        scratch_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.TemporaryDirectory(dir=scratch_root, prefix=".attachments-") as scratch:
            for attachment in extract_attachments(path, Path(scratch), self.max_bytes):
                attachment_source = f"{source}#{attachment.name}"
                if attachment.path is None:
                    results.append(IngestResult(attachment_source, "failed", reason=attachment.reason))
                else:
                    results.append(
                        self.ingest(attachment.path, collection, acl, attachment_source, attachment.name, may_replace)
                    )
        return results

    def ingest_many(
        self, files: Iterable[tuple[Path, str]], collection: str, acl: list[str]
    ) -> Iterator[list[IngestResult]]:
        """Ingest `(path, source)` pairs; yields, in input order, each file's results (an e-mail's
        attachments follow it). The parser pool works ahead on later files while earlier ones are
        embedded and indexed; chunks of several files are embedded together and indexed in one write."""
        window = max(8, 4 * self.parser.size)  # files parsed ahead: enough to fill an embedding group
        todo = iter(files)
        order: deque[_Entry] = deque()  # taken from `files`, not yet yielded
        waiting: deque[_Entry] = deque()  # taken, not yet moved into the batch (or decided)
        batch: list[_Entry] = []
        in_flight: set[str] = set()  # document ids prepared in this run and not yet final
        pool = ThreadPoolExecutor(self.parser.size, thread_name_prefix="parse")
        finished = False
        try:
            while True:
                while len(waiting) < window and (item := next(todo, None)) is not None:
                    entry = self._start(_Entry(*item), collection, acl, in_flight, pool)
                    order.append(entry)
                    waiting.append(entry)
                if not waiting:
                    self._flush(batch, collection, in_flight)
                    yield from (entry.results for entry in order)
                    break
                entry = waiting[0]
                if entry.serial:
                    self._flush(batch, collection, in_flight)  # an earlier copy of the same content goes first
                    entry.results = self.ingest_with_attachments(entry.path, collection, acl, entry.source)
                elif entry.parsed is not None:
                    if not entry.parsed.done():
                        self._flush(batch, collection, in_flight)  # embed now rather than wait for the parser
                    self.on_stage("parsing", entry.path.name)
                    try:
                        entry.parsed.result()
                        batch.append(entry)
                    except (ApplianceError, OSError) as exc:
                        entry.results = [_failed(entry.source, exc)]
                        in_flight.discard(entry.work.document.id)
                    if sum(len(e.work.chunks) for e in batch) >= EMBED_GROUP_CHUNKS:
                        self._flush(batch, collection, in_flight)
                waiting.popleft()
                while order and order[0].results is not None:
                    yield order.popleft().results
            finished = True
        finally:
            pool.shutdown(wait=finished, cancel_futures=True)
            if not finished:  # stopped early: no parser left running, no copy of a file that was not indexed
                self.parser.stop()
                for entry in order:
                    if entry.results is None and entry.work is not None:
                        entry.work.original.unlink(missing_ok=True)

    def _start(
        self, entry: _Entry, collection: str, acl: list[str], in_flight: set[str], pool: ThreadPoolExecutor
    ) -> _Entry:
        """Check and store a file, and hand it to the parser pool (or decide it right away)."""
        if entry.path.suffix.lower() == ".eml":
            entry.serial = True
            return entry
        try:
            work = self._prepare(entry.path, collection, acl, entry.source, entry.path.name, in_flight)
        except ContentInFlight:
            entry.serial = True
            return entry
        except (ApplianceError, OSError) as exc:
            entry.results = [_failed(entry.source, exc)]
            return entry
        if isinstance(work, IngestResult):
            entry.results = [work]
        else:
            entry.work = work
            in_flight.add(work.document.id)
            entry.parsed = pool.submit(self._parse, work)
        return entry

    def _flush(self, batch: list[_Entry], collection: str, in_flight: set[str]) -> None:
        """Embed and index the batch's files; each gets its results (a shared failure fails them all)."""
        if not batch:
            return
        try:
            results = self._finish([entry.work for entry in batch], collection)
        except (ApplianceError, OSError) as exc:
            results = [_failed(entry.source, exc) for entry in batch]
        for entry, result in zip(batch, results, strict=True):
            entry.results = [result]
            in_flight.discard(entry.work.document.id)
        batch.clear()

    def _prepare(
        self,
        path: Path,
        collection: str,
        acl: list[str],
        source: str,
        filename: str,
        in_flight: set[str] = frozenset(),
        may_replace: MayReplace = _anything,
    ) -> _Work | IngestResult:
        """Check the file, and either decide it (unchanged) or store its original for parsing."""
        if not path.is_file():
            raise BadRequest("not a regular file")
        suffix = allowed_suffix(path.name)
        if suffix is None:
            raise BadRequest(f"unsupported file type '{path.suffix.lower() or '(no extension)'}'")
        check_size(path, self.max_bytes)  # before copying anything (the parser checks again, in its process)
        new_id, existing = self._same_content(sha256_of(path), collection, may_replace)
        if new_id in in_flight:
            raise ContentInFlight(new_id)
        if existing is not None and existing.status == "indexed":
            return IngestResult(source, "unchanged", existing.id, existing.chunk_count)
        if existing is not None:  # left half-done by an interrupted run: start it again cleanly
            self.index.remove(existing.id)
        document = Document(
            id=new_id,
            collection=collection,
            source=source[:1024],
            filename=display_name(filename),
            kind=suffix.lstrip("."),
            size=path.stat().st_size,
            acl=acl,
        )
        original = self.original_path(document)
        _copy_atomically(path, original)
        return _Work(source, document, original)

    def _same_content(self, digest: str, collection: str, may_replace: MayReplace) -> tuple[str, Document | None]:
        """The id this content gets in the collection, and the document already there under it, if any.

        Copies that `may_replace` rejects are passed over: the content then takes the next free copy number,
        exactly as if they were not there. A document ingested before ids named their collection has the bare
        digest as its id; it still counts as the same content in its own collection."""
        with session(self.index.engine) as db:
            legacy = db.get(Document, digest)
        if legacy is not None and legacy.collection == collection and may_replace(legacy):
            if legacy.status == "indexed":
                return legacy.id, legacy
            self.index.remove(legacy.id)  # half-done: indexed again under the new id
        copy = 0
        with session(self.index.engine) as db:
            while True:
                candidate = document_id(collection, digest, copy)
                existing = db.get(Document, candidate)
                if existing is None or may_replace(existing):
                    return candidate, existing
                copy += 1

    def _parse(self, work: _Work) -> None:
        """Parse (in a parser process) and chunk; the stored original is removed if that fails."""
        try:
            started = time.perf_counter()
            kind, elements = self.parser.partition(work.original)
            parsed = time.perf_counter()
            work.text, pieces = chunk_document(elements)
            work.chunks = chunk_rows(work.document.id, pieces)
            self._count("parse", parsed - started)
            self._count("chunk", time.perf_counter() - parsed)
        except BaseException:
            work.original.unlink(missing_ok=True)  # nothing was indexed: keep no copy
            raise
        work.document.kind = kind

    def _finish(self, works: list[_Work], collection: str, may_replace: MayReplace = _anything) -> list[IngestResult]:
        """Embed the files' chunks in one call, index them in one write, then replace the older versions that
        `may_replace` allows."""
        subject = works[0].document.filename if len(works) == 1 else f"{len(works)} files"
        try:
            self.on_stage("embedding", subject)
            started = time.perf_counter()
            texts = [c.text for work in works for c in work.chunks]
            vectors = self.embedder.encode(texts, batch_size=EMBED_BATCH).vectors
            self._count("embed", time.perf_counter() - started)
        except BaseException:
            for work in works:
                work.original.unlink(missing_ok=True)
            raise
        self.on_stage("indexing", subject)
        started = time.perf_counter()
        with session(self.index.engine) as db:  # indexed meanwhile, e.g. as an earlier e-mail's attachment
            done = {
                d.id: d for d in db.exec(select(Document).where(col(Document.id).in_([w.document.id for w in works])))
            }
        entries, offset = [], 0
        for work in works:
            if work.document.id not in done:
                entries.append((work.document, work.text, work.chunks, vectors[offset : offset + len(work.chunks)]))
            offset += len(work.chunks)
        self.index.add_many(entries)
        results = []
        for work in works:
            if work.document.id in done:
                results.append(
                    IngestResult(work.source, "unchanged", work.document.id, done[work.document.id].chunk_count)
                )
                continue
            with session(self.index.engine) as db:
                same_source = db.exec(
                    select(Document).where(
                        Document.source == work.document.source,
                        Document.collection == collection,
                        Document.id != work.document.id,
                    )
                ).all()
            previous = [old for old in same_source if may_replace(old)]
            for old in previous:
                self.remove(old.id)
            status = "updated" if previous else "added"
            results.append(IngestResult(work.source, status, work.document.id, len(work.chunks), replaced=previous))
        self._count("index", time.perf_counter() - started)
        return results

    def _count(self, stage: str, seconds: float) -> None:
        with self._timings_lock:
            self.timings[stage] = self.timings.get(stage, 0.0) + seconds

    def reparse(self, document: Document) -> ReparseResult:
        """Parse an indexed document's stored original again with this version's parser and chunker, and give
        it the new chunks when they differ (re-embedded; id, collection, ACL and name kept). Nothing changes
        when the parse fails or the original was not kept."""
        before = document.chunk_count
        original = self.original_path(document)
        if not original.is_file():
            return ReparseResult(document, "failed", before, before, "its original was not kept")
        try:
            kind, elements = self.parser.partition(original)
            text, pieces = chunk_document(elements)
        except (ApplianceError, OSError) as exc:
            reason = exc.message if isinstance(exc, ApplianceError) else _unreadable(exc)
            return ReparseResult(document, "failed", before, before, reason)
        chunks = chunk_rows(document.id, pieces)
        with session(self.index.engine) as db:
            current = [
                c.text for c in db.exec(select(Chunk).where(Chunk.document_id == document.id).order_by(Chunk.position))
            ]
        if current == [c.text for c in chunks]:
            return ReparseResult(document, "unchanged", before, before)
        vectors = self.embedder.encode([c.text for c in chunks], batch_size=EMBED_BATCH).vectors
        self.index.replace_chunks(document.id, kind, text, chunks, vectors)
        return ReparseResult(document, "reparsed", before, len(chunks))

    def remove(self, document_id: str) -> None:
        """Remove a document: its chunks everywhere, its text, and its original."""
        with session(self.index.engine) as db:
            document = db.get(Document, document_id)
        self.index.remove(document_id)
        if document is not None:
            self.original_path(document).unlink(missing_ok=True)


def _unreadable(exc: OSError) -> str:
    return f"cannot read the file: {exc.strerror or exc}"


def _failed(source: str, exc: ApplianceError | OSError) -> IngestResult:
    reason = exc.message if isinstance(exc, ApplianceError) else _unreadable(exc)
    return IngestResult(source, "failed", reason=reason)


def _copy_atomically(source: Path, target: Path) -> None:
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
        stat = source.stat()  # the file's own time: an e-mail without a Date header is dated by it
        os.utime(temporary, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
