"""Does a retrieved passage answer the question? Decided before any answer is written, and said why when not.

Similarity of whole passages cannot tell on its own: every passage of a hospital's documents names the
hospital, so a question about its car parking finds passages close to it that say nothing about parking. And
the question's own words cannot tell on their own either: "how long do we hang on to maternity notes" is
answered by "maternity records are retained for 25 years", which holds one of its words. Two ways to decide,
chosen by `APPLIANCE_REFUSAL`:

* `calibrated` (the default): each retrieved passage gets a score, a logistic combination of two signals,
  and the question is answerable when a passage scores at least `APPLIANCE_REFUSAL_MIN_SCORE`:
  - sentence: the cosine similarity of the question to the passage's closest sentence (alone or under its
    heading), the question embedded without the capitalised names that many readable documents share
    (NAME_SHARE: the organisation's own name pulls every passage of its documents closer to every question
    that names it);
  - soft coverage: the share of the question's terms, weighted by rarity (below), that the passage's text,
    headings and title hold, where a term also counts in part when the passage holds a word close to it in
    meaning (the cosine similarity of the two words' embeddings above SOFT_FLOOR: notes ~ records).
  The weights were fitted on public data and the organisations' tune questions (`bench/refusal.py` refits
  and prints them): see WEIGHTS.
* `lexical` (the rule before it): a passage supports the question when it holds at least `min_coverage` of
  the question's weight, or when it is close in meaning (`close_similarity`) and holds one of the
  question's distinctive terms (in at most half of the readable documents, not a capitalised name).

With fewer than FEWEST_DOCUMENTS readable documents in the searched collections the lexical rule decides: no
share of so few documents tells the organisation's name from a subject, and the name, left in the question,
makes every passage of its documents close to it. Either way the best passage must have at least
`min_similarity`, and a question with no terms to search for (only stop words), or whose every term most
readable documents hold or that is left with nothing once its house names are left out (only the
organisation's name), is refused.

Terms: the question's words, lower-cased and stemmed as the keyword index stems them (FTS5's Porter), less
stop words, verbs and modals that only frame a question, the word after "how" (how long, how many), and the
irregular participle of a passive question (records are *kept*). Weight of a term: ln((N + 1) / (n + 0.5)),
N the documents the caller may read in the searched collections and n those that hold the term, so a term in
nearly every document (the organisation's own name) weighs nearly nothing. Only passages the caller may read
ever reach this module, and the counts come through the keyword index with the caller's access.
"""

from __future__ import annotations

import math
import re
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import func
from sqlmodel import select

from appliance.answers import identifiers
from appliance.answers.citations import STOPWORDS, content_words, sentence_spans, sentences
from appliance.config import RetrievalSettings
from appliance.db import Document, session
from appliance.retrieval.keyword_search import term, tokens
from appliance.retrieval.retrieve import Hit, Retriever, SearchScope

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
COMMON_SHARE = 0.5  # a question whose every term more than this share of the readable documents hold is refused
NAME_SHARE = 0.3  # a capitalised word more than this share of them hold is a house name (left out when embedding)
FEWEST_DOCUMENTS = 8  # with fewer readable documents no share is telling: no term counts as common
SOFT_FLOOR = 0.5  # word-embedding cosine below which a word near a question term counts for nothing
PASSAGE_WORDS = 400  # distinct words of a passage compared with the question's terms, at most
# A sentence less similar to the question than this, and holding fewer than two of its terms, is not quoted from a
# passage that passed the gate: "Policy owner: Records Manager." (0.20) does not answer "Who is the managing
# partner?". Set on the sample corpus's golden questions and the evalset tune half.
QUOTE_FLOOR = 0.25
SENTENCE_HEADING_WORDS = 6  # content words from which a heading reads as a sentence, not a title
SENTENCE_CHARS = 600  # a longer "sentence" (a table row, a list without full stops) is cut to this
# An e-mail's header line, its own or a quoted earlier message's; a table row ("Date: 2025-03-07; Hours: 1.7")
# has its cells joined by semicolons and is not one.
MAIL_HEADER = re.compile(r"(?:Subject|From|To|Cc|Bcc|Sent|Date):[^;\n]*", re.IGNORECASE)

