"""Partitioning every format with the network blocked: text, pages, headings, and clear refusals."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.documents import write_all, write_pdf

HERE = Path(__file__).parent
SCRIPT = """
import json, sys
from pathlib import Path
from ingest.partition import partition_document
results = {}
for name in sys.argv[1:]:
    try:
        kind, elements = partition_document(Path(name))
        results[name] = {"kind": kind, "elements": [e.__dict__ for e in elements]}
    except Exception as exc:
        results[name] = {"error": type(exc).__name__, "message": str(exc)}
print(json.dumps(results))
"""


def partition_offline(paths: list[Path], tmp_path: Path) -> dict[str, dict]:
    """Partition in a fresh interpreter under the network guard; fails if any connection was tried."""
    log = tmp_path / "netguard.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SCARF", "DO_NOT_TRACK", "HF_HUB"))}
    env.update(PYTHONPATH=f"{HERE / 'netguard'}{os.pathsep}{HERE.parent}", APPLIANCE_NETGUARD_LOG=str(log))
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, *map(str, paths)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert not log.exists() or log.read_text() == "", f"partitioning tried the network:\n{log.read_text()}"
    return {Path(name).name: value for name, value in json.loads(result.stdout.strip().splitlines()[-1]).items()}


@pytest.fixture(scope="module")
def partitioned(tmp_path_factory):
    folder = tmp_path_factory.mktemp("formats")
    documents = write_all(folder)
    return documents, partition_offline(list(documents.values()), folder)


def _texts(result: dict) -> str:
    return "\n".join(element["text"] for element in result["elements"])


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("md", "Adult records are kept for ten years."),
        ("html", "Wash hands for twenty seconds."),
        ("txt", "The registrar covers nights on weekdays."),
        ("csv", "paracetamol"),
        ("docx", "The ward clerk books hospital transport"),
        ("xlsx", "Dr Lindqvist"),
        ("pptx", "Preserve all email from 2024 onwards."),
        ("pdf", "Reconcile the medication list within 24 hours"),
        ("eml", "Please preserve every document about the Quay Street lease."),
    ],
)
def test_every_format_yields_its_text_offline(partitioned, kind, expected):
    documents, results = partitioned
    result = results[documents[kind].name]
    assert "error" not in result, result
    assert result["kind"] == kind and expected in _texts(result)


def test_scripts_are_not_text(partitioned):
    documents, results = partitioned
    assert "never executed" not in _texts(results[documents["html"].name])


def test_pages_and_headings_are_kept(partitioned):
    documents, results = partitioned
    pdf = results[documents["pdf"].name]["elements"]
    assert {e["page"] for e in pdf} == {1, 2}
    assert any("step 2" in e["text"] and e["page"] == 2 for e in pdf)
    slides = results[documents["pptx"].name]["elements"]
    assert any(e["page"] == 2 and "finance director" in e["text"] for e in slides)
    docx = results[documents["docx"].name]["elements"]
    transport = next(e for e in docx if "hospital transport" in e["text"])
    assert transport["headings"] == ["Discharge policy", "Transport"]
    markdown = results[documents["md"].name]["elements"]
    assert next(e for e in markdown if "ten years" in e["text"])["headings"] == ["Retention", "Adults"]


def test_refusals_are_clear(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    blank_pdf = write_pdf(tmp_path / "scan.pdf", pages=1, text=False)
    lying = tmp_path / "invoice.pdf"
    lying.write_text("this is plain text pretending to be a PDF")
    docx_as_xlsx = tmp_path / "budget.xlsx"
    from tests.documents import write_docx

    write_docx(docx_as_xlsx)
    binary = tmp_path / "tool.txt"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(64))
    results = partition_offline([empty, blank_pdf, lying, docx_as_xlsx, binary], tmp_path)
    assert results["empty.txt"] == {"error": "NoExtractableText", "message": "empty file"}
    assert results["scan.pdf"]["error"] == "NoExtractableText"
    assert results["scan.pdf"]["message"].startswith("no extractable text")
    assert results["invoice.pdf"]["message"] == "content is plain text but the file is named '*.pdf'"
    assert results["budget.xlsx"]["message"] == "content is DOCX but the file is named '*.xlsx'"
    assert results["tool.txt"]["error"] == "UnsupportedDocument"


def test_scanned_pdf_is_read_by_ocr_when_tesseract_is_installed(tmp_path):
    import shutil

    from tests.documents import write_scanned_pdf

    scan = write_scanned_pdf(
        tmp_path / "incident.pdf",
        ["Incident report: patient fall on ward 7.", "Reported by the night charge nurse at 03:40."],
    )
    result = partition_offline([scan], tmp_path)["incident.pdf"]
    if shutil.which("tesseract") is None:
        assert result == {"error": "NoExtractableText", "message": "no extractable text (OCR not available)"}
        return
    assert "error" not in result, result
    text = _texts(result)
    assert "patient fall on ward 7" in text and "night charge nurse" in text
    assert {e["page"] for e in result["elements"]} == {1}


def test_email_headers_are_text_and_attachments_are_not(tmp_path):
    from tests.documents import write_docx, write_eml

    eml = write_eml(tmp_path / "notice.eml", {"scope.docx": write_docx(tmp_path / "scope.docx").read_bytes()})
    result = partition_offline([eml], tmp_path)["notice.eml"]
    text = _texts(result)
    assert "Subject: Litigation hold notice" in text and "From: partner@harrow-vale.example" in text
    assert "Quay Street lease" in text
    assert "ward clerk" not in text, "the attachment is a document of its own, not part of the e-mail"


def test_spreadsheet_sheets_are_sections(partitioned):
    documents, results = partitioned
    elements = results[documents["xlsx"].name]["elements"]
    assert {tuple(e["headings"]) for e in elements} == {("On-call rota",)}


def _write_pdf_with_furniture(path: Path, pages: int) -> Path:
    """Each page: a running header (the same words), a heading naming its chapter, a body paragraph, and a
    footer holding the page's number, as word processors print them."""
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("helvetica", size=12)
    pdf.set_auto_page_break(False)  # the footer stays on its page
    for page in range(1, pages + 1):
        pdf.add_page()
        pdf.cell(0, 10, "Harrow & Vale LLP - Privileged and confidential", new_x="LMARGIN", new_y="NEXT")
        pdf.cell(0, 10, f"Chapter {page + 2}: file closure", new_x="LMARGIN", new_y="NEXT")
        pdf.multi_cell(0, 8, f"Closed files are archived after review number {page * 11} by the records team.")
        pdf.set_y(-20)
        pdf.cell(0, 10, f"HV-2025-0417 - page {page} of {pages}")
    pdf.output(str(path))
    return path


