"""Citation verification: every `[n]` in an answer is checked against the passage it names and the
stored document text; what does not verify is dropped and flagged, never shown as a source.

A citation verifies when `n` names a retrieved passage, the sentence that cites it shares content
words with that passage, and its quote — the words the answer put in quotation marks, or else the
passage sentence that best supports the claim — occurs verbatim in the document's stored text.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from urllib.parse import quote as quote_url

from appliance.retrieval.retrieve import Hit

_MARKER = re.compile(r"\[(\d{1,3}(?:\s*,\s*\d{1,3})*)\]")
_QUOTED = re.compile(r"[\"“”«»]([^\"“”«»]{8,600})[\"“”«»]")
# A sentence ends at . ! or ? (closing quotes and brackets kept) before a space or the end, or at a line's end;
# not inside a number (4.5, 884.00) nor after an abbreviation or an initial (St. Brigid's, ext. 4471, J. Smith).
_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)|\n")
_LAST_WORD = re.compile(r"([A-Za-z]+)\.$")
ABBREVIATIONS = frozenset("st dr mr mrs ms prof no nos vs etc eg ie approx ext tel fig ref dept co ltd inc cf".split())
_WORD = re.compile(r"[a-z0-9]+")
STOPWORDS = frozenset(
    """a about above after again all also am an and any are as at be because been before being below between
    both but by can could did do does doing down during each few for from further had has have having he her
    here hers him his how i if in into is it its itself just me more most my no nor not now of off on once
    only or other our out over own same she should so some such than that the their them then there these
    they this those through to too under until up very was we were what when where which while who whom why
    will with would you your yours""".split()
)


@dataclass
class Citation:
    number: int
    chunk_id: str
    document_id: str
    title: str
    page: int | None
    section: str
    quote: str
    start: int  # offsets of the quote in the document's stored text
    end: int
    verified: bool = True
    reason: str = ""

    def public(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        """`[n] title, page p, section s` for a Sources block."""
        parts = [self.title]
        if self.page is not None:
            parts.append(f"page {self.page}")
        if self.section:
            parts.append(f"section {self.section}")
        return f"[{self.number}] " + ", ".join(parts)


@dataclass
class Flag:
    """A citation that was dropped, and why."""

    number: int
    reason: str
    chunk_id: str | None = None


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Where a text's sentences (and lines) are: (start, end) offsets, surrounding spaces excluded."""
    spans: list[tuple[int, int]] = []
    start = 0

    def add(begin: int, end: int) -> None:
        piece = text[begin:end]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            spans.append((begin + lead, begin + lead + len(piece.strip())))

    for found in _END.finditer(text):
        if found.group().rstrip("\"'”’)]") == ".":
            word = _LAST_WORD.search(text, start, found.end())
            if word and (word.group(1).lower() in ABBREVIATIONS or len(word.group(1)) == 1):
                continue
        add(start, found.end())
        start = found.end()
    add(start, len(text))
    return spans


def sentences(text: str) -> list[str]:
    """A text's sentences (and lines), as verification splits them."""
    return [text[start:end] for start, end in sentence_spans(text)]


def content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if len(w) > 2 and w not in STOPWORDS}


def cited_numbers(answer: str) -> list[int]:
    numbers: list[int] = []
    for match in _MARKER.finditer(answer):
        for part in match.group(1).split(","):
            if int(part) not in numbers:
                numbers.append(int(part))
    return numbers


def _claims(answer: str) -> dict[int, list[str]]:
    """For each cited number, the answer's sentences that cite it."""
    claims: dict[int, list[str]] = {}
    for sentence in sentences(answer):
        for match in _MARKER.finditer(sentence):
            for part in match.group(1).split(","):
                claims.setdefault(int(part), []).append(sentence)
    return claims


def find_verbatim(document_text: str, quote: str, start: int = 0, end: int | None = None) -> tuple[int, int] | None:
    """Where `quote` occurs in the document (whitespace may differ); searched first within [start, end)."""
    words = quote.split()
    if not words:
        return None
    pattern = re.compile(r"\s+".join(re.escape(w) for w in words))
    match = pattern.search(document_text, start, end if end is not None else len(document_text))
    match = match or pattern.search(document_text)
    return (match.start(), match.end()) if match else None