# The calibrated score: sigmoid(BIAS + sum of WEIGHTS[name] * signal), a logistic regression fitted on
# retrieved passages labelled "from a document that answers the question" or not, each of four sources weighing
# the same: SciFact `train` (300 claims with their relevant abstracts, the same claims with those abstracts taken
# out of the results, and the sample corpus's questions asked of SciFact), the sample corpus's golden questions,
# bench/refusal_questions.yaml (paraphrases, unanswerable and off-topic questions written for the sample corpus)
# and the tune half of evalset/questions.yaml. The passage's whole-passage similarity and exact coverage were
# measured too and left out: with the other two they added nothing on the organisations' own questions
# (docs/benchmarks.md, "Refusal, calibrated"). Fitted with NAME_SHARE at 0.5 (lowered since, not refitted).
# Refit and print: `python bench/refusal.py --help`.
WEIGHTS = {"sentence": 5.335, "soft_coverage": 2.964}
BIAS = -4.268


@dataclass
class Evidence:
    """One retrieved passage's signals and its calibrated score."""

    hit: Hit
    sentence: float
    similarity: float
    coverage: float
    soft_coverage: float
    score: float = 0.0

    def signals(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in WEIGHTS}


@dataclass
class Support:
    """The passages that support a question (in rank order), each retrieved passage's coverage and score, and
    why the question was refused when none supports it (titles and numbers only, never document text)."""

    hits: list[Hit]
    coverage: dict[str, float]  # chunk id -> share of the question's weight the passage holds
    reason: str = ""
    scores: dict[str, float] = field(default_factory=dict)  # chunk id -> calibrated score (calibrated only)
    closest: Hit | None = None  # refused: the passage the reason names, for the asker to check


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


def term_weights(total: int, holding: dict[str, int]) -> dict[str, float]:
    """Each term's rarity weight, ln((N + 1) / (n + 0.5))."""
    return {t: math.log((total + 1) / (n + 0.5)) for t, n in holding.items()}


def common_terms(total: int, holding: dict[str, int], share: float = COMMON_SHARE) -> set[str]:
    """The terms more than `share` of the readable documents hold (none with fewer than FEWEST_DOCUMENTS)."""
    return {t for t, n in holding.items() if total >= FEWEST_DOCUMENTS and n > share * total}


def document_frequencies(retriever: Retriever, terms: dict[str, str], scope: SearchScope) -> tuple[int, dict[str, int]]:
    """How many documents the caller may read in the searched collections, and how many of them hold each
    term (through the keyword index, which applies the caller's access)."""
    permitted = scope.permitted
    if permitted is None:
        with session(retriever.index.engine) as db:
            total = db.exec(select(func.count()).select_from(Document).where(Document.status == "indexed")).one()
    else:
        total = len(permitted)
    holding: dict[str, int] = {}
    for stem, word in terms.items():
        chunk_ids = retriever.keyword_search_in(word, scope, SEARCH_LIMIT)
        holding[stem] = len({chunk_id.rsplit(":", 1)[0] for chunk_id in chunk_ids})  # ids are <document id>:<n>
    return total, holding


def without_names(question: str, common: set[str]) -> str:
    """The question without its capitalised words whose terms are common (the organisation's own name and the
    like: "St. Brigid's General Hospital"). Empty when no term is left to ask about."""
    kept = []
    for word in question.split():
        parts = tokens(word)
        if not parts:
            continue
        if not (word[:1].isupper() and all(term(p) in common or len(p) < 3 for p in parts)):
            kept.append(word)
    rest = " ".join(kept)
    return rest if question_terms(rest) else ""


