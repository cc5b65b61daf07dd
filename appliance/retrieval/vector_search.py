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
the same transaction: a query that sees a new generation first patches the copy (the rows of documents
removed are marked dead, documents added are read from the database into a small recent matrix, both folded
into the main matrix once they grow past a share of it), so a CLI ingesting beside a running server is seen
by the server's next query.
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
# Documents added between two queries go into the recent vectors, and a removed one's rows are marked dead,
# until the recent rows pass this share of the main rows or the dead rows this share of all rows: then every
# live vector is copied into one main matrix again (at 100k chunks ~0.15 s, up to ~1 s when memory is tight).
RECENT_SHARE = 0.05
DEAD_SHARE = 0.1


@dataclass(frozen=True)
class _Snapshot:
    """One consistent state of the copy: row i is chunk ids[i] of document documents[row_document[i]], counted
    only while alive[i]. The vectors of the first len(vectors) rows are in `vectors`; those of rows added since in
    `recent`, so that a document added does not copy the whole matrix and a document removed only marks its
    rows dead; both are folded into `vectors` once they grow past a share of it (`RECENT_SHARE`, `DEAD_SHARE`)."""

    generation: tuple[int, int]  # (generation, rebuilds) of IndexState when taken
    ids: list[str]
    row_document: np.ndarray  # int32, one per row
    documents: list[str]  # document ids, by index
    vectors: np.ndarray  # float32 (main_rows, dimensions), unit length
    recent: np.ndarray  # float32 (rows - main_rows, dimensions), unit length
    alive: np.ndarray  # bool, one per row

    @cached_property
    def document_index(self) -> dict[str, int]:
        return {document_id: n for n, document_id in enumerate(self.documents)}

    @cached_property
    def live(self) -> int:
        return int(self.alive.sum())

    def live_ids(self) -> list[str]:
        return [chunk_id for chunk_id, alive in zip(self.ids, self.alive, strict=True) if alive]

    def all_vectors(self) -> np.ndarray:
        """Every row's vector, main and recent (a copy when there are recent rows)."""
        return np.vstack((self.vectors, self.recent)) if len(self.recent) else self.vectors


_NONE = np.zeros((0, 0), dtype=np.float32)
EMPTY = _Snapshot((-1, -1), [], np.zeros(0, dtype=np.int32), [], _NONE, _NONE, np.zeros(0, dtype=bool))


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

    @staticmethod
    def _changes(old, counts: dict[str, int]) -> tuple[set[str], set[str]]:
        """Documents to drop from a snapshot and documents to read into it, given the chunk count of every indexed
        document. A document removed and indexed again between two queries keeps its id (the hash of its bytes)
        but may have other chunks now: one whose number of chunks changed is both dropped and read again."""
        held = np.bincount(old.row_document[old.alive], minlength=len(old.documents))
        present = {d for n, d in enumerate(old.documents) if held[n]}
        changed = {d for n, d in enumerate(old.documents) if d in counts and held[n] and counts[d] != held[n]}
        return (present - counts.keys()) | changed, (counts.keys() - present) | changed

    @staticmethod
    def _alive_without(old, gone: set[str]) -> np.ndarray:
        """The snapshot's live rows less those of the `gone` documents."""
        return old.alive & ~np.isin(old.row_document, [old.document_index[d] for d in gone])

    @staticmethod
    def _survivors(old, keep: np.ndarray) -> tuple[list[str], np.ndarray, list[str]]:
        """Chunk ids, row documents and documents of the rows `keep` marks, in order, renumbered: a document left
        with no row leaves no entry behind (it may come back)."""
        kept_documents = np.zeros(len(old.documents), dtype=bool)
        kept_documents[old.row_document[keep]] = True
        documents = [d for d, k in zip(old.documents, kept_documents, strict=True) if k]
        renumber = (np.cumsum(kept_documents) - 1).astype(np.int32)
        ids = [chunk_id for chunk_id, k in zip(old.ids, keep, strict=True) if k]
        return ids, renumber[old.row_document[keep]], documents