def test_running_headers_and_footers_of_a_pdf_are_left_out(tmp_path):
    """They answer nothing and would be quoted as an answer; a one-page document keeps every line."""
    three = _write_pdf_with_furniture(tmp_path / "memo.pdf", 3)
    one = _write_pdf_with_furniture(tmp_path / "note.pdf", 1)
    results = partition_offline([three, one], tmp_path)
    text = _texts(results["memo.pdf"])
    assert "Privileged and confidential" not in text and "HV-2025-0417" not in text
    for page in (1, 2, 3):
        assert f"Chapter {page + 2}: file closure" in text
        assert f"review number {page * 11} by the records team" in text
    single = _texts(results["note.pdf"])
    assert "Privileged and confidential" in single and "HV-2025-0417 - page 1 of 1" in single


def test_a_slides_bullets_stay_under_its_title(tmp_path):
    """unstructured calls a short bullet without a full stop a title; read so, each bullet became a section
    (and a passage) of its own, cut off from the slide it belongs to."""
    import pptx

    from ingest.chunking import chunk_document
    from ingest.partition import partition_document

    deck = pptx.Presentation()
    for title, bullets in (
        ("Choosing your next seat", ["Rank three preferred seats", "Send it by 31 July for September moves"]),
        ("Who to ask", ["Training Principal: Lucinda Aymes-Foster", "Graduate Recruitment: extension 2301"]),
    ):
        slide = deck.slides.add_slide(deck.slide_layouts[1])
        slide.shapes.title.text = title
        body = slide.placeholders[1].text_frame
        body.text = bullets[0]
        for bullet in bullets[1:]:
            body.add_paragraph().text = bullet
    deck.save(tmp_path / "seats.pptx")
    _kind, elements = partition_document(tmp_path / "seats.pptx")
    assert {tuple(e.headings) for e in elements} == {("Choosing your next seat",), ("Who to ask",)}
    _text, chunks = chunk_document(elements)
    assert [c.headings for c in chunks] == [["Choosing your next seat"], ["Who to ask"]]
    assert "31 July" in chunks[0].text and "extension 2301" in chunks[1].text


def test_a_table_is_read_row_by_row_under_its_column_names(tmp_path):
    """A row then reads as a sentence that search can match and an answer can quote on its own; a table whose
    first row is data, not names, keeps its cells joined by ' | '."""
    named = tmp_path / "codes.csv"
    named.write_text(
        'Code,Work type,Money on account\nFAM-DIV,Divorce and financial remedy,"£2,000"\nLIT-DEB,Debt recovery,£500\n'
    )
    numbers = tmp_path / "readings.csv"
    numbers.write_text("1,2,3\n4,5,6\n")
    results = partition_offline([named, numbers], tmp_path)
    lines = _texts(results["codes.csv"]).splitlines()
    assert lines == [
        "Code | Work type | Money on account",
        "Code: FAM-DIV; Work type: Divorce and financial remedy; Money on account: £2,000",
        "Code: LIT-DEB; Work type: Debt recovery; Money on account: £500",
    ]
    assert _texts(results["readings.csv"]).splitlines() == ["1 | 2 | 3", "4 | 5 | 6"]
