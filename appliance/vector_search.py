"""Exact, access-filtered vector search over an in-memory copy of the chunk vectors.

Ingestion writes every vector twice: to Chroma and, as float32 bytes, to the `chunkvector` table. The
copy is read from the database, which every process sees (embedded Chroma does not show one process
the writes of another). Chroma's own filtered query stays available (`APPLIANCE_VECTOR_SEARCH=chroma`);
its `where` filter, though, costs about 0.5 s per query at 100k chunks whatever the filter's shape
(measured in docs/benchmarks.md), while an exact scan of 100k x 384 float32 vectors with a boolean
mask of the readable rows takes a few milliseconds. So the dense search runs here: the mask is built
from the documents the caller may read *before* the top-k is taken, which keeps the rule that a
passage the caller may not read never takes a place in the list.

The copy follows the index through `IndexState.generation`, which every write to the index bumps in
the same transaction: a query that sees a new generation first patches the copy (documents removed
are dropped, documents added are read from the database), so a CLI ingesting beside a running server is
seen by the server's next query.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
from sqlalchemy import String, bindparam
from sqlalchemy import text as sql
from sqlmodel import select

from appliance.db import Document, IndexState, session

log = logging.getLogger(__name__)

READ_DOCUMENTS = 500  # documents whose vectors are read per query when loading or patching the copy


@dataclass(frozen=True)
class _Snapshot:
    """One consistent state of the copy: row i is chunk ids[i] of document documents[row_document[i]]."""

    generation: tuple[int, int]  # (generation, rebuilds) of IndexState when taken
    ids: list[str]
    row_document: np.ndarray  # int32, one per row
    documents: list[str]  # document ids, by index
    vectors: np.ndarray  # float32 (rows, dimensions), unit length

    @cached_property
    def document_index(self) -> dict[str, int]:
        return {document_id: n for n, document_id in enumerate(self.documents)}


EMPTY = _Snapshot((-1, -1), [], np.zeros(0, dtype=np.int32), [], np.zeros((0, 0), dtype=np.float32))


def readable_rows(snapshot, documents: list[str]) -> np.ndarray:
    """One bool per row of a copy's snapshot (this module's or keyword_search's): whether its document is among
    `documents`."""
    lookup = snapshot.document_index
    allowed = np.zeros(len(snapshot.documents), dtype=bool)
    allowed[[lookup[d] for d in documents if d in lookup]] = True
    return allowed[snapshot.row_document]


class IndexCopy:
    """An in-memory copy of the chunk index that follows `IndexState`: `current()` patches it first (the
    subclass's `_patched`) when another write, from this process or another, changed the index."""

    def __init__(self, index, empty):
        self.index = index
        self._snapshot = empty
        self._lock = threading.Lock()

    def current(self):
        """The copy, patched first if the index changed since it was taken."""
        generation = self._generation()
        if generation == self._snapshot.generation:
            return self._snapshot
        with self._lock:
            if generation != self._snapshot.generation:
                self._snapshot = self._patched(self._snapshot, generation)
            return self._snapshot

    def _generation(self) -> tuple[int, int]:
        with session(self.index.engine) as db:
            state = db.get(IndexState, 1)
        return (state.generation, state.rebuilds) if state else (0, 0)

    def _patched(self, old, generation: tuple[int, int]):
        raise NotImplementedError


class VectorMirror(IndexCopy):
    def __init__(self, index):
        super().__init__(index, EMPTY)

    def search(self, vector: np.ndarray, documents: list[str] | None, limit: int) -> list[tuple[str, float]]:
        """(chunk id, cosine similarity), best first, among the chunks of `documents` (None: all)."""
        snapshot = self.current()
        if not snapshot.ids or limit <= 0:
            return []
        query = np.asarray(vector, dtype=np.float32)
        query = query / (np.linalg.norm(query) or 1.0)
        scores = snapshot.vectors @ query
        if documents is not None:
            scores[~readable_rows(snapshot, documents)] = -np.inf
        count = min(limit, len(scores))
        top = np.argpartition(-scores, count - 1)[:count]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(snapshot.ids[row], float(scores[row])) for row in top if np.isfinite(scores[row])]

    def _patched(self, old: _Snapshot, generation: tuple[int, int]) -> _Snapshot:
        with session(self.index.engine) as db:
            counts = dict(db.exec(select(Document.id, Document.chunk_count).where(Document.status == "indexed")).all())
        indexed = set(counts)
        if not old.ids or generation[1] != old.generation[1]:
            snapshot = self._read(generation, [], [], [], [], sorted(indexed))
            log.info("vector copy loaded: %d chunks of %d documents", len(snapshot.ids), len(snapshot.documents))
            return snapshot
        # A document removed and indexed again between two queries keeps its id (the hash of its bytes) but may
        # have other chunks now: one whose number of chunks changed is read again.
        held = np.bincount(old.row_document, minlength=len(old.documents))
        changed = {d for n, d in enumerate(old.documents) if d in counts and counts[d] != held[n]}
        gone = (set(old.documents) - indexed) | changed
        new = sorted((indexed - set(old.documents)) | changed)
        # Surviving documents are renumbered so that a removed document leaves no entry behind (it may come back).
        documents = [d for d in old.documents if d not in gone]
        lookup = {d: n for n, d in enumerate(documents)}
        renumber = np.array([lookup.get(d, -1) for d in old.documents], dtype=np.int32)
        row_document = renumber[old.row_document]
        keep = row_document >= 0
        ids = [chunk_id for chunk_id, kept in zip(old.ids, keep, strict=True) if kept]
        snapshot = self._read(generation, documents, ids, [row_document[keep]], [old.vectors[keep]], new)
        log.info("vector copy patched: -%d +%d documents, %d chunks", len(gone), len(new), len(snapshot.ids))
        return snapshot

    def _read(self, generation, documents, ids, rows, vectors, new: list[str]) -> _Snapshot:
        """Append the stored vectors of the `new` documents to the given rows and build the snapshot."""
        lookup = {d: n for n, d in enumerate(documents)}
        statement = sql(
            "SELECT c.id, c.document_id, v.vector FROM chunkvector AS v JOIN chunk AS c ON c.id = v.chunk_id "
            "WHERE c.document_id IN :documents ORDER BY c.document_id, c.position"
        ).bindparams(bindparam("documents", expanding=True, type_=String))
        with session(self.index.engine) as db:
            for begin in range(0, len(new), READ_DOCUMENTS):
                result = db.exec(statement, params={"documents": new[begin : begin + READ_DOCUMENTS]}).all()
                if not result:
                    continue
                block_rows = []
                for chunk_id, document_id, _ in result:
                    if document_id not in lookup:
                        lookup[document_id] = len(documents)
                        documents.append(document_id)
                    ids.append(chunk_id)
                    block_rows.append(lookup[document_id])
                rows.append(np.array(block_rows, dtype=np.int32))
                block = np.frombuffer(b"".join(row[2] for row in result), dtype=np.float32).reshape(len(result), -1)
                norms = np.linalg.norm(block, axis=1, keepdims=True)
                vectors.append(block / np.where(norms == 0, 1.0, norms))
        return self._build(generation, ids, rows, documents, vectors)

    @staticmethod
    def _build(generation, ids, rows, documents, vectors) -> _Snapshot:
        vectors = [block for block in vectors if len(block)]
        if not ids or not vectors:
            return replace(EMPTY, generation=generation)
        return _Snapshot(generation, ids, np.concatenate(rows), documents, np.ascontiguousarray(np.vstack(vectors)))
