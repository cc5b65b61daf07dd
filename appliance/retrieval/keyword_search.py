"""BM25 keyword search over an in-memory inverted index of the chunk texts, access-filtered like the vector search.

The index is read from the `chunk` table (documents with status 'indexed'), which every process sees, and
follows it through `IndexState.generation` exactly as the vector copy does (vector_search.py): a query that
sees a new generation first patches the index (the rows of documents removed or changed are marked dead,
documents added are read and tokenised into a small set of recent postings, both folded into the main postings
once they grow past a share of them), and a new `rebuilds` count reads everything again.

Text is tokenised as SQLite's FTS5 `porter unicode61` tokenizer does it: runs of letters and digits,
lower-cased, diacritics removed, then the Porter stemmer (tokens under 3 or over 64 bytes are left as they
are). Diacritics go by NFKD, which also folds what FTS5 keeps apart: superscripts ('Ca²' is 'ca2') and
ligatures ('ﬁ' is 'fi'). Scores are FTS5's bm25(): k1 = 1.2, b = 0.75, IDF log((N - n + 0.5) / (n + 0.5))
floored at 1e-6, the document length the chunk's number of tokens; chunks with equal scores come in the
order they were indexed, as FTS5's rowids order them. A query adds up, per query term, the scores of that
term's postings, masks the chunks of documents the caller may not read *before* the top-k is taken (a
passage the caller may not read never takes a place), and returns the best chunk ids: about 2 ms at 100k
chunks, where FTS5 joined to the permitted documents takes 30-70 ms. N, n and the average length count
only the chunks the caller may read (in every collection they may read, not only the searched ones): with
corpus-wide statistics, how a caller's own chunks rank would tell them whether, and how often, documents
they may not read hold a word (issue 18, finding 5). For a caller who may read everything they are FTS5's.
Reading 100k chunks takes about 5 s; the index holds about 60 MB (postings: 6 bytes each; chunk ids; the
vocabulary) and needs about 190 MB while it is built (docs/benchmarks.md). The FTS5 table stays for
`APPLIANCE_KEYWORD_SEARCH=fts`, whose bm25() counts every chunk, readable or not.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import snowballstemmer
from rapidfuzz import process
from rapidfuzz.distance import OSA
from sqlalchemy import String, bindparam
from sqlalchemy import text as sql
from sqlmodel import select

from appliance.db import Document, session
from appliance.retrieval.vector_search import IndexCopy, readable_rows

log = logging.getLogger(__name__)

K1 = 1.2  # FTS5's bm25() constants
B = 0.75
MIN_IDF = 1e-6  # FTS5 floors the IDF of a term found in more than half of all rows here
STEM_BYTES = (3, 64)  # FTS5's porter tokenizer stems tokens of 3 to 64 bytes only
MAX_COUNT = np.iinfo(np.uint16).max  # term counts are kept as uint16 (BM25 is flat long before this)
READ_DOCUMENTS = 500  # documents whose chunks are read per query when loading or patching the index
TOKENISE_CHUNKS = 5000  # chunks tokenised into one block of postings (bounds the memory a block takes)
PLACE_POSTINGS = 1 << 20  # postings put in their place at a time when grouping blocks by term
# A document added between two queries goes into the recent postings, and one removed has its rows marked dead,
# until the recent rows pass this share of the main rows or the dead rows this share of all rows: then
# everything is folded into one main set of postings (at 100k chunks ~0.4 s, against ~0.02 s for a patch).
RECENT_SHARE = 0.05
DEAD_SHARE = 0.1
_DOCUMENTS = object()  # `KeywordMirror.search` counts its statistics over the documents it searches
# A misspelt query word ("expences") stands for the closest term the caller's chunks hold, within one edit (two
# for terms of TYPO_LONG_STEM letters or more; a swap of two letters is one edit), if its stem has at least
# TYPO_MIN_STEM letters: shorter stems are one edit from too many other words.
TYPO_MIN_STEM = 5
TYPO_LONG_STEM = 8
_TOKEN = re.compile(r"[^\W_]+")  # letters and digits (unicode61: categories L* and N*; '_' separates)

_stemmer = snowballstemmer.stemmer("porter")
_stemmer_lock = threading.Lock()  # a snowball stemmer keeps its word in the object
_DOUBLES = {c + c for c in "chjkqvwx"}  # double consonants snowball's porter leaves and FTS5's undoes


def term(token: str) -> str:
    """The indexed form of one token: lower-cased, diacritics removed, Porter-stemmed."""
    word = token.lower()
    if not word.isascii():
        word = "".join(c for c in unicodedata.normalize("NFKD", word) if not unicodedata.combining(c))
    if not STEM_BYTES[0] <= len(word.encode()) <= STEM_BYTES[1]:
        return word
    with _stemmer_lock:
        stem = _stemmer.stemWord(word)
    return _as_fts5(word, stem)


def _as_fts5(word: str, stem: str) -> str:
    """Snowball's porter stem of `word` made what FTS5's porter tokenizer gives.

    Snowball's 'porter' is the 1980 algorithm. FTS5's, like Porter's own later C version:
      * undoes any double consonant but l, s and z that taking off 'ed' or 'ing' leaves in step 1b (snowball
        only bb dd ff gg mm nn pp rr tt);
      * turns a final 'logi' into 'log' and 'bli' (not only 'abli') into 'ble' in step 2, when the rest has a
        measure above 0. Nothing in steps 3-5 touches a word ending so, except what 'ble' leads to: step 4
        takes 'ible' off (measure above 1), step 5 the final 'e' (the rest's measure is above 0 and it ends
        in 'bl'). A stem that ends so because step 5 took an 'e' off is left alone.
    Checked against FTS5 on 212k distinct words: the same terms but for 'eed', 'ies' and 'sses' themselves."""
    if word[len(stem) :] in ("ed", "ing") and stem[-2:] in _DOUBLES:
        return stem[:-1]
    if word.endswith("e"):
        return stem
    if stem.endswith("logi") and _measure(stem[:-4]) > 0:
        return stem[:-1]
    if stem.endswith("bli") and _measure(stem[:-3]) > 0:
        if stem.endswith("ibli") and _measure(stem[:-4]) > 1:
            return _step5(stem[:-4])
        return stem[:-1]
    return stem


def _measure(stem: str) -> int:
    """Porter's m: the number of vowel-consonant sequences (y is a vowel after a consonant)."""
    forms, vowel = [], False
    for n, c in enumerate(stem):
        vowel = c in "aeiou" or (c == "y" and n > 0 and not vowel)
        forms.append("v" if vowel else "c")
    return "".join(forms).count("vc")