def best_sentence(hit: Hit, claim: str) -> tuple[str, int, int] | None:
    """The passage sentence sharing the most content words with the claim, with its document offsets;
    None when the passage has no sentence of three content words or more.

    Headings repeated at the top of a passage and fragments ("3.") are passed over: they match a
    question's words well and say nothing. A passage that is nothing but its own heading (a slide's
    bullet, which the slide parser makes a heading) is quoted as it stands.
    """
    claim_words = content_words(claim)
    headings = {h.strip().lower() for h in hit.section.split(" > ")} if hit.section else set()
    best, best_score = None, (-1, -1, 0)
    for begin, end in sentence_spans(hit.text):
        sentence = hit.text[begin:end]
        words = content_words(sentence)
        if len(words) < 3:
            continue
        heading = sentence.lower().rstrip(".:") in headings
        score = (not heading, len(claim_words & words), -abs(len(sentence) - 160))  # then a readable length
        if score > best_score:
            best, best_score = (begin, end), score
    if best is None:
        return None
    start, end = hit.start + best[0], hit.start + best[1]
    return hit.text[best[0] : best[1]], start, end


def verify(answer: str, hits: list[Hit], texts: dict[str, str]) -> tuple[list[Citation], list[Flag]]:
    """Check every `[n]` of `answer` against `hits` (numbered from 1) and the documents' `texts`."""
    claims = _claims(answer)
    citations: list[Citation] = []
    flags: list[Flag] = []
    for number in cited_numbers(answer):
        if not 1 <= number <= len(hits):
            flags.append(Flag(number, "no passage has this number"))
            continue
        hit = hits[number - 1]
        document_text = texts.get(hit.document_id)
        if document_text is None or document_text[hit.start : hit.end] != hit.text:
            flags.append(Flag(number, "the passage no longer matches the stored document", hit.chunk_id))
            continue
        sentences = claims.get(number, [])
        claim = " ".join(sentences)
        if not content_words(claim.replace(f"[{number}]", "")) & content_words(hit.text):
            flags.append(Flag(number, "the citing sentence shares no words with the passage", hit.chunk_id))
            continue
        quotes = [q.strip() for sentence in sentences for q in _QUOTED.findall(sentence)]
        if quotes:
            located = [(q, find_verbatim(document_text, q, hit.start, hit.end)) for q in quotes]
            missing = [q for q, where in located if where is None]
            if missing:
                flags.append(Flag(number, "quoted text does not occur in the document", hit.chunk_id))
                continue
            quote, (start, end) = located[0][0], located[0][1]  # type: ignore[misc]
            quote = document_text[start:end]
        else:
            quote, start, end = best_sentence(hit, claim) or (hit.text, hit.start, hit.end)
            if document_text[start:end] != quote:
                flags.append(Flag(number, "the passage no longer matches the stored document", hit.chunk_id))
                continue
        citations.append(
            Citation(number, hit.chunk_id, hit.document_id, hit.title, hit.page, hit.section, quote, start, end)
        )
    return citations, flags


def passage_path(citation: Citation) -> str:
    """The web app's page for the cited document, with the quote highlighted (readers need a session)."""
    chunk = quote_url(citation.chunk_id, safe=":")
    return (
        f"/documents/{quote_url(citation.document_id, safe='')}?chunk={chunk}"
        f"&start={citation.start}&end={citation.end}#passage"
    )


def sources_block(citations: list[Citation], base_url: str = "") -> str:
    """The plain-text Sources block appended to answers given through chat APIs.

    It is all that most chat clients keep of the citations (the `ollama` package's typed responses, and so
    LlamaIndex and LangChain's ChatOllama, drop the structured fields), so each source carries what a reader
    needs to check it: the document's file name, the page where known and the section, the quote (whitespace
    collapsed, cut at 300 characters), and the path of the passage in the web app (`base_url` before it when
    given). Sources are separated by a blank line so that Markdown renderers keep them apart too.
    """
    if not citations:
        return ""
    entries = []
    for citation in citations:
        quote = " ".join(citation.quote.split())
        quote = quote if len(quote) <= 300 else quote[:297] + "..."
        entries.append(f'{citation.label()}\n    "{quote}"\n    {base_url.rstrip("/")}{passage_path(citation)}')
    return "\n\nSources:\n" + "\n\n".join(entries)
