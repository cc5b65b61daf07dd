"""Hostile and broken files are refused per file, with a clear reason, by a limited parser process."""

import zipfile
from pathlib import Path

import pytest

from appliance.config import IngestSettings
from ingest.partition import NoExtractableText
from ingest.safety import RejectedDocument
from ingest.sandbox import ParseFailed, ParserProcess
from tests.documents import write_docx, write_pdf

SETTINGS = IngestSettings()


def partition_in_sandbox(path: Path, settings: IngestSettings):
    """Parse one file in a parser process of its own."""
    parser = ParserProcess(settings)
    try:
        return parser.partition(path)
    finally:
        parser.stop()


def _rezip(source: Path, target: Path, replace: dict[str, bytes]) -> Path:
    """Copy an OOXML package, replacing or adding entries."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as new:
        for item in old.infolist():
            new.writestr(item, replace.pop(item.filename, old.read(item.filename)))
        for name, data in replace.items():
            new.writestr(name, data)
    return target


def test_zip_bomb_docx_is_refused_before_parsing(tmp_path):
    docx = write_docx(tmp_path / "plain.docx")
    bomb = _rezip(docx, tmp_path / "bomb.docx", {"word/media/padding.bin": bytes(50 * 2**20)})
    with pytest.raises(RejectedDocument, match="zip bomb"):
        partition_in_sandbox(bomb, SETTINGS)


def test_zip_with_too_many_entries_is_refused(tmp_path):
    docx = write_docx(tmp_path / "plain.docx")
    many = {f"customXml/item{i}.xml": b"<a/>" for i in range(10_050)}
    crowded = _rezip(docx, tmp_path / "crowded.docx", many)
    with pytest.raises(RejectedDocument, match="entries"):
        partition_in_sandbox(crowded, SETTINGS)


def test_xml_external_entities_are_not_resolved(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-PATIENT-LIST")
    docx = write_docx(tmp_path / "plain.docx")
    with zipfile.ZipFile(docx) as archive:
        body = archive.read("word/document.xml").decode()
    doctype = f'<!DOCTYPE w:document [<!ENTITY xxe SYSTEM "file://{secret}">]>'
    body = body.replace("?>", "?>" + doctype, 1).replace("Patients are discharged", "&xxe; Patients are discharged")
    hostile = _rezip(docx, tmp_path / "xxe.docx", {"word/document.xml": body.encode()})
    _kind, elements = partition_in_sandbox(hostile, SETTINGS)
    text = " ".join(e.text for e in elements)
    assert "ward clerk" in text and "TOP-SECRET" not in text


def test_truncated_and_encrypted_pdfs(tmp_path):
    pdf = write_pdf(tmp_path / "whole.pdf")
    truncated = tmp_path / "truncated.pdf"
    truncated.write_bytes(pdf.read_bytes()[: pdf.stat().st_size // 2])
    with pytest.raises(RejectedDocument, match="damaged or truncated PDF"):
        partition_in_sandbox(truncated, SETTINGS)
    from pypdf import PdfWriter

    writer = PdfWriter(clone_from=pdf)
    writer.encrypt("secret")
    encrypted = tmp_path / "encrypted.pdf"
    writer.write(encrypted)
    with pytest.raises(RejectedDocument, match="encrypted"):
        partition_in_sandbox(encrypted, SETTINGS)


def test_image_only_pdf_is_never_indexed_empty(tmp_path):
    with pytest.raises(NoExtractableText, match="no extractable text"):
        partition_in_sandbox(write_pdf(tmp_path / "scan.pdf", pages=1, text=False), SETTINGS)


def test_size_limit(tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("word " * 400_000)  # 2 MB
    with pytest.raises(RejectedDocument, match="over the 1 MB limit"):
        partition_in_sandbox(big, IngestSettings(max_upload_mb=1))


def test_time_and_memory_limits_stop_the_parser(tmp_path):
    text = tmp_path / "note.txt"
    text.write_text("The registrar covers nights.")
    with pytest.raises(ParseFailed, match="longer than"):
        partition_in_sandbox(text, IngestSettings(parse_timeout_s=0.05))
    with pytest.raises(ParseFailed, match="MB|crashed|failed"):
        partition_in_sandbox(text, IngestSettings(parse_memory_mb=256))
    kind, elements = partition_in_sandbox(text, SETTINGS)
    assert kind == "txt" and "registrar" in elements[0].text


def test_one_parser_process_serves_many_files_and_is_replaced_when_it_dies(tmp_path):
    import os
    import signal

    parser = ParserProcess(SETTINGS)
    try:
        assert parser.partition(write_docx(tmp_path / "a.docx"))[0] == "docx"
        pid = parser._process.pid
        assert parser.partition(write_pdf(tmp_path / "b.pdf"))[0] == "pdf"
        assert parser._process.pid == pid, "the parsing stack is imported once, not per file"
        os.kill(pid, signal.SIGKILL)
        parser._process.wait()
        assert parser.partition(write_pdf(tmp_path / "c.pdf", pages=1))[0] == "pdf"
        assert parser._process.pid != pid
    finally:
        parser.stop()