class VectorMirror(IndexCopy):
    def __init__(self, index):
        super().__init__(index, EMPTY)

    def search(self, vector: np.ndarray, documents: list[str] | None, limit: int) -> list[tuple[str, float]]:
        """(chunk id, cosine similarity), best first, among the chunks of `documents` (None: all)."""
        snapshot = self.current()
        if not snapshot.live or limit <= 0:
            return []
        query = np.asarray(vector, dtype=np.float32)
        query = query / (np.linalg.norm(query) or 1.0)
        scores = snapshot.vectors @ query
        if len(snapshot.recent):
            scores = np.concatenate((scores, snapshot.recent @ query))
        if snapshot.live < len(snapshot.ids):
            scores[~snapshot.alive] = -np.inf
        if documents is not None:
            scores[~readable_rows(snapshot, documents)] = -np.inf
        count = min(limit, len(scores))
        top = np.argpartition(-scores, count - 1)[:count]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(snapshot.ids[row], float(scores[row])) for row in top if np.isfinite(scores[row])]

    def _patched(self, old: _Snapshot, generation: tuple[int, int]) -> _Snapshot:
        with session(self.index.engine) as db:
            counts = dict(db.exec(select(Document.id, Document.chunk_count).where(Document.status == "indexed")).all())
        if not old.live or generation[1] != old.generation[1]:
            snapshot = self._read(generation, [], [], [], [], sorted(counts))
            log.info("vector copy loaded: %d chunks of %d documents", len(snapshot.ids), len(snapshot.documents))
            return snapshot
        gone, added = self._changes(old, counts)
        new = sorted(added)
        if not gone and not new:
            return replace(old, generation=generation)
        alive = self._alive_without(old, gone)
        recent = len(old.recent) + sum(counts[d] for d in new)
        if recent > RECENT_SHARE * len(old.vectors) or len(alive) - alive.sum() > DEAD_SHARE * len(alive):
            ids, row_document, documents = self._survivors(old, alive)
            main, rest = alive[: len(old.vectors)], alive[len(old.vectors) :]
            snapshot = self._read(
                generation, documents, ids, [row_document], [old.vectors[main], old.recent[rest]], new
            )
            how = "folded in"
        else:
            snapshot = self._read(
                generation,
                list(old.documents),
                list(old.ids),
                [old.row_document],
                [old.recent],
                new,
                main=old.vectors,
                alive=alive,
            )
            how = "patched"
        log.info("vector copy %s: -%d +%d documents, %d chunks", how, len(gone), len(new), snapshot.live)
        return snapshot

    def _read(
        self,
        generation,
        documents,
        ids,
        rows,
        vectors,
        new: list[str],
        *,
        main: np.ndarray | None = None,
        alive: np.ndarray | None = None,
    ) -> _Snapshot:
        """Append the stored vectors of the `new` documents to the given rows and build the snapshot: with `main`
        (the main vectors kept as they are, `alive` marking their rows and the recent ones given), `vectors` and
        what is read become the recent vectors; without, everything becomes the main vectors."""
        lookup = {d: n for n, d in enumerate(documents)}
        statement = sql(
            "SELECT c.id, c.document_id, v.vector FROM chunkvector AS v JOIN chunk AS c ON c.id = v.chunk_id "
            "WHERE c.document_id IN :documents ORDER BY c.document_id, c.position"
        ).bindparams(bindparam("documents", expanding=True, type_=String))
        held = len(ids)
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
        vectors = [block for block in vectors if len(block)]
        if not ids:
            return replace(EMPTY, generation=generation)
        added = np.ones(len(ids) - held, dtype=bool)
        if main is not None:
            assert alive is not None
            recent = np.vstack(vectors) if vectors else _NONE
            return _Snapshot(
                generation, ids, np.concatenate(rows), documents, main, recent, np.concatenate((alive, added))
            )
        everything = np.ascontiguousarray(np.vstack(vectors)) if vectors else _NONE
        return _Snapshot(generation, ids, np.concatenate(rows), documents, everything, _NONE, np.ones(len(ids), bool))
