"""The chunk index: every chunk in the three places retrieval reads, kept in step.

    database   document, its extracted text, its chunks and their vectors (the record of truth; the
               in-memory vector search reads the vectors from here, see vector_search.py)
    FTS5       chunk_fts, for BM25 keyword search (same SQLite database; not kept on PostgreSQL, where
               BM25 runs on the in-memory index of keyword_search.py alone)
    Chroma     embedded, or a Chroma server: one collection of chunk vectors with document, collection and
               ACL principals as metadata (embeddings always passed in; Chroma never picks an embedding
               function)

The database records which embedder built the vectors (`require_embedder`; indexes from before migration 0011
kept it in the Chroma collection's metadata): vectors of another kind are refused rather than mixed in.

Writes go database first (document marked `indexing`, then `indexed` once Chroma holds its vectors);
removal marks the document `deleting`, empties Chroma, then deletes the rows. A crash in between
leaves a status that `check` reports and a re-run repairs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np
from sqlalchemy import text as sql
from sqlalchemy.engine import Engine
from sqlmodel import col, select

from appliance.config import Settings
from appliance.db import FTS_TABLE, Chunk, ChunkVector, Document, DocumentText, IndexState, session
from appliance.errors import Conflict, NotFound

log = logging.getLogger(__name__)

VECTOR_COLLECTION = "chunks"


def describe_embedder(record: dict | None) -> str:
    if not record:
        return "not recorded"
    return f"{record['backend']} ({record['vectors']} vectors, model {record['model_digest'][:12]})"


def same_vectors(a: dict, b: dict) -> bool:
    """Whether two embedders make the same vectors: same model files, same kind (torch and ONNX fp32 agree)."""
    return a["model_digest"] == b["model_digest"] and a["vectors"] == b["vectors"]


def open_vector_store(settings: Settings):
    """The Chroma client: the server at `APPLIANCE_CHROMA_URL` (its database `APPLIANCE_CHROMA_DATABASE`,
    created on first use) when set, else an embedded Chroma in the home directory. Telemetry is off either
    way."""
    import chromadb
    from chromadb.config import Settings as ChromaSettings

    if not settings.chroma_url:
        settings.chroma_dir.mkdir(parents=True, exist_ok=True)
        return chromadb.PersistentClient(
            path=str(settings.chroma_dir), settings=ChromaSettings(anonymized_telemetry=False, allow_reset=False)
        )
    url = urlsplit(settings.chroma_url)
    if url.scheme not in ("http", "https") or not url.hostname or url.path not in ("", "/"):
        raise ValueError(f"APPLIANCE_CHROMA_URL must be http(s)://host[:port], not '{settings.chroma_url}'")
    server = ChromaSettings(
        anonymized_telemetry=False,
        allow_reset=False,
        chroma_api_impl="chromadb.api.fastapi.FastAPI",
        chroma_server_host=url.hostname,
        chroma_server_http_port=url.port or (443 if url.scheme == "https" else 8000),
        chroma_server_ssl_enabled=url.scheme == "https",
    )
    database = settings.chroma_database
    admin = chromadb.AdminClient(server)
    try:
        admin.get_database(database)
    except Exception:  # chromadb's NotFoundError (its exception classes move between releases)
        admin.create_database(database)
    return chromadb.HttpClient(
        host=url.hostname,
        port=server.chroma_server_http_port,
        ssl=server.chroma_server_ssl_enabled,
        settings=server,
        database=database,
    )


@dataclass
class IndexReport:
    """What `check` found; `clean` when database, FTS and Chroma agree chunk for chunk."""

    documents: int = 0
    chunks: int = 0
    unfinished: list[str] = field(default_factory=list)  # documents left indexing or deleting
    missing_in_fts: list[str] = field(default_factory=list)
    missing_in_chroma: list[str] = field(default_factory=list)
    missing_vectors: list[str] = field(default_factory=list)  # chunks without a stored vector in the database
    orphans_in_fts: list[str] = field(default_factory=list)
    orphans_in_chroma: list[str] = field(default_factory=list)
    embedder: dict | None = None  # which embedder built the vectors, as recorded

    @property
    def clean(self) -> bool:
        return not (
            self.unfinished
            or self.missing_in_fts
            or self.missing_in_chroma
            or self.missing_vectors
            or self.orphans_in_fts
            or self.orphans_in_chroma
        )


_FTS_INSERT = sql(
    f"INSERT INTO {FTS_TABLE} (text, chunk_id, document_id, collection) "  # noqa: S608
    "VALUES (:text, :chunk_id, :document_id, :collection)"
)


def has_fts(db) -> bool:
    """Whether this database keeps the FTS5 table (SQLite); elsewhere BM25 runs on the in-memory index only."""
    return db.get_bind().dialect.name == "sqlite"


def _insert_fts(db, chunks: list[Chunk], documents: dict[str, Document]) -> None:
    if not has_fts(db):
        return
    for chunk in chunks:
        params = {
            "text": chunk.text,
            "chunk_id": chunk.id,
            "document_id": chunk.document_id,
            "collection": documents[chunk.document_id].collection,
        }
        db.exec(_FTS_INSERT, params=params)


def _vector_rows(chunk_ids: list[str], embeddings) -> list[ChunkVector]:
    vectors = np.asarray(embeddings, dtype=np.float32)
    return [ChunkVector(chunk_id=i, vector=v.tobytes()) for i, v in zip(chunk_ids, vectors, strict=True)]


def _delete_chunks(db, document_id: str) -> None:
    """A document's chunks, their keyword rows and their stored vectors, out of the database (not Chroma)."""
    if has_fts(db):
        db.exec(sql(f"DELETE FROM {FTS_TABLE} WHERE document_id = :id"), params={"id": document_id})  # noqa: S608
    db.exec(
        sql("DELETE FROM chunkvector WHERE chunk_id IN (SELECT id FROM chunk WHERE document_id = :id)"),
        params={"id": document_id},
    )
    for chunk in db.exec(select(Chunk).where(Chunk.document_id == document_id)):
        db.delete(chunk)