def _step5(stem: str) -> str:
    """Porter's step 5: a final 'e' goes (measure above 1, or 1 and no consonant-vowel-consonant before it, the
    last not w, x or y), then a final 'll' loses an 'l' (measure above 1)."""
    if stem.endswith("e"):
        rest = stem[:-1]
        m = _measure(rest)
        cvc = len(rest) >= 3 and _measure(rest[-3:]) == 1 and rest[-3] not in "aeiou" and rest[-1] not in "wxy"
        if m > 1 or (m == 1 and not cvc):
            stem = rest
    if stem.endswith("ll") and _measure(stem) > 1:
        stem = stem[:-1]
    return stem


def tokens(text: str) -> list[str]:
    """The tokens of a text, as found (not yet lower-cased or stemmed)."""
    return _TOKEN.findall(text)


class Vocabulary(dict):
    """Token as found in a text -> id of its term; the terms themselves in `terms` (term -> id).

    Ids are only ever added, so a snapshot's postings stay valid for the terms it knows (ids below its
    number of terms); a full reload starts a new vocabulary. Written under the mirror's lock only."""

    def __init__(self):
        super().__init__()
        self.terms: dict[str, int] = {}

    def __missing__(self, token: str) -> int:
        word = term(token)
        ident = self.terms.setdefault(word, len(self.terms))
        self[token] = ident
        return ident

    def ids(self, text: str) -> list[int]:
        """Term ids of the text's tokens, in order (new terms are added)."""
        return list(map(self.__getitem__, tokens(text)))

    def known(self, token: str) -> int | None:
        """The id of a token's term, or None when no indexed text holds the term (nothing is added)."""
        ident = self.get(token)
        return ident if ident is not None else self.terms.get(term(token))


