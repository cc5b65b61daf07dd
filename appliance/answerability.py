"""Does a retrieved passage answer the question? Checked on the question's own words before any answer.

Similarity alone cannot tell: every passage of a hospital's documents names the hospital, so a question about
its car parking finds passages close to it that say nothing about parking. So the question's terms are
weighed by how rare they are among the documents the caller may read, and a passage must hold most of that
weight:

* terms: the question's words, lower-cased and stemmed as the keyword index stems them (FTS5's Porter), less
  stop words, verbs and modals that only frame a question, the word after "how" (how long, how many), and
  the irregular participle of a passive question (records are *kept*, bills must be *paid*: documents say
  retained, payable);
* weight of a term: ln((N + 1) / (n + 0.5)), N the documents the caller may read in the searched collections
  and n those that hold the term. A term in nearly every document (the organisation's own name) weighs
  nearly nothing, a term in none the most;
* a passage supports the question when its text, section headings and title hold at least `min_coverage`
  of the question's weight; or, for a question put in other words than the documents use, when it is close
  in meaning (cosine similarity at least `close_similarity`) and holds a distinctive term of the question:
  one that at most half of the readable documents hold, and not a name (capitalised in the question). Names
  of the organisation, its people and places recur across documents and pull their embeddings together.

The question is answerable when a retrieved passage supports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sqlalchemy import func
from sqlmodel import select

from appliance.citations import STOPWORDS
from appliance.db import Document, session
from appliance.keyword_search import term, tokens
from appliance.rbac import Access
from appliance.retrieve import Hit, Retriever

# Words that frame a question without naming what it is about.
FRAMING = frozenset(
    """must may might shall within without per every behind across via upon onto towards whether also
    get gets got give gives gave given take takes took taken come comes came goes went see sees saw seen
    need needs needed use uses used using make makes made tell know""".split()
)
BE = frozenset("is are was were be been being".split())
PARTICIPLES = frozenset(  # irregular: the stemmer cannot bring them back to their verb
    """kept held paid sent given taken made done seen known told found left put set brought bought built chosen
    drawn met said shown sold spent worn written""".split()
)
SEARCH_LIMIT = 100_000  # chunks read per term when counting the documents that hold it


@dataclass
class Support:
    """The passages that support a question (in rank order), and each retrieved passage's coverage."""

    hits: list[Hit]
    coverage: dict[str, float]  # chunk id -> share of the question's weight the passage holds


def question_terms(text: str) -> dict[str, str]:
    """The terms of a question (stem -> the word as asked), in order, without the words that only frame it."""
    words = [w.lower() for w in tokens(text)]
    found: dict[str, str] = {}
    for position, word in enumerate(words):
        if position and words[position - 1] == "how":
            continue  # how long, how many, how often: the kind of answer, not its subject
        if word in STOPWORDS or word in FRAMING or (len(word) < 3 and not word.isdigit()):
            continue
        if word in PARTICIPLES and BE.intersection(words[:position]):
            continue
        found.setdefault(term(word), word)
    return found


def passage_terms(hit: Hit) -> set[str]:
    """The stemmed terms of a passage, its section headings and its document's title."""
    return {term(word) for word in tokens(f"{hit.text} {hit.section} {hit.title}")}


def coverage(weights: dict[str, float], held: set[str]) -> float:
    """The share of the weights whose terms are held (1.0 when there is no weight at all)."""
    total = sum(weights.values())
    return sum(w for t, w in weights.items() if t in held) / total if total > 0 else 1.0


def document_frequencies(
    retriever: Retriever, terms: dict[str, str], access: Access, collections: list[str] | None
) -> tuple[int, dict[str, int]]:
    """How many documents the caller may read in the searched collections, and how many of them hold each
    term (through the keyword index, which applies the caller's access)."""
    scope = retriever.scope(access, collections)
    permitted = retriever.permitted_documents(access, scope)
    if permitted is None:
        with session(retriever.index.engine) as db:
            total = db.exec(select(func.count()).select_from(Document).where(Document.status == "indexed")).one()
    else:
        total = len(permitted)
    holding: dict[str, int] = {}
    for stem, word in terms.items():
        chunk_ids = retriever.keyword_search(word, access, scope, SEARCH_LIMIT, permitted=permitted)
        holding[stem] = len({chunk_id.rsplit(":", 1)[0] for chunk_id in chunk_ids})  # ids are <document id>:<n>
    return total, holding


def support(
    retriever: Retriever,
    question: str,
    hits: list[Hit],
    access: Access,
    collections: list[str] | None,
    min_coverage: float,
    close_similarity: float,
) -> Support:
    """The retrieved passages that support the question, in rank order (see the module's docstring)."""
    terms = question_terms(question)
    if min_coverage <= 0 or not terms:
        return Support(list(hits), {hit.chunk_id: 1.0 for hit in hits})
    held = {hit.chunk_id: passage_terms(hit) & terms.keys() for hit in hits}
    if not any(held.values()):
        return Support([], {hit.chunk_id: 0.0 for hit in hits})  # nothing to weigh
    total, holding = document_frequencies(retriever, terms, access, collections)
    weights = {t: math.log((total + 1) / (n + 0.5)) for t, n in holding.items()}
    names = {term(word) for position, word in enumerate(tokens(question)) if position and word[:1].isupper()}
    distinctive = {t for t, n in holding.items() if n <= total / 2} - names
    covered = {hit.chunk_id: coverage(weights, held[hit.chunk_id]) for hit in hits}
    supporting = [
        hit
        for hit in hits
        if covered[hit.chunk_id] >= min_coverage
        or ((hit.similarity or 0.0) >= close_similarity and held[hit.chunk_id] & distinctive)
    ]
    return Support(supporting, covered)
