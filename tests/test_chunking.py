"""Chunks are exact spans of the stored text, bounded, overlapping, and never cross a section."""

import pytest

from ingest.chunking import chunk_document
from ingest.partition import Element

SENTENCE = "Adult medical records are retained for ten years after the last episode of care. "


def _elements():
    return [
        Element("Records Retention Policy", "Title", 1, ["Records Retention Policy"]),
        Element(SENTENCE * 30, "NarrativeText", 1, ["Records Retention Policy"]),
        Element("Minors", "Title", 2, ["Records Retention Policy", "Minors"]),
        Element(
            "Records of minors are kept until the patient turns twenty-five.",
            "NarrativeText",
            2,
            ["Records Retention Policy", "Minors"],
        ),
        Element("Maternity", "Title", 3, ["Records Retention Policy", "Maternity"]),
        Element(
            "Obstetric records are kept for twenty-five years.",
            "NarrativeText",
            3,
            ["Records Retention Policy", "Maternity"],
        ),
    ]


def test_chunks_are_exact_spans_within_bounds():
    text, chunks = chunk_document(_elements(), max_chars=500, overlap_chars=80)
    assert chunks and [c.index for c in chunks] == list(range(len(chunks)))
    for chunk in chunks:
        assert text[chunk.start : chunk.end] == chunk.text
        assert 0 < len(chunk.text) <= 500
        assert chunk.text == chunk.text.strip()


def test_long_passages_overlap_and_cover_everything():
    text, chunks = chunk_document(_elements(), max_chars=500, overlap_chars=80)
    first_section = [c for c in chunks if c.headings == ["Records Retention Policy"]]
    assert len(first_section) >= 5
    for earlier, later in zip(first_section, first_section[1:], strict=False):
        assert later.start < earlier.end, "consecutive chunks of a passage overlap"
        assert later.start > earlier.start
    covered = set()
    for chunk in chunks:
        covered.update(range(chunk.start, chunk.end))
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())


def test_sections_and_pages_are_kept():
    _text, chunks = chunk_document(_elements(), max_chars=500, overlap_chars=80)
    minors = [c for c in chunks if c.headings[-1:] == ["Minors"]]
    assert len(minors) == 1 and minors[0].page == 2 and minors[0].text.startswith("Minors")
    assert "Obstetric" not in minors[0].text, "a chunk never crosses into another section"
    maternity = next(c for c in chunks if "Obstetric" in c.text)
    assert maternity.page == 3 and maternity.headings == ["Records Retention Policy", "Maternity"]


def test_cuts_prefer_sentence_ends():
    _text, chunks = chunk_document(_elements(), max_chars=500, overlap_chars=80)
    body = [c for c in chunks if c.headings == ["Records Retention Policy"]][1:-1]
    assert all(c.text.endswith(".") for c in body)


def test_bad_overlap_is_refused():
    with pytest.raises(ValueError):
        chunk_document(_elements(), max_chars=100, overlap_chars=60)


def test_a_chunk_never_spans_two_pages():
    elements = [Element(f"Page {page} text. " * 10, "NarrativeText", page, ["Procedure"]) for page in (1, 2, 3)]
    _text, chunks = chunk_document(elements, max_chars=1000, overlap_chars=100)
    assert [c.page for c in chunks] == [1, 2, 3]
    assert all(f"Page {c.page} text." in c.text and "Page" not in c.text.replace(f"Page {c.page}", "") for c in chunks)