# --- embeddings of words and sentences, cached ----------------------------------------------------
class VectorCache:
    """Embeddings of short texts (single words, sentences), least recently used dropped past `capacity`."""

    def __init__(self, embedder, capacity: int):
        self.embedder = embedder
        self.capacity = capacity
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def vectors(self, texts: list[str]) -> np.ndarray:
        """One L2-normalised row per text (float32)."""
        with self._lock:
            missing = [t for t in dict.fromkeys(texts) if t not in self._vectors]
        if missing:
            found = np.asarray(self.embedder.encode(missing).vectors, dtype=np.float32)
            with self._lock:
                for text, vector in zip(missing, found, strict=True):
                    self._vectors[text] = vector.astype(np.float16)
        with self._lock:
            rows = []
            for text in texts:
                vector = self._vectors.get(text)
                if vector is None:  # dropped by a concurrent caller's additions: embed it alone
                    vector = np.asarray(self.embedder.encode([text]).vectors[0], dtype=np.float16)
                else:
                    self._vectors.move_to_end(text)
                rows.append(vector)
            while len(self._vectors) > self.capacity:
                self._vectors.popitem(last=False)
        return np.stack(rows).astype(np.float32) if rows else np.zeros((0, 1), dtype=np.float32)


@dataclass
class _Caches:
    words: VectorCache
    sentences: VectorCache


_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_caches_lock = threading.Lock()


def caches(embedder) -> _Caches:
    """The word and sentence caches of an embedder (one pair per embedder, for its lifetime)."""
    with _caches_lock:
        found = _caches.get(embedder)
        if found is None:
            found = _caches[embedder] = _Caches(VectorCache(embedder, 60_000), VectorCache(embedder, 20_000))
        return found


# --- the signals ----------------------------------------------------------------------------------
def passage_words(hit: Hit) -> list[str]:
    """The distinct content words of a passage, its headings and title, lower-cased (at most PASSAGE_WORDS)."""
    words = dict.fromkeys(w.lower() for w in tokens(f"{hit.title} {hit.section} {hit.text}"))
    content = [w for w in words if len(w) > 2 and w not in STOPWORDS and not w.isdigit()]
    return content[:PASSAGE_WORDS]


def passage_sentences(hit: Hit) -> list[str]:
    """The passage's sentences, each also under its nearest heading ("3. Maternity records: Obstetric and
    midwifery records are retained..."), since a sentence often leaves its subject to the heading above it."""
    found = [s.strip()[:SENTENCE_CHARS] for s in sentences(hit.text) if len(tokens(s)) >= 2]
    found = found or [hit.text[:SENTENCE_CHARS]]
    heading = hit.section.split(" > ")[-1].strip()
    if not heading:
        return found
    return found + [f"{heading}: {s}" for s in found if not s.startswith(heading)]


def evidence(
    embedder, question: str, hits: list[Hit], total: int, holding: dict[str, int], terms: dict[str, str]
) -> list[Evidence]:
    """The signals of each retrieved passage (see the module's docstring), scored."""
    weights = term_weights(total, holding)
    weight = sum(weights.values())
    cache = caches(embedder)
    asked = without_names(question, common_terms(total, holding, NAME_SHARE)) or question
    question_vector = cache.sentences.vectors([asked])[0]
    term_vectors = cache.words.vectors(list(terms.values()))
    found = []
    for hit in hits:
        held = passage_terms(hit) & terms.keys()
        words = passage_words(hit)
        closeness = (term_vectors @ cache.words.vectors(words).T).max(axis=1) if words else np.zeros(len(terms))
        credit = {
            stem: 1.0 if stem in held else max(0.0, (float(close) - SOFT_FLOOR) / (1 - SOFT_FLOOR))
            for stem, close in zip(terms, closeness, strict=True)
        }
        soft = sum(weights[t] * credit[t] for t in terms) / weight if weight > 0 else 1.0
        sentence = float((cache.sentences.vectors(passage_sentences(hit)) @ question_vector).max())
        item = Evidence(hit, sentence, hit.similarity or 0.0, coverage(weights, held), soft)
        item.score = calibrated_score(item.signals())
        found.append(item)
    return found


