"""The ingestion pipeline for one file: identify, store the original, parse (sandboxed), chunk,
embed in batches, index, and replace the previous version of the same source.

Used by `appliance ingest`; the server's job worker and upload API build on the same function.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlmodel import select

from appliance.config import Settings
from appliance.db import Chunk, Document, session
from appliance.embeddings import SentenceEmbedder
from appliance.errors import ApplianceError, BadRequest
from appliance.index import ChunkIndex
from ingest.attachments import extract_attachments
from ingest.chunking import Chunk as Piece
from ingest.chunking import chunk_document
from ingest.filenames import allowed_suffix, display_name
from ingest.safety import check_size
from ingest.sandbox import ParserProcess

log = logging.getLogger(__name__)
_PRINCIPAL_KINDS = ("user", "group", "collection")


@dataclass
class IngestResult:
    source: str
    status: str  # added | unchanged | updated | failed
    document_id: str | None = None
    chunks: int = 0
    reason: str = ""


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


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class Ingestor:
    def __init__(self, settings: Settings, index: ChunkIndex, embedder: SentenceEmbedder):
        self.settings = settings
        self.index = index
        self.embedder = embedder
        self.parser = ParserProcess(settings.ingest)
        self.on_stage: Callable[[str], None] = lambda stage: None  # progress: parsing, embedding, indexing
        self.originals = settings.home / "originals"
        self.originals.mkdir(parents=True, exist_ok=True, mode=0o700)

    @property
    def max_bytes(self) -> int:
        return self.settings.ingest.max_upload_mb * 2**20

    def original_path(self, document: Document) -> Path:
        return self.originals / f"{document.id}{Path(document.filename).suffix.lower()}"

    def ingest(
        self, path: Path, collection: str, acl: list[str], source: str | None = None, filename: str | None = None
    ) -> IngestResult:
        """Ingest one file. `source` identifies it across versions (default: its path); `filename` is the
        name people see (default: the file's own name)."""
        source = source or str(path.resolve())
        try:
            return self._ingest(path, collection, acl, source, filename or path.name)
        except ApplianceError as exc:
            return IngestResult(source, "failed", reason=exc.message)
        except OSError as exc:
            return IngestResult(source, "failed", reason=f"cannot read the file: {exc.strerror or exc}")

    def ingest_with_attachments(
        self, path: Path, collection: str, acl: list[str], source: str | None = None, filename: str | None = None
    ) -> list[IngestResult]:
        """Ingest a file and, for an e-mail, each of its attachments as a document of its own."""
        source = source or str(path.resolve())
        results = [self.ingest(path, collection, acl, source, filename)]
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
                    results.append(self.ingest(attachment.path, collection, acl, attachment_source, attachment.name))
        return results

    def _ingest(self, path: Path, collection: str, acl: list[str], source: str, filename: str) -> IngestResult:
        if not path.is_file():
            raise BadRequest("not a regular file")
        suffix = allowed_suffix(path.name)
        if suffix is None:
            raise BadRequest(f"unsupported file type '{path.suffix.lower() or '(no extension)'}'")
        check_size(path, self.max_bytes)  # before copying anything (the parser checks again, in its process)
        document_id = sha256_of(path)
        with session(self.index.engine) as db:
            existing = db.get(Document, document_id)
            previous = db.exec(
                select(Document).where(
                    Document.source == source, Document.collection == collection, Document.id != document_id
                )
            ).all()
        if existing is not None and existing.status == "indexed":
            if existing.collection != collection:
                raise BadRequest(f"the same file is already in collection '{existing.collection}'")
            return IngestResult(source, "unchanged", document_id, existing.chunk_count)
        if existing is not None:  # left half-done by an interrupted run: start it again cleanly
            self.index.remove(document_id)
        document = Document(
            id=document_id,
            collection=collection,
            source=source[:1024],
            filename=display_name(filename),
            kind=suffix.lstrip("."),
            size=path.stat().st_size,
            acl=acl,
        )
        original = self.original_path(document)
        _copy_atomically(path, original)
        try:
            self.on_stage("parsing")
            kind, elements = self.parser.partition(original)
            text, pieces = chunk_document(elements)
            chunks = chunk_rows(document_id, pieces)
            self.on_stage("embedding")
            vectors = self.embedder.encode([c.text for c in chunks]).vectors
        except BaseException:
            original.unlink(missing_ok=True)  # nothing was indexed: keep no copy
            raise
        document.kind = kind
        self.on_stage("indexing")
        self.index.add(document, text, chunks, vectors)
        for old in previous:
            self.remove(old.id)
        return IngestResult(source, "updated" if previous else "added", document_id, len(chunks))

    def remove(self, document_id: str) -> None:
        """Remove a document: its chunks everywhere, its text, and its original."""
        with session(self.index.engine) as db:
            document = db.get(Document, document_id)
        self.index.remove(document_id)
        if document is not None:
            self.original_path(document).unlink(missing_ok=True)


def _copy_atomically(source: Path, target: Path) -> None:
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
