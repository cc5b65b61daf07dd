"""Partitioning: one file in, its text as elements (category, page, heading path) out, offline.

Wraps `unstructured` with the fast strategy. Before it is imported, its analytics ping and any hub
access are switched off, and the spaCy model it wants must be the local stand-in
(`ingest.spacy_standin`), so that nothing ever reaches for the network. The file's real format
comes from its bytes (magic numbers, the parts inside an OOXML zip), and must agree with its
extension. A PDF with no text layer goes through OCR (Tesseract) when it is installed. A PDF's running
headers and footers (the same short line on several pages, page numbers aside) are left out: they answer
nothing and would be quoted. A table (a spreadsheet, a CSV file, a table in a page or a Word file) is read
row by row, one line a row, each cell under its column's name ("Step: 3; When: by the 20th of the month"):
a row then reads as a sentence, which search can match and an answer can quote. A document that yields no
text is an error, never an empty document.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

from appliance.errors import BadRequest

log = logging.getLogger(__name__)

OFFLINE_ENVIRONMENT = {
    "SCARF_NO_ANALYTICS": "true",  # unstructured's usage ping
    "DO_NOT_TRACK": "true",
    "UNSTRUCTURED_DISABLE_NOTICE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}
# Extensions per detected format; the file's extension must be one of them.
EXTENSIONS = {
    "pdf": {".pdf"},
    "docx": {".docx"},
    "pptx": {".pptx"},
    "xlsx": {".xlsx"},
    "msg": {".msg"},
    "eml": {".eml"},
    "html": {".html", ".htm"},
    "md": {".md", ".markdown"},
    "txt": {".txt", ".text", ".log"},
    "csv": {".csv"},
}
_OOXML_PARTS = {"word/": "docx", "ppt/": "pptx", "xl/": "xlsx"}


class UnsupportedDocument(BadRequest):
    """The file is not a format the appliance reads, or its content contradicts its extension."""


class NoExtractableText(BadRequest):
    """The document parsed but holds no text (an image-only PDF without OCR, an empty file)."""


@dataclass
class Element:
    text: str
    category: str
    page: int | None = None
    headings: list[str] = field(default_factory=list)


def prepare_offline() -> None:
    """Switch off every network use of the parsing stack; refuse to run without the spaCy stand-in."""
    for key, value in OFFLINE_ENVIRONMENT.items():
        os.environ[key] = value
    if find_spec("en_core_web_sm") is None:
        raise RuntimeError(
            "spaCy's en_core_web_sm is missing, and unstructured would try to download it; "
            "install the offline stand-in with `python -m ingest.spacy_standin`"
        )


def detect_format(path: Path) -> str:
    """The document's format from its bytes, checked against its extension."""
    with path.open("rb") as handle:
        head = handle.read(4096)
    if not head:
        raise NoExtractableText("empty file")
    suffix = path.suffix.lower()
    if head.startswith(b"%PDF-"):
        detected = "pdf"
    elif head.startswith(b"PK\x03\x04"):
        detected = _ooxml_kind(path)
    elif head.startswith(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"):
        detected = "msg" if suffix == ".msg" else "ole"
    elif b"\x00" in head:
        raise UnsupportedDocument("binary file of an unsupported type")
    else:
        detected = _text_kind(suffix)
    if suffix not in EXTENSIONS.get(detected, set()):
        raise UnsupportedDocument(
            f"content is {_DESCRIPTIONS.get(detected, detected.upper())} but the file is named '*{suffix}'"
        )
    return detected


def _ooxml_kind(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        raise UnsupportedDocument("damaged ZIP container") from None
    if "[Content_Types].xml" in names:
        for prefix, kind in _OOXML_PARTS.items():
            if any(name.startswith(prefix) for name in names):
                return kind
    return "zip"


def _text_kind(suffix: str) -> str:
    """Text formats cannot be told apart by magic numbers; the extension decides among them."""
    for kind in ("html", "md", "csv", "eml", "txt"):
        if suffix in EXTENSIONS[kind]:
            return kind
    return "text"


_DESCRIPTIONS = {"text": "plain text", "zip": "a ZIP archive", "ole": "an OLE2 (legacy Office) file"}


def _tesseract_available() -> bool:
    return shutil.which("tesseract") is not None


def _elements(raw: list, kind: str) -> list[Element]:
    """Non-empty elements with the heading path each one sits under (a spreadsheet's: its sheet name)."""
    elements: list[Element] = []
    headings: list[str] = []
    titled_slides: set[int | None] = set()
    for item in raw:
        text = str(item.text or "").strip()
        if not text:
            continue
        if item.category == "Table" and getattr(item.metadata, "text_as_html", None):
            text = _table_text(item.metadata.text_as_html) or text
        if kind == "xlsx":
            headings = [item.metadata.page_name] if item.metadata.page_name else []
        elif kind == "pptx" and item.category == "Title":
            # unstructured calls any short line without a full stop a title, so a slide's bullets come as
            # titles too: only the slide's first one heads it, and its bullets stay one section together.
            if item.metadata.page_number not in titled_slides:
                titled_slides.add(item.metadata.page_number)
                headings = [text]
        elif item.category in ("Title", "Header") and kind != "csv":
            depth = item.metadata.category_depth or 0
            headings = headings[:depth] + [text]
        elements.append(
            Element(text=text, category=item.category, page=item.metadata.page_number, headings=list(headings))
        )
    return elements


RUNNING_LINE_CHARS = 200  # a running header or footer is at most this long


def _without_running_lines(elements: list[Element]) -> list[Element]:
    """Leave out page furniture: a short line at the top or the bottom of two or more pages, the same on each
    but for its numbers, and either word for word the same ("Acme - Confidential") or holding its page's
    number ("Acme - page 2 of 3"). A heading that starts each page ("Chapter 3") is kept."""

    def shape(element: Element) -> str:
        return re.sub(r"\d+", "#", " ".join(element.text.lower().split()))

    edges: set[int] = set()  # the first and last element of each page
    for index, element in enumerate(elements):
        if index == 0 or elements[index - 1].page != element.page:
            edges.add(index)
        if index == len(elements) - 1 or elements[index + 1].page != element.page:
            edges.add(index)
    found: dict[str, list[Element]] = {}
    for index in sorted(edges):
        element = elements[index]
        if element.page is not None and len(element.text) <= RUNNING_LINE_CHARS:
            found.setdefault(shape(element), []).append(element)
    furniture: set[int] = set()
    for same in found.values():
        if len({e.page for e in same}) < 2:
            continue
        verbatim = len({e.text for e in same}) == 1
        numbered = all(str(e.page) in re.findall(r"\d+", e.text) for e in same)
        if verbatim or numbered:
            furniture.update(id(e) for e in same)
    kept = [e for e in elements if id(e) not in furniture]
    return kept or elements


def _table_rows(html: str) -> list[list[str]]:
    """The rows of the table unstructured renders as HTML, each a list of its cells' text."""
    import lxml.html

    try:
        table = lxml.html.fragment_fromstring(html, create_parent="div")
    except (ValueError, lxml.etree.ParserError):
        return []
    rows = []
    for row in table.iter("tr"):
        cells = [" ".join(cell.text_content().split()) for cell in row if cell.tag in ("td", "th")]
        if any(cells):
            rows.append(cells)
    return rows


def _table_text(html: str) -> str | None:
    """One line a row. When the first row names the columns (every cell filled, none a number, no two the
    same), each later row's cells follow their column's name ("Limit: £180 per night; Conditions: ..."), so
    a row carries its meaning on its own; else a row's cells are joined by " | ". None: no rows."""
    rows = _table_rows(html)
    if not rows:
        return None
    first = rows[0]
    named = (
        len(rows) > 1
        and all(first)
        and len(set(first)) == len(first)
        and not any(re.fullmatch(r"[\d\s.,:/%£$€-]+", cell) for cell in first)
    )
    if not named:
        return "\n".join(" | ".join(cell for cell in row if cell) for row in rows)
    lines = [" | ".join(first)]
    for row in rows[1:]:
        pairs = [f"{name}: {cell}" for name, cell in zip(first, row, strict=False) if cell]
        lines.append("; ".join(pairs + [cell for cell in row[len(first) :] if cell]))
    return "\n".join(line for line in lines if line)


def _email_header(metadata) -> Element:
    """Who wrote an e-mail, to whom, when and about what: part of its text, so questions can use it."""
    lines = [
        f"Subject: {metadata.subject or ''}",
        f"From: {', '.join(metadata.sent_from or [])}",
        f"To: {', '.join(metadata.sent_to or [])}",
    ]
    if metadata.last_modified:
        lines.append(f"Date: {metadata.last_modified}")
    return Element(text="\n".join(lines), category="EmailHeader")


def partition_document(path: Path) -> tuple[str, list[Element]]:
    """Partition `path`; returns its format and its non-empty elements in reading order."""
    prepare_offline()
    kind = detect_format(path)
    from unstructured.partition.auto import partition

    # Attachments of an e-mail are ingested as documents of their own (ingest.attachments), with the
    # same checks as any file; they are not read into the e-mail's own text.
    extra = {"process_attachments": False} if kind == "eml" else {}
    raw = partition(filename=str(path), strategy="fast", languages=["eng"], **extra)
    elements = _elements(raw, kind)
    if kind == "pdf":
        elements = _without_running_lines(elements)
    if kind == "eml" and elements:
        elements.insert(0, _email_header(raw[0].metadata))
    if not elements and kind == "pdf":
        if not _tesseract_available():
            raise NoExtractableText("no extractable text (OCR not available)")
        from unstructured.partition.pdf import partition_pdf

        elements = _without_running_lines(
            _elements(partition_pdf(filename=str(path), strategy="ocr_only", languages=["eng"]), kind)
        )
        if not elements:
            raise NoExtractableText("no extractable text (OCR found none)")
    if not elements:
        raise NoExtractableText("no extractable text")
    return kind, elements