def _bump_generation(db, rebuilt: bool = False) -> None:
    """Tell processes holding a copy of the vectors (vector_search.VectorMirror) that the index changed."""
    db.exec(
        sql("UPDATE indexstate SET generation = generation + 1, rebuilds = rebuilds + :r WHERE id = 1"),
        params={"r": int(rebuilt)},
    )


class ChunkIndex:
    def __init__(self, engine: Engine, vector_client):
        self.engine = engine
        self.client = vector_client
        self.vectors = self._open_collection()
        self.embedder: dict | None = None  # the fingerprint of the embedder writing here (require_embedder)

    def _open_collection(self):
        return self.client.get_or_create_collection(
            VECTOR_COLLECTION, embedding_function=None, metadata={"hnsw:space": "cosine"}
        )

    def embedder_record(self) -> dict | None:
        """Which embedder built the vectors, as the database records it; None when nothing is recorded. An index
        from before the database kept it has it in Chroma's collection metadata: that record is moved over."""
        with session(self.engine) as db:
            raw = db.exec(select(IndexState.embedder).where(IndexState.id == 1)).first()
        if raw:
            return json.loads(raw)
        legacy = (self.client.get_collection(VECTOR_COLLECTION).metadata or {}).get("embedder")
        if not legacy:
            return None
        record = json.loads(legacy)
        self._record_embedder(record)
        return record

    def _record_embedder(self, fingerprint: dict) -> None:
        with session(self.engine) as db:
            db.exec(sql("UPDATE indexstate SET embedder = :e WHERE id = 1"), params={"e": json.dumps(fingerprint)})
            db.commit()

    def require_embedder(self, fingerprint: dict) -> None:
        """Refuse an embedder whose vectors differ from those indexed (Conflict, saying how to re-embed); record
        it where nothing is recorded. Later writes through this index check again."""
        recorded, indexed = self.embedder_record(), self.has_vectors()
        if recorded is None or not indexed:
            if recorded is None and indexed:
                # Indexed before embedders were recorded, when torch was the only backend.
                recorded = {**fingerprint, "backend": "torch", "vectors": "fp32"}
                log.info("the index records no embedder: taking it as built by %s", describe_embedder(recorded))
            else:
                recorded = fingerprint
            self._record_embedder(recorded)
        if not same_vectors(recorded, fingerprint):
            raise Conflict(
                f"the index was built by the {describe_embedder(recorded)} embedder, whose vectors differ from "
                f"those of APPLIANCE_EMBEDDING_BACKEND={fingerprint['backend']} "
                f"({describe_embedder(fingerprint)}): set APPLIANCE_EMBEDDING_BACKEND={recorded['backend']} again, "
                "or re-embed every chunk with the new one by running `appliance index rebuild` with it"
            )
        self.embedder = fingerprint

    def document_texts(self, document_ids: set[str]) -> dict[str, str]:
        """The stored full text of each document, by id (what citations are verified against)."""
        with session(self.engine) as db:
            rows = db.exec(select(DocumentText).where(DocumentText.document_id.in_(sorted(document_ids))))  # type: ignore[attr-defined]
            return {row.document_id: row.text for row in rows}

    def has_vectors(self) -> bool:
        with session(self.engine) as db:
            return db.exec(select(ChunkVector.chunk_id).limit(1)).first() is not None

    def add(self, document: Document, text: str, chunks: list[Chunk], embeddings: np.ndarray) -> None:
        """Index a new document version (its id must not be indexed yet)."""
        self.add_many([(document, text, chunks, embeddings)])

    def add_many(self, entries: list[tuple[Document, str, list[Chunk], np.ndarray]]) -> None:
        """Index several new document versions with one write to each store; each entry is a document,
        its text, its chunks and their embeddings. Until all are in Chroma, all stay `indexing`."""
        if self.embedder is not None:
            self.require_embedder(self.embedder)  # another process may have rebuilt with another embedder
        for document, _text, chunks, embeddings in entries:
            if len(chunks) != len(embeddings):
                raise ValueError("one embedding per chunk")
            document.status, document.chunk_count = "indexing", len(chunks)
        documents = {document.id: document for document, *_ in entries}
        all_chunks = [chunk for _document, _text, chunks, _embeddings in entries for chunk in chunks]
        with session(self.engine) as db:
            db.add_all(documents.values())
            db.flush()  # the rows below refer to them
            db.add_all(DocumentText(document_id=document.id, text=text) for document, text, *_ in entries)
            db.add_all(all_chunks)
            db.flush()
            _insert_fts(db, all_chunks, documents)
            for _document, _text, chunks, embeddings in entries:
                db.add_all(_vector_rows([c.id for c in chunks], embeddings))
            db.commit()
        if all_chunks:
            vectors = np.concatenate([np.asarray(e, dtype=np.float32) for _, _, chunks, e in entries if chunks])
            self._upsert_vectors(all_chunks, vectors, documents)
        with session(self.engine) as db:
            for stored in db.exec(select(Document).where(col(Document.id).in_(list(documents)))):
                stored.status = "indexed"
                db.add(stored)
            _bump_generation(db)
            db.commit()

    def remove(self, document_id: str) -> None:
        """Remove a document's text, chunks, FTS rows and vectors; no trace is left."""
        with session(self.engine) as db:
            document = db.get(Document, document_id)
            if document is None:
                raise NotFound(f"document {document_id} not found")
            document.status = "deleting"
            db.add(document)
            db.commit()
        self.vectors.delete(where={"document_id": document_id})
        with session(self.engine) as db:
            _delete_chunks(db, document_id)
            text_row = db.get(DocumentText, document_id)
            if text_row is not None:
                db.delete(text_row)
            db.flush()
            db.delete(db.get(Document, document_id))
            _bump_generation(db)
            db.commit()

    def replace_chunks(
        self, document_id: str, kind: str, text: str, chunks: list[Chunk], embeddings: np.ndarray
    ) -> None:
        """Give an indexed document new text and chunks (a parse by a newer parser), keeping its id, collection,
        ACL and name. The database changes in one transaction; Chroma follows. In-memory copies notice a new
        chunk count at once; `mark_reparsed` makes them read everything again (texts may change, not counts)."""
        if len(chunks) != len(embeddings):
            raise ValueError("one embedding per chunk")
        if self.embedder is not None:
            self.require_embedder(self.embedder)
        with session(self.engine) as db:
            document = db.get(Document, document_id)
            if document is None or document.status != "indexed":
                raise NotFound(f"document {document_id} not found")
            _delete_chunks(db, document_id)
            db.flush()
            text_row = db.get(DocumentText, document_id)
            if text_row is None:
                db.add(DocumentText(document_id=document_id, text=text))
            else:
                text_row.text = text
                db.add(text_row)
            document.kind, document.chunk_count = kind, len(chunks)
            db.add(document)
            db.add_all(chunks)
            db.flush()
            _insert_fts(db, chunks, {document_id: document})
            db.add_all(_vector_rows([c.id for c in chunks], embeddings))
            _bump_generation(db)
            db.commit()
            db.refresh(document)
        self.vectors.delete(where={"document_id": document_id})
        if chunks:
            self._upsert_vectors(chunks, np.asarray(embeddings, dtype=np.float32), {document_id: document})

    def mark_reparsed(self) -> None:
        """Tell every process holding an in-memory copy to read the index again (after `replace_chunks`)."""
        with session(self.engine) as db:
            _bump_generation(db, rebuilt=True)
            db.commit()

    def set_acl(self, document_id: str, acl: list[str]) -> None:
        """Change who may read one document: its row (which the BM25 join and the in-memory vector search read
        on every query) and its chunks' metadata in Chroma (which `vector_search=chroma` filters on)."""
        with session(self.engine) as db:
            document = db.get(Document, document_id)
            if document is None:
                raise NotFound(f"document {document_id} not found")
            document.acl = list(acl)
            db.add(document)
            db.commit()
            chunk_ids = list(db.exec(select(Chunk.id).where(Chunk.document_id == document_id)))
        if chunk_ids:
            metadata = {"document_id": document_id, "collection": document.collection, "acl": list(acl)}
            self.vectors.update(ids=chunk_ids, metadatas=[dict(metadata) for _ in chunk_ids])

    def rebuild(
        self,
        embed: Callable[[list[str]], np.ndarray],
        batch: int = 256,
        embedder: dict | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Rebuild FTS5 and Chroma from the chunk table (the database is the record of truth), re-embedding
        every chunk; `embedder`, the fingerprint of `embed`'s embedder, is recorded as the index's; `progress`
        is told (chunks done, chunks in all) after each batch.

        Returns the number of chunks indexed. Documents left half-indexed are not touched: the job
        recovery or a new ingestion of the file finishes them.
        """
        self.client.delete_collection(VECTOR_COLLECTION)
        self.vectors = self._open_collection()
        if embedder is not None:
            self._record_embedder(embedder)
            self.embedder = embedder
        with session(self.engine) as db:
            if has_fts(db):
                db.exec(sql(f"DELETE FROM {FTS_TABLE}"))  # noqa: S608
            documents = {d.id: d for d in db.exec(select(Document).where(Document.status == "indexed"))}
            chunks = [
                c
                for c in db.exec(select(Chunk).order_by(Chunk.document_id, Chunk.position))
                if c.document_id in documents
            ]
            _insert_fts(db, chunks, documents)
            db.commit()
        with session(self.engine) as db:
            db.exec(
                sql(
                    "DELETE FROM chunkvector WHERE chunk_id IN (SELECT c.id FROM chunk AS c "
                    "JOIN document AS d ON d.id = c.document_id WHERE d.status = 'indexed')"
                )
            )
            db.commit()
        for begin in range(0, len(chunks), batch):
            part = chunks[begin : begin + batch]
            vectors = embed([c.text for c in part])
            self._upsert_vectors(part, vectors, documents)
            with session(self.engine) as db:
                db.add_all(_vector_rows([c.id for c in part], vectors))
                db.commit()
            if progress is not None:
                progress(begin + len(part), len(chunks))
        with session(self.engine) as db:
            _bump_generation(db, rebuilt=True)
            db.commit()
        return len(chunks)

    def reload_vectors(self, batch: int = 1000) -> int:
        """Rebuild Chroma from the vectors the database keeps (after a restore: no re-embedding).

        Returns the number of chunks loaded; chunks without a stored vector are left for `index check`
        to report (and `index rebuild` to re-embed)."""
        self.client.delete_collection(VECTOR_COLLECTION)
        self.vectors = self._open_collection()
        with session(self.engine) as db:
            documents = {d.id: d for d in db.exec(select(Document).where(Document.status == "indexed"))}
            rows = list(
                db.exec(
                    select(Chunk, ChunkVector)
                    .join(ChunkVector, ChunkVector.chunk_id == Chunk.id)
                    .order_by(Chunk.document_id, Chunk.position)
                )
            )
        rows = [(c, v) for c, v in rows if c.document_id in documents]
        for begin in range(0, len(rows), batch):
            part = rows[begin : begin + batch]
            vectors = np.stack([np.frombuffer(v.vector, dtype=np.float32) for _c, v in part])
            self._upsert_vectors([c for c, _v in part], vectors, documents)
        with session(self.engine) as db:
            _bump_generation(db, rebuilt=True)
            db.commit()
        return len(rows)

    def _upsert_vectors(self, chunks: list[Chunk], embeddings, documents: dict[str, Document]) -> None:
        """Vectors with the metadata retrieval filters on: document, collection and ACL principals."""
        self.vectors.upsert(
            ids=[c.id for c in chunks],
            embeddings=np.asarray(embeddings, dtype=np.float32),
            metadatas=[
                {
                    "document_id": c.document_id,
                    "collection": documents[c.document_id].collection,
                    "acl": list(documents[c.document_id].acl),
                }
                for c in chunks
            ],
        )

    def backfill_vectors(self, batch: int = 1000) -> int:
        """Copy into the database the vectors that only Chroma holds (chunks indexed before the database kept
        vectors too); returns how many were copied. Run at server start, before the vector copy is read."""
        with session(self.engine) as db:
            missing = list(
                db.exec(
                    sql(
                        "SELECT c.id FROM chunk AS c JOIN document AS d ON d.id = c.document_id "
                        "LEFT JOIN chunkvector AS v ON v.chunk_id = c.id "
                        "WHERE v.chunk_id IS NULL AND d.status = 'indexed'"
                    )
                ).scalars()
            )
        copied = 0
        for begin in range(0, len(missing), batch):
            got = self.vectors.get(ids=missing[begin : begin + batch], include=["embeddings"])
            if not got["ids"]:
                continue
            with session(self.engine) as db:
                db.add_all(_vector_rows(got["ids"], got["embeddings"]))
                _bump_generation(db)
                db.commit()
            copied += len(got["ids"])
        return copied

    def check(self) -> IndexReport:
        with session(self.engine) as db:
            documents = list(db.exec(select(Document)))
            chunk_ids = set(db.exec(select(Chunk.id)))
            if has_fts(db):
                fts_ids = {row[0] for row in db.exec(sql(f"SELECT chunk_id FROM {FTS_TABLE}"))}  # noqa: S608
            else:
                fts_ids = chunk_ids  # no FTS table to compare: the in-memory index reads the chunks themselves
            vector_ids = set(db.exec(select(ChunkVector.chunk_id)))
        chroma_ids = set(self.vectors.get(include=[])["ids"])
        return IndexReport(
            documents=len(documents),
            chunks=len(chunk_ids),
            unfinished=sorted(d.id for d in documents if d.status != "indexed"),
            missing_in_fts=sorted(chunk_ids - fts_ids),
            missing_in_chroma=sorted(chunk_ids - chroma_ids),
            orphans_in_fts=sorted(fts_ids - chunk_ids),
            orphans_in_chroma=sorted(chroma_ids - chunk_ids),
            missing_vectors=sorted(chunk_ids - vector_ids),
            embedder=self.embedder_record(),
        )