@dataclass(frozen=True)
class _Postings:
    """Postings grouped by term: those of term t are entries starts[t]:starts[t + 1] of `rows` and `counts`."""

    starts: np.ndarray  # int64, one more than the terms known when it was built
    rows: np.ndarray  # int32, one per posting
    counts: np.ndarray  # uint16, occurrences of the term in the row, one per posting

    def of(self, term_id: int) -> tuple[np.ndarray, np.ndarray]:
        if term_id >= len(self.starts) - 1:
            return self.rows[:0], self.counts[:0]
        begin, end = self.starts[term_id], self.starts[term_id + 1]
        return self.rows[begin:end], self.counts[begin:end]

    def block(self) -> _Block:
        terms = np.repeat(np.arange(len(self.starts) - 1, dtype=np.int32), np.diff(self.starts))
        return _Block(terms, self.rows, self.counts)

    @property
    def nbytes(self) -> int:
        return self.starts.nbytes + self.rows.nbytes + self.counts.nbytes


NO_POSTINGS = _Postings(np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.uint16))


@dataclass(frozen=True)
class _Snapshot:
    """One consistent state of the index: row i is chunk ids[i] of document documents[row_document[i]], with
    lengths[i] tokens, counted only while alive[i]. The postings of rows below `main_rows` are in `main`; those
    of rows added since (`recent`) are kept apart, so that a document added costs a rebuild of the recent
    postings only, and a document removed only marks its rows dead; both are folded into `main` once they
    grow past a share of it (`RECENT_SHARE`, `DEAD_SHARE`)."""

    generation: tuple[int, int]  # (generation, rebuilds) of IndexState when taken
    vocabulary: Vocabulary
    ids: list[str]
    row_document: np.ndarray  # int32, one per row
    documents: list[str]  # document ids, by index
    lengths: np.ndarray  # int32, tokens per row
    alive: np.ndarray  # bool, one per row
    main_rows: int
    main: _Postings
    recent: _Postings

    @cached_property
    def document_index(self) -> dict[str, int]:
        return {document_id: n for n, document_id in enumerate(self.documents)}

    @cached_property
    def live(self) -> int:
        return int(self.alive.sum())

    @cached_property
    def average_length(self) -> float:
        """The average length of the live rows."""
        return float(self.lengths[self.alive].mean()) if self.live else 1.0

    @cached_property
    def wide_lengths(self) -> np.ndarray:
        """`lengths` as int64: summed over any rows without overflow."""
        return self.lengths.astype(np.int64)

    def counted(self, documents: list[str] | None) -> tuple[np.ndarray | None, int, float]:
        """The live rows of `documents` (one bool per row; None: all live rows), their number and their average
        length: what BM25's statistics count."""
        if documents is None:
            return None, self.live, self.average_length
        rows = readable_rows(self, documents) & self.alive
        total = int(np.count_nonzero(rows))
        return rows, total, int(np.dot(self.wide_lengths, rows)) / total if total else 1.0

    def postings(self, term_id: int, among: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Rows holding the term and its count in each, in row order: the live rows, or those `among` marks
        (one bool per row, live rows only)."""
        main_rows, main_counts = self.main.of(term_id)
        recent_rows, recent_counts = self.recent.of(term_id)
        rows = np.concatenate((main_rows, recent_rows)) if len(recent_rows) else main_rows
        counts = np.concatenate((main_counts, recent_counts)) if len(recent_rows) else main_counts
        if among is None and self.live == len(self.ids):
            return rows, counts
        keep = (self.alive if among is None else among)[rows]
        return rows[keep], counts[keep]

    def live_ids(self) -> list[str]:
        return [chunk_id for chunk_id, alive in zip(self.ids, self.alive, strict=True) if alive]

    @property
    def nbytes(self) -> int:
        arrays = (self.row_document, self.lengths, self.alive)
        return sum(a.nbytes for a in arrays) + self.main.nbytes + self.recent.nbytes


def _empty(generation: tuple[int, int], vocabulary: Vocabulary) -> _Snapshot:
    none = np.zeros(0, dtype=np.int32)
    return _Snapshot(generation, vocabulary, [], none, [], none, np.zeros(0, dtype=bool), 0, NO_POSTINGS, NO_POSTINGS)


EMPTY = _empty((-1, -1), Vocabulary())


class KeywordMirror(IndexCopy):
    def __init__(self, index):
        super().__init__(index, EMPTY)

    def search(
        self,
        query: str | Sequence[str],
        documents: list[str] | None,
        limit: int,
        max_df: float = 1.0,
        *,
        counted: list[str] | None | object = _DOCUMENTS,
        misspelt: Callable[[str], bool] | None = None,
    ) -> list[str]:
        """Chunk ids by BM25, best first, among the chunks of `documents` (None: all), scored with the term
        statistics (N, n) and average length of the chunks of `counted` alone (by default `documents`; None:
        all). `counted` must hold `documents`.

        `query` is a text or its words (each word one FTS5 phrase: a term that two words share counts twice,
        as in FTS5). With `max_df` below 1, terms found in more than that fraction of the counted chunks and in
        more than ten times `limit` of them are left out, as long as a rarer term remains.

        `misspelt`: which query words may be typing errors (words of no dictionary, say). Such a word that no
        counted chunk holds is searched as the closest term one does (`_nearest`); without it (FTS5's way) it
        matches nothing."""
        snapshot = self.current()
        if not snapshot.live or limit <= 0:
            return []
        if counted is _DOCUMENTS:
            counted = documents
        among, total, average = snapshot.counted(counted)
        if not total:
            return []
        words = tokens(query) if isinstance(query, str) else [t for word in query for t in tokens(word)]
        found = []
        for word in dict.fromkeys(w.lower() for w in words):
            ident = snapshot.vocabulary.known(word)
            postings = snapshot.postings(ident, among) if ident is not None else None
            if (postings is None or not len(postings[0])) and misspelt is not None and misspelt(word):
                nearest = self._nearest(snapshot, word, among)
                postings = snapshot.postings(nearest, among) if nearest is not None else postings
            if postings is not None:
                found.append(postings)
        found = [(rows, counts) for rows, counts in found if len(rows)]
        if max_df < 1 and len(found) > 1:
            ceiling = max(max_df * total, 10 * limit)
            found = [(rows, counts) for rows, counts in found if len(rows) <= ceiling] or found
        if not found:
            return []
        weights = []
        for rows, counts in found:
            idf = max(math.log((total - len(rows) + 0.5) / (len(rows) + 0.5)), MIN_IDF)
            count = counts.astype(np.float64)
            length_norm = K1 * (1 - B + B * snapshot.lengths[rows] / (average or 1.0))
            weights.append(idf * count * (K1 + 1) / (count + length_norm))
        scores = np.bincount(
            np.concatenate([rows for rows, _ in found]), weights=np.concatenate(weights), minlength=len(snapshot.ids)
        )
        matched = np.flatnonzero(scores)
        if documents is not None and documents is not counted:
            matched = matched[readable_rows(snapshot, documents)[matched]]
        best = scores[matched]
        if len(matched) > limit:  # everything scoring at least the limit-th best, then exact order
            keep = best >= np.partition(best, len(best) - limit)[len(best) - limit]
            matched, best = matched[keep], best[keep]
        order = np.lexsort((matched, -best))[:limit]  # ties: the row read first (indexed first)
        return [snapshot.ids[row] for row in matched[order]]

    def _nearest(self, snapshot: _Snapshot, word: str, among: np.ndarray | None) -> int | None:
        """The id of the term closest in spelling to `word`'s that the counted chunks hold (the most often held
        among equally close ones), or None. Only the counted chunks decide: what the caller may not read
        changes nothing."""
        stem = term(word)
        if len(stem) < TYPO_MIN_STEM or not stem.isalpha():
            return None
        with self._lock:  # the vocabulary grows under this lock
            names = list(snapshot.vocabulary.terms)
        cutoff = 1 if len(stem) < TYPO_LONG_STEM else 2
        near = process.extract(stem, names, scorer=OSA.distance, score_cutoff=cutoff, limit=None)
        best: tuple[int, int, str] | None = None  # (distance, -chunks holding it, term)
        chosen = None
        for name, distance, ident in near:
            rows, _counts = snapshot.postings(ident, among)
            if distance and len(rows) and (best is None or (distance, -len(rows), name) < best):
                best, chosen = (distance, -len(rows), name), ident
        return chosen

    def _patched(self, old: _Snapshot, generation: tuple[int, int]) -> _Snapshot:
        with session(self.index.engine) as db:
            rows = db.exec(
                select(Document.id, Document.chunk_count, Document.created_at).where(Document.status == "indexed")
            ).all()
        counts = {document_id: count for document_id, count, _ in rows}
        # Documents are read in the order they were indexed: chunks with equal scores then come in the order
        # FTS5 gives them (its rowids), as long as the index was not rebuilt.
        created = {document_id: (at, document_id) for document_id, _, at in rows}
        if not old.live or generation[1] != old.generation[1]:
            snapshot = self._read(_empty(generation, Vocabulary()), sorted(counts, key=created.get))
            log.info(
                "keyword index loaded: %d chunks of %d documents, %d terms, %.0f MB",
                len(snapshot.ids),
                len(snapshot.documents),
                len(snapshot.vocabulary.terms),
                snapshot.nbytes / 1e6,
            )
            return snapshot
        gone, added = self._changes(old, counts)
        new = sorted(added, key=created.get)
        if not gone and not new:
            return replace(old, generation=generation)
        alive = self._alive_without(old, gone)
        recent = len(old.ids) - old.main_rows + sum(counts[d] for d in new)
        if recent > RECENT_SHARE * old.main_rows or len(alive) - alive.sum() > DEAD_SHARE * len(alive):
            snapshot = self._read(self._compacted(old, alive, generation), new)
            how = "folded in"
        else:  # the rows of the gone documents are only marked dead: their postings stay until folded
            snapshot = self._read(replace(old, generation=generation, alive=alive), new, recent=True)
            how = "patched"
        log.info("keyword index %s: -%d +%d documents, %d chunks", how, len(gone), len(new), snapshot.live)
        return snapshot

    @classmethod
    def _compacted(cls, old: _Snapshot, keep: np.ndarray, generation: tuple[int, int]) -> _Snapshot:
        """The snapshot with only the rows `keep` marks, all postings in `main`; survivors are renumbered in order,
        and a document left with no row leaves no entry behind (it may come back)."""
        postings = old.main
        if len(old.recent.rows):
            postings = _Postings(*_grouped([old.main.block(), old.recent.block()], len(old.vocabulary.terms)))
        ids, row_document, documents = cls._survivors(old, keep)
        new_row = (np.cumsum(keep) - 1).astype(np.int32)
        kept = keep[postings.rows]
        terms = np.repeat(np.arange(len(postings.starts) - 1), np.diff(postings.starts))[kept]
        starts = np.zeros(len(postings.starts), dtype=np.int64)
        np.cumsum(np.bincount(terms, minlength=len(postings.starts) - 1), out=starts[1:])
        return _Snapshot(
            generation,
            old.vocabulary,
            ids,
            row_document,
            documents,
            old.lengths[keep],
            np.ones(len(ids), dtype=bool),
            len(ids),
            _Postings(starts, new_row[postings.rows[kept]], postings.counts[kept]),
            NO_POSTINGS,
        )

    def _read(self, base: _Snapshot, new: list[str], *, recent: bool = False) -> _Snapshot:
        """The snapshot `base` with the chunks of the `new` documents read, tokenised and added: to its recent
        postings, or (`base` having none) to its main postings."""
        assert recent or not len(base.recent.rows), "rows join main only after every recent row"
        vocabulary = base.vocabulary
        documents, ids = list(base.documents), list(base.ids)
        lookup = {d: n for n, d in enumerate(documents)}
        row_document, lengths = [base.row_document], [base.lengths]
        extended = base.recent if recent else base.main
        blocks = [extended.block()]
        statement = sql(
            "SELECT c.id, c.document_id, c.text FROM chunk AS c JOIN document AS d ON d.id = c.document_id "
            "WHERE c.document_id IN :documents ORDER BY d.created_at, c.document_id, c.position"
        ).bindparams(bindparam("documents", expanding=True, type_=String))
        with session(self.index.engine) as db:
            for begin in range(0, len(new), READ_DOCUMENTS):
                result = db.exec(statement, params={"documents": new[begin : begin + READ_DOCUMENTS]}).all()
                for first in range(0, len(result), TOKENISE_CHUNKS):
                    first_row, block_documents, block_terms = len(ids), [], []
                    for chunk_id, document_id, text in result[first : first + TOKENISE_CHUNKS]:
                        if document_id not in lookup:
                            lookup[document_id] = len(documents)
                            documents.append(document_id)
                        ids.append(chunk_id)
                        block_documents.append(lookup[document_id])
                        block_terms.append(vocabulary.ids(text))
                    blocks.append(_Block.of(block_terms, first_row))
                    row_document.append(np.array(block_documents, dtype=np.int32))
                    lengths.append(np.array([len(t) for t in block_terms], dtype=np.int32))
        postings = _Postings(*_grouped(blocks, len(vocabulary.terms)))
        added = len(ids) - len(base.ids)
        return replace(
            base,
            ids=ids,
            row_document=np.concatenate(row_document),
            documents=documents,
            lengths=np.concatenate(lengths),
            alive=np.concatenate((base.alive, np.ones(added, dtype=bool))),
            main_rows=base.main_rows if recent else len(ids),
            main=base.main if recent else postings,
            recent=postings if recent else base.recent,
        )


@dataclass
class _Block:
    """Postings of consecutive rows, sorted by term: one per (term, row) pair."""

    terms: np.ndarray  # int32
    rows: np.ndarray  # int32
    counts: np.ndarray  # uint16

    @staticmethod
    def of(row_terms: list[list[int]], first_row: int) -> _Block:
        """The postings of rows `first_row`, `first_row` + 1, ... holding these term ids."""
        lengths = np.array([len(t) for t in row_terms], dtype=np.int64)
        terms = np.fromiter((t for row in row_terms for t in row), dtype=np.int64, count=int(lengths.sum()))
        rows = np.repeat(np.arange(len(row_terms), dtype=np.int64), lengths)
        pairs, counts = np.unique(terms * len(row_terms) + rows, return_counts=True)  # sorted by term, then row
        return _Block(
            (pairs // len(row_terms)).astype(np.int32),
            (pairs % len(row_terms) + first_row).astype(np.int32),
            np.minimum(counts, MAX_COUNT).astype(np.uint16),
        )


def _grouped(blocks: list[_Block], term_count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The postings of all blocks grouped by term: (starts, rows, counts) as `_Snapshot` holds them. Within a
    term, postings follow in block order. A counting sort: each posting is put in its place, a slice at a time
    (no argsort of all postings, whose index array alone would be 8 bytes a posting)."""
    sizes = [np.bincount(block.terms, minlength=term_count) for block in blocks]
    starts = np.zeros(term_count + 1, dtype=np.int64)
    np.cumsum(np.sum(sizes, axis=0, dtype=np.int64), out=starts[1:])
    rows = np.empty(starts[-1], dtype=np.int32)
    counts = np.empty(starts[-1], dtype=np.uint16)
    filled = starts[:-1].copy()  # where the next posting of each term goes
    for block, size in zip(blocks, sizes, strict=True):
        offset = filled - (np.cumsum(size) - size)  # posting i of the block, of term t, goes to offset[t] + i
        for begin in range(0, len(block.terms), PLACE_POSTINGS):
            end = min(begin + PLACE_POSTINGS, len(block.terms))
            place = offset[block.terms[begin:end]] + np.arange(begin, end)
            rows[place] = block.rows[begin:end]
            counts[place] = block.counts[begin:end]
        filled += size
    return starts, rows, counts