def closest_sentences(
    embedder, question: str, hit: Hit, count: int = 1, follow_up: str | None = None
) -> list[tuple[int, int]]:
    """Where, in the passage's text, the `count` sentences closest in meaning to the question are (each alone or
    under its heading, as `passage_sentences` compares them), closest first; none when no sentence says
    anything beyond a heading or the question's own words, or is neither as close as QUOTE_FLOOR nor holds two of
    the question's terms nor a date or number it names. Short titles and an e-mail's header lines (MAIL_HEADER)
    are quoted only from a passage that has nothing else. What an answer quotes: the sentence that holds the
    answer is rarely the one that shares most words with the question. When the question names dates or numbers
    ("the entry of 3 March 2025"), the sentences that hold more of them come first, whatever form they are
    written in ("2025-03-03"; `identifiers`): an embedding hardly tells one date from another.

    `follow_up`: when `question` is a follow-up put together with the question before it (what was searched), the
    follow-up's own words. A sentence's closeness is then the geometric mean of its closeness to both: the passage
    was found for the conversation, but the sentence must answer what the follow-up adds ("what about on a
    Sunday?" after "what's the number to book transport?")."""
    headings = {h.strip().lower() for h in hit.section.split(" > ")} if hit.section else set()
    heading = hit.section.split(" > ")[-1].strip()
    asked = set(question_terms(question)) | (set(question_terms(follow_up)) if follow_up else set())
    pointed = identifiers.pointers(f"{question} {follow_up}" if follow_up else question)
    # (start, end, how many of the question's terms the sentence holds, how many of its dates and numbers)
    candidates, heading_lines = [], []
    for start, end in sentence_spans(hit.text):
        sentence = hit.text[start:end]
        held, words = question_terms(sentence).keys(), len(content_words(sentence))
        if words < 2 or not held - asked:
            continue  # a fragment ("3."), or made only of the question's own words (a title): answers nothing
        # A heading as long as a sentence is one: the parser takes any short line without a full stop for a
        # heading ("Order dynamic (air) mattresses from the Equipment Library on extension 4862").
        title = sentence.lower().rstrip(".:") in headings and words < SENTENCE_HEADING_WORDS
        # An e-mail's "From:"/"Subject:" lines hold the names and subject a question repeats, not its answer.
        lines = heading_lines if title or MAIL_HEADER.fullmatch(sentence) else candidates
        named = pointed.held_by(identifiers.pointers(sentence)) if pointed else 0
        lines.append((start, end, len(asked & held), named))
    # A title repeated at the top of a passage says nothing, unless the passage is nothing but titles (lines
    # without full stops that the parser took for headings).
    candidates = candidates or heading_lines
    if not candidates:
        return []
    cache = caches(embedder).sentences
    texts = [hit.text[start:end][:SENTENCE_CHARS] for start, end, *_held in candidates]
    vectors = cache.vectors(texts + [f"{heading}: {t}" for t in texts] if heading else texts)
    asked_vectors = cache.vectors([question, follow_up] if follow_up else [question])
    # Close to both (a geometric mean): the one closest to the conversation as a whole is about its first question.
    closeness = (
        np.sqrt(np.clip(vectors @ asked_vectors.T, 0.0, None).prod(axis=1)) if follow_up else vectors @ asked_vectors[0]
    )
    if heading:
        closeness = np.maximum(closeness[: len(texts)], closeness[len(texts) :])
    # Those holding more of the question's dates and numbers first, then the closest in meaning.
    closest = sorted(range(len(candidates)), key=lambda i: (-candidates[i][3], -closeness[i]))[:count]
    # Close in meaning, or holding two of the question's own terms (a table row) or a date or number it names.
    return [
        candidates[i][:2]
        for i in closest
        if closeness[i] >= QUOTE_FLOOR or candidates[i][2] >= 2 or candidates[i][3] > 0
    ]


