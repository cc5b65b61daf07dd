"""Hybrid retrieval: dense (vector) and BM25 (keyword) rankings fused by reciprocal rank.

Each search runs in one of two places, as the settings say:
  * vector (`APPLIANCE_VECTOR_SEARCH`): `memory`, the default, an exact scan of an in-memory copy of the
    vectors (vector_search.py); `chroma`, Chroma's own query with a `where` filter;
  * BM25 (`APPLIANCE_KEYWORD_SEARCH`): `memory`, the default, an in-memory inverted index of the chunk texts
    that ranks as FTS5's bm25() does (keyword_search.py), on any database; `fts`, SQLite's FTS5 table,
    queried in SQL (SQLite only: on another database the setting stops the start).

The caller's access is applied inside every search, before its top-k is taken — the in-memory searches mask
the documents the caller may read (`permitted_documents`, read once per question for both), Chroma filters
on the chunk's collection and ACL principals, FTS5 joins the permitted documents in SQL — so a passage the
caller may not read can never take a place in a top-k list. An optional local cross-encoder re-ranks the
fused list.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

from sqlalchemy import String, bindparam
from sqlalchemy import text as sql
from sqlmodel import select

from appliance.access.rbac import Access, read_rule_sql, read_rule_where
from appliance.config import RetrievalSettings
from appliance.db import FTS_TABLE, Chunk, Document, session
from appliance.errors import ApplianceError, BadRequest, NotFound
from appliance.retrieval.embeddings import SentenceEmbedder, dictionary_words
from appliance.retrieval.index import ChunkIndex
from appliance.retrieval.keyword_search import KeywordMirror
from appliance.retrieval.vector_search import VectorMirror

log = logging.getLogger(__name__)

MAX_QUERY_CHARS = 4000  # longer questions are refused: they are not questions, and they cost every search
MAX_QUERY_TERMS = 64
_WORD = re.compile(r"\w+", re.UNICODE)
_UNREAD = object()  # a search given no `permitted` documents reads them itself


@dataclass
class Hit:
    """One retrieved passage, with where it comes from and how it ranked."""

    chunk_id: str
    document_id: str
    collection: str
    title: str
    source: str
    page: int | None
    section: str
    text: str
    start: int
    end: int
    score: float
    similarity: float | None = None  # cosine similarity to the query, when the vector search found it
    dense_rank: int | None = None
    keyword_rank: int | None = None

    def public(self) -> dict:
        """The passage as the search API shows it."""
        view = asdict(self)
        view["score"] = round(self.score, 6)
        if self.similarity is not None:
            view["similarity"] = round(self.similarity, 4)
        return view


def check_query(query: object) -> str:
    if not isinstance(query, str) or not query.strip():
        raise BadRequest("the question is empty")
    if len(query) > MAX_QUERY_CHARS:
        raise BadRequest(f"the question is too long ({len(query)} characters; at most {MAX_QUERY_CHARS})")
    return query.strip()


def query_words(query: str) -> list[str]:
    """The distinct words of a query, lower-cased, in order, at most MAX_QUERY_TERMS."""
    words: list[str] = []
    for word in _WORD.findall(query.lower()):
        if word not in words:
            words.append(word)
    return words[:MAX_QUERY_TERMS]


def match_expression(words: list[str]) -> str:
    """An FTS5 MATCH expression: the words, quoted (so FTS syntax in a question is data), OR-ed."""
    return " OR ".join(f'"{w}"' for w in words)


def fts_query(query: str) -> str | None:
    """The MATCH expression of every word of the query (BM25 weighs them); None when it has no word."""
    words = query_words(query)
    return match_expression(words) if words else None


def document_frequencies(db, words: list[str]) -> dict[str, int]:
    """How many chunks hold each word, as FTS5 indexed it (stemmed by the same porter tokenizer, which a
    scratch FTS5 table in the connection's temp schema applies to the words)."""
    db.exec(sql("CREATE VIRTUAL TABLE IF NOT EXISTS temp.query_terms USING fts5(word, tokenize='porter unicode61')"))
    db.exec(sql("CREATE VIRTUAL TABLE IF NOT EXISTS temp.query_stems USING fts5vocab(temp, query_terms, 'instance')"))
    db.exec(sql("DELETE FROM temp.query_terms"))
    for number, word in enumerate(words):
        db.exec(sql("INSERT INTO temp.query_terms (rowid, word) VALUES (:n, :w)"), params={"n": number, "w": word})
    stems = {row[1]: row[0] for row in db.exec(sql("SELECT term, doc FROM temp.query_stems"))}
    db.exec(sql("DELETE FROM temp.query_terms"))
    db.commit()  # only the temp schema was written; committing keeps the scratch tables for the next query
    if not stems:
        return {}
    statement = sql("SELECT term, doc FROM chunk_fts_vocab WHERE term IN :terms").bindparams(
        bindparam("terms", expanding=True)
    )
    counts = dict(db.exec(statement, params={"terms": sorted(set(stems.values()))}).all())
    return {word: counts.get(stems[number], 0) for number, word in enumerate(words) if number in stems}


def fuse(rankings: list[tuple[list[str], float]], k: int) -> dict[str, float]:
    """Reciprocal-rank fusion: each ranking (ids best first, weight) adds weight / (k + rank)."""
    scores: dict[str, float] = {}
    for ids, weight in rankings:
        for rank, chunk_id in enumerate(ids, start=1):
            scores[chunk_id] = scores.get(chunk_id, 0.0) + weight / (k + rank)
    return scores


@dataclass
class Ranking:
    """One question's rankings of chunk ids, best first: vector (with cosine similarity), BM25, fused."""

    dense: list[tuple[str, float]]
    keyword: list[str]
    fused: dict[str, float]  # chunk id -> fused score

    @property
    def ids(self) -> list[str]:
        return sorted(self.fused, key=lambda c: self.fused[c], reverse=True)


class SearchScope:
    """One question's reach, worked out once and passed to every step that searches for it: the caller's
    access, the collections searched (None: no limit), and, read when a step first needs them, the documents
    the caller may read there (`permitted`) and those BM25's statistics count (`counted`)."""

    def __init__(self, retriever: Retriever, access: Access, collections: list[str] | None):
        self._retriever = retriever
        self.access = access
        self.collections = collections

    @property
    def empty(self) -> bool:
        """Nothing can be found: no collection to search, or a caller who may read nothing."""
        nowhere = self.collections is not None and not self.collections
        return nowhere or self.access.may_read_nothing()

    @cached_property
    def permitted(self) -> list[str] | None:
        return self._retriever.permitted_documents(self.access, self.collections)

    @cached_property
    def counted(self) -> list[str] | None:
        return self._retriever.counted_documents(self.access, self.collections, self.permitted)


class Retriever:
    def __init__(self, index: ChunkIndex, embedder: SentenceEmbedder, settings: RetrievalSettings):
        self.index = index
        self.embedder = embedder
        self.settings = settings
        if settings.keyword_search == "fts" and index.engine.dialect.name != "sqlite":
            raise ApplianceError(
                f"APPLIANCE_KEYWORD_SEARCH=fts needs SQLite's FTS5 table; the database is "
                f"{index.engine.dialect.name}: use 'memory' (the default)"
            )
        self.mirror = VectorMirror(index)
        self.keywords = KeywordMirror(index)
        self._counted = (-1, 0)  # (index generation, number of chunks) for keyword_max_df
        self._reranker = None
        self._reranker_lock = threading.Lock()

    # --- scope -------------------------------------------------------------------------------
    def scope(self, access: Access, requested: list[str] | None) -> list[str] | None:
        """The collections to search: the requested ones (each must be readable: else 404, the same
        answer as for a collection that does not exist), or every readable one. None: no limit."""
        if requested:
            if not isinstance(requested, list) or not all(isinstance(c, str) for c in requested):
                raise BadRequest("'collections' must be a list of collection names")
            existing = self._existing_collections()
            for name in requested:
                if name not in existing or not access.can_read_collection(name):
                    raise NotFound(f"collection '{name}' not found")
            return sorted(set(requested))
        if access.unrestricted():
            return None
        return sorted(access.collections - access.walled)

    def scoped(self, access: Access, requested: list[str] | None) -> SearchScope:
        """`scope`, with the caller's access, as one object a question's steps share."""
        return SearchScope(self, access, self.scope(access, requested))

    def document_texts(self, document_ids: set[str]) -> dict[str, str]:
        """The full text of each of these documents (ids the caller's search returned), by id."""
        return self.index.document_texts(document_ids)

    def _existing_collections(self) -> set[str]:
        with session(self.index.engine) as db:
            return set(db.exec(select(Document.collection).distinct()))

    # --- search ------------------------------------------------------------------------------
    def search(
        self,
        query: str,
        access: Access,
        collections: list[str] | None = None,
        top_k: int | None = None,
        *,
        scope: SearchScope | None = None,
    ) -> list[Hit]:
        """The top-k passages for `query` among those the caller may read. `scope`: the question's, when the
        caller has worked it out already (`scoped`); else it is read here from `access` and `collections`."""
        query = check_query(query)
        top_k = top_k or self.settings.retrieval_top_k
        if not 1 <= top_k <= 100:
            raise BadRequest("top_k must be between 1 and 100")
        ranking = self._rank(query, self._scope_of(access, collections, scope))
        limit = max(top_k, self.settings.rerank_candidates) if self.settings.reranker_model_path else top_k
        hits = self._hits(ranking.ids[:limit], ranking.fused, dict(ranking.dense), ranking.keyword)
        if self.settings.reranker_model_path and hits:
            hits = self._rerank(query, hits)
        return hits[:top_k]

    def rank(
        self,
        query: str,
        access: Access,
        collections: list[str] | None = None,
        *,
        dense_candidates: int | None = None,
        keyword_candidates: int | None = None,
    ) -> Ranking:
        """The vector, BM25 and fused rankings of all candidates (what `search` cuts to top-k; `appliance
        eval` reads all three). Candidate counts default to the settings."""
        query = check_query(query)
        return self._rank(query, self.scoped(access, collections), dense_candidates, keyword_candidates)

    def _scope_of(self, access: Access, collections: list[str] | None, scope: SearchScope | None) -> SearchScope:
        if scope is None:
            return self.scoped(access, collections)
        if scope.access is not access:
            raise ValueError("a search scope belongs to one caller's access")  # a programming error, never input
        return scope

    def _rank(
        self,
        query: str,
        scope: SearchScope,
        dense_candidates: int | None = None,
        keyword_candidates: int | None = None,
    ) -> Ranking:
        if scope.empty:
            return Ranking([], [], {})
        in_memory = "memory" in (self.settings.vector_search, self.settings.keyword_search)
        permitted = scope.permitted if in_memory else _UNREAD
        vector = self.embedder.encode([query]).vectors[0]
        access, collections = scope.access, scope.collections
        dense_limit = dense_candidates or self.settings.dense_candidates
        dense = self.dense_search(vector, access, collections, dense_limit, permitted=permitted)
        keyword = self.keyword_search_in(query, scope, keyword_candidates or self.settings.keyword_candidates)
        fused = fuse(
            [([c for c, _ in dense], self.settings.dense_weight), (keyword, self.settings.keyword_weight)],
            self.settings.rrf_k,
        )
        return Ranking(dense, keyword, fused)

    def dense_search(
        self, vector, access: Access, scope: list[str] | None, limit: int, *, permitted=_UNREAD
    ) -> list[tuple[str, float]]:
        """(chunk id, cosine similarity), best first, among the chunks the caller may read. `permitted`: what
        `permitted_documents` gives for this access and scope, when the caller has read it already."""
        if self.settings.vector_search == "memory":
            if permitted is _UNREAD:
                permitted = self.permitted_documents(access, scope)
            return self.mirror.search(vector, permitted, limit)
        where = vector_filter(access, scope)
        result = self.index.vectors.query(
            query_embeddings=[vector.tolist()], n_results=limit, where=where, include=["distances"]
        )
        ids, distances = result["ids"][0], result["distances"][0]
        return [(chunk_id, 1.0 - float(distance)) for chunk_id, distance in zip(ids, distances, strict=True)]

    def permitted_documents(self, access: Access, scope: list[str] | None) -> list[str] | None:
        """Ids of the indexed documents the caller may read within `scope`; None: every document."""
        if access.unrestricted() and scope is None:
            return None
        conditions, params, binds = _permission_sql(access, scope, self.index.engine.dialect.name)
        statement = sql(f"SELECT d.id FROM document AS d WHERE {' AND '.join(conditions)}").bindparams(*binds)  # noqa: S608
        with session(self.index.engine) as db:
            return [row[0] for row in db.exec(statement, params=params)]

    def keyword_search(
        self,
        query: str,
        access: Access,
        scope: list[str] | None,
        limit: int,
        *,
        permitted=_UNREAD,
        counted=_UNREAD,
    ) -> list[str]:
        """Chunk ids by BM25, best first, among the chunks the caller may read (`permitted` as for
        `dense_search`). Near-universal query words are left out (`_selective_words`). In memory, BM25's term
        statistics count every chunk the caller may read and nothing else (`counted_documents`; `counted`:
        what it gives, when the caller has read it already)."""
        if self.settings.keyword_search == "memory":
            if permitted is _UNREAD:
                permitted = self.permitted_documents(access, scope)
            if counted is _UNREAD:
                counted = self.counted_documents(access, scope, permitted)
            words, max_df = query_words(query), self.settings.keyword_max_df
            return self.keywords.search(words, permitted, limit, max_df, counted=counted, misspelt=self.misspelt)
        with session(self.index.engine) as db:
            words = self._selective_words(db, query_words(query), limit)
            if not words:
                return []
            conditions, params, binds = _permission_sql(access, scope)
            params.update(match=match_expression(words), limit=limit)
            statement = sql(
                f"SELECT f.chunk_id FROM {FTS_TABLE} AS f JOIN document AS d ON d.id = f.document_id "  # noqa: S608
                f"WHERE {FTS_TABLE} MATCH :match AND {' AND '.join(conditions)} ORDER BY f.rank LIMIT :limit"
            ).bindparams(*binds)
            return [row[0] for row in db.exec(statement, params=params)]

    def keyword_search_in(self, query: str, scope: SearchScope, limit: int) -> list[str]:
        """`keyword_search` within a question's scope, whose documents are read once for all its searches."""
        if self.settings.keyword_search == "memory":
            read = {"permitted": scope.permitted, "counted": scope.counted}
            return self.keyword_search(query, scope.access, scope.collections, limit, **read)
        return self.keyword_search(query, scope.access, scope.collections, limit)

    @cached_property
    def _dictionary(self) -> frozenset[str]:
        path = getattr(self.embedder, "path", None)
        return dictionary_words(path) if path is not None else frozenset()

    def misspelt(self, word: str) -> bool:
        """Whether a (lower-case) query word may be a typing error: a word of no dictionary the embedding model
        knows, even with a plural or verb ending taken off. Never, when typo tolerance is off or there is none."""
        if not self.settings.keyword_typos or not self._dictionary:
            return False
        forms = {word, word.removesuffix("s"), word.removesuffix("es"), word.removesuffix("ed")}
        forms |= {word.removesuffix("ing"), word.removesuffix("ing") + "e"}
        return not forms & self._dictionary

    def counted_documents(
        self, access: Access, scope: list[str] | None, permitted: list[str] | None
    ) -> list[str] | None:
        """The documents BM25's statistics count for this caller: those a search of every collection they may
        read reaches (`permitted` when `scope` is that already). Never more, or how their own passages rank
        would tell them about documents they may not read (issue 18, finding 5); not only the scope, so that
        a search of some collections ranks their passages as a search of all does."""
        everywhere = self.scope(access, None)
        return permitted if scope == everywhere else self.permitted_documents(access, everywhere)

    def _selective_words(self, db, words: list[str], limit: int) -> list[str]:
        """The query words without the near-universal ones: those in more than `keyword_max_df` of all chunks
        and in more than ten times `limit` chunks, as long as a rarer word remains. BM25 gives such words
        almost no weight, yet every chunk that holds one must be ranked, which is most of the cost of the
        query on a large index; on a small one nothing is left out. (FTS5 only: the in-memory index applies
        the same rule itself.)"""
        if self.settings.keyword_max_df >= 1 or len(words) < 2:
            return words
        ceiling = max(self.settings.keyword_max_df * self._chunk_count(db), 10 * limit)
        frequency = document_frequencies(db, words)
        rare = [w for w in words if frequency.get(w, 0) <= ceiling]
        return rare or words

    def _chunk_count(self, db) -> int:
        generation = db.exec(sql("SELECT generation FROM indexstate WHERE id = 1")).scalar() or 0
        if self._counted[0] != generation:
            self._counted = (generation, db.exec(sql("SELECT count(*) FROM chunk")).scalar() or 0)
        return self._counted[1]

    def _hits(
        self, chunk_ids: list[str], fused: dict[str, float], dense: dict[str, float], keyword: list[str]
    ) -> list[Hit]:
        if not chunk_ids:
            return []
        keyword_rank = {chunk_id: rank for rank, chunk_id in enumerate(keyword, start=1)}
        dense_rank = {chunk_id: rank for rank, chunk_id in enumerate(dense, start=1)}
        with session(self.index.engine) as db:
            rows = db.exec(
                select(Chunk, Document)
                .join(Document, Document.id == Chunk.document_id)
                .where(Chunk.id.in_(chunk_ids), Document.status == "indexed")  # type: ignore[attr-defined]
            ).all()
        found = {chunk.id: (chunk, document) for chunk, document in rows}
        hits = []
        for chunk_id in chunk_ids:
            if chunk_id not in found:
                continue  # removed between the searches and now
            chunk, document = found[chunk_id]
            hits.append(
                Hit(
                    chunk_id=chunk.id,
                    document_id=document.id,
                    collection=document.collection,
                    title=document.filename,
                    source=document.filename,
                    page=chunk.page,
                    section=" > ".join(chunk.headings),
                    text=chunk.text,
                    start=chunk.start,
                    end=chunk.end,
                    score=fused[chunk_id],
                    similarity=dense.get(chunk_id),
                    dense_rank=dense_rank.get(chunk_id),
                    keyword_rank=keyword_rank.get(chunk_id),
                )
            )
        return hits

    # --- re-ranking --------------------------------------------------------------------------
    def _rerank(self, query: str, hits: list[Hit]) -> list[Hit]:
        model = self._load_reranker()
        pairs = [(query, hit.text) for hit in hits]
        scores = self.embedder.call(lambda: model.predict(pairs, show_progress_bar=False))
        for hit, score in zip(hits, scores, strict=True):
            hit.score = float(score)
        return sorted(hits, key=lambda h: h.score, reverse=True)

    def _load_reranker(self):
        with self._reranker_lock:
            if self._reranker is None:
                path = Path(self.settings.reranker_model_path)
                if not (path / "config.json").is_file():
                    raise BadRequest(f"APPLIANCE_RERANKER_MODEL_PATH: no model in '{path}' (config.json missing)")
                from sentence_transformers import CrossEncoder

                from appliance.retrieval.embeddings import prepare_offline_hub

                prepare_offline_hub()
                self._reranker = CrossEncoder(str(path), device="cpu", local_files_only=True)
            return self._reranker


def _permission_sql(access: Access, scope: list[str] | None, dialect: str = "sqlite") -> tuple[list[str], dict, list]:
    """SQL conditions on `document AS d` that admit only indexed documents the caller may read within
    `scope`: (conditions, parameters, expanding bind parameters). The read rule is `rbac.read_rule_sql`."""
    conditions = ["d.status = 'indexed'"]
    params: dict = {}
    binds = []
    if scope is not None:
        conditions.append("d.collection IN :collections")
        params["collections"] = scope
        binds.append(bindparam("collections", expanding=True, type_=String))
    readable, read_params, read_binds = read_rule_sql(access, dialect, "d")
    return conditions + readable, params | read_params, binds + read_binds


def vector_filter(access: Access, scope: list[str] | None) -> dict | None:
    """The Chroma `where` that admits only chunks the caller may read, within `scope`."""
    clauses: list[dict] = [{"collection": {"$in": scope}}] if scope is not None else []
    clauses += read_rule_where(access)
    if not clauses:
        return None
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}
