"""Chunking: a document's elements into its full text plus section-bounded, overlapping chunks.

Every chunk is an exact span of the document's extracted text (`text == full_text[start:end]`), so a
citation can later be checked against the stored text. Chunks never cross a section (heading path)
or page boundary, so each chunk's page is right; within a section they grow to `max_chars`, and a
long passage is cut at a sentence or word boundary with `overlap_chars` of overlap.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ingest.partition import Element

SEPARATOR = "\n\n"
_SENTENCE_END = re.compile(r"[.!?;:]\s+")


@dataclass
class Chunk:
    index: int
    text: str
    start: int
    end: int
    page: int | None
    headings: list[str] = field(default_factory=list)


@dataclass
class _Span:
    start: int
    end: int
    page: int | None
    headings: list[str]


def full_text(elements: list[Element]) -> tuple[str, list[_Span]]:
    """The document's text (elements joined by blank lines) and each element's span in it."""
    parts, spans, position = [], [], 0
    for element in elements:
        if parts:
            parts.append(SEPARATOR)
            position += len(SEPARATOR)
        parts.append(element.text)
        spans.append(_Span(position, position + len(element.text), element.page, element.headings))
        position += len(element.text)
    return "".join(parts), spans


def _cut(text: str, start: int, limit: int) -> int:
    """Where to end a piece that starts at `start` and must stop before `limit`: a sentence end, else a space."""
    window = text[start:limit]
    sentence_ends = [m.end() for m in _SENTENCE_END.finditer(window)]
    if sentence_ends and sentence_ends[-1] > len(window) // 2:
        return start + sentence_ends[-1]
    space = window.rfind(" ")
    return start + space + 1 if space > len(window) // 2 else limit


def chunk_document(elements: list[Element], max_chars: int = 1000, overlap_chars: int = 150) -> tuple[str, list[Chunk]]:
    """The full text and its chunks; `overlap_chars` must be well below `max_chars`."""
    if not 0 <= overlap_chars < max_chars // 2:
        raise ValueError("overlap must be less than half the chunk size")
    text, spans = full_text(elements)
    sections: list[list[_Span]] = []
    for span in spans:  # a section ends where the heading path or the page changes
        if sections and sections[-1][0].headings == span.headings and sections[-1][0].page == span.page:
            sections[-1].append(span)
        else:
            sections.append([span])
    chunks: list[Chunk] = []
    for section in sections:
        start, section_end = section[0].start, section[-1].end
        while start < section_end:
            end = section_end if section_end - start <= max_chars else _cut(text, start, start + max_chars)
            piece = text[start:end]
            stripped_start = start + len(piece) - len(piece.lstrip())
            stripped_end = start + len(piece.rstrip())
            if stripped_end > stripped_start:
                chunks.append(
                    Chunk(
                        len(chunks),
                        text[stripped_start:stripped_end],
                        stripped_start,
                        stripped_end,
                        section[0].page,
                        list(section[0].headings),
                    )
                )
            if end >= section_end:
                break
            next_start = max(end - overlap_chars, start + 1)
            space = text.find(" ", next_start, end)
            start = space + 1 if space != -1 else next_start
    return text, chunks