def calibrated_score(signals: dict[str, float]) -> float:
    z = BIAS + sum(WEIGHTS[name] * value for name, value in signals.items())
    return 1.0 / (1.0 + math.exp(-z))


# --- the decision ---------------------------------------------------------------------------------
def passage_name(hit: Hit) -> str:
    """How a refusal names a passage: its document's title and section (no text)."""
    return f"'{hit.title}'" + (f" §{hit.section}" if hit.section else "")


def support(
    retriever: Retriever, question: str, hits: list[Hit], scope: SearchScope, settings: RetrievalSettings
) -> Support:
    """The retrieved passages that support the question, in rank order, or why none does (module docstring).
    `scope`: the question's, as its search used it (`Retriever.scoped`)."""
    if not hits:
        return Support([], {}, "no passage you may read matches the question")
    terms = question_terms(question)
    if not terms:
        return Support([], {}, "the question has no terms to search for")
    best = max(hits, key=lambda h: h.similarity if h.similarity is not None else -1.0)
    if best.similarity is None or best.similarity < settings.min_similarity:
        similarity = f"{best.similarity:.2f}" if best.similarity is not None else "none"
        reason = f"closest passage {passage_name(best)}, similarity {similarity} < {settings.min_similarity:.2f}"
        return Support([], {}, reason, closest=best)
    total, holding = document_frequencies(retriever, terms, scope)
    common = common_terms(total, holding)
    if len(common) == len(terms) or not without_names(question, common_terms(total, holding, NAME_SHARE)):
        return Support([], {}, "the question names only what most of your documents name (no subject to look for)")
    if settings.refusal == "lexical" or total < FEWEST_DOCUMENTS:
        return _lexical(question, hits, terms, total, holding, settings)
    found = evidence(retriever.embedder, question, hits, total, holding, terms)
    covered = {e.hit.chunk_id: e.coverage for e in found}
    scores = {e.hit.chunk_id: e.score for e in found}
    supporting = [e.hit for e in found if e.score >= settings.refusal_min_score]
    if supporting:
        return Support(supporting, covered, "", scores)
    top = max(found, key=lambda e: e.score)
    reason = f"closest passage {passage_name(top.hit)}, score {top.score:.2f} < {settings.refusal_min_score:.2f}"
    return Support([], covered, reason, scores, closest=top.hit)


def _lexical(
    question: str,
    hits: list[Hit],
    terms: dict[str, str],
    total: int,
    holding: dict[str, int],
    settings: RetrievalSettings,
) -> Support:
    """The rule before the calibrated score: enough of the question's weight, or close and distinctive."""
    if settings.min_coverage <= 0:
        return Support(list(hits), {hit.chunk_id: 1.0 for hit in hits})
    held = {hit.chunk_id: passage_terms(hit) & terms.keys() for hit in hits}
    weights = term_weights(total, holding)
    names = {term(word) for position, word in enumerate(tokens(question)) if position and word[:1].isupper()}
    distinctive = {t for t, n in holding.items() if n <= total / 2} - names
    covered = {hit.chunk_id: coverage(weights, held[hit.chunk_id]) for hit in hits}
    supporting = [
        hit
        for hit in hits
        if covered[hit.chunk_id] >= settings.min_coverage
        or ((hit.similarity or 0.0) >= settings.close_similarity and held[hit.chunk_id] & distinctive)
    ]
    if supporting:
        return Support(supporting, covered)
    top = max(hits, key=lambda h: covered[h.chunk_id])
    reason = (
        f"closest passage {passage_name(top)} holds {covered[top.chunk_id]:.2f} of the question's terms "
        f"< {settings.min_coverage:.2f}"
    )
    return Support([], covered, reason, closest=top)
