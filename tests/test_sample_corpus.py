"""The sample corpus ingests offline, every document with page or section metadata, and the golden
questions point at documents that exist."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import HERE, run_cli

CORPUS = HERE.parent / "sample_corpus"


def _documents() -> list[Path]:
    return sorted(p for folder in ("hospital", "lawfirm") for p in (CORPUS / folder).iterdir() if p.is_file())


def test_corpus_covers_every_format():
    suffixes = {p.suffix for p in _documents()}
    assert {".pdf", ".docx", ".pptx", ".xlsx", ".csv", ".html", ".md", ".txt", ".eml"} <= suffixes
    assert len(_documents()) >= 20


def test_questions_point_at_real_documents():
    questions = yaml.safe_load((CORPUS / "questions.yaml").read_text())
    assert len(questions) >= 40
    for question in questions:
        assert question["question"].strip()
        if question["document"] is not None:
            assert (CORPUS / question["document"]).is_file(), question["document"]
            assert question["answer"]
    assert sum(q["document"] is None for q in questions) >= 4


@pytest.mark.slow
def test_corpus_ingests_offline_with_locations(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    guard = home / "netguard.log"
    result = run_cli(
        home,
        "ingest",
        str(CORPUS / "hospital"),
        str(CORPUS / "lawfirm"),
        "--collection",
        "sample",
        "--json",
        check=False,
        PYTHONPATH=str(HERE / "netguard"),
        APPLIANCE_NETGUARD_LOG=str(guard),
    )
    assert not guard.exists() or guard.read_text() == ""
    report = json.loads(result.stdout)
    failed = {d["source"]: d["reason"] for d in report["documents"] if d["status"] == "failed"}
    scanned = str(CORPUS / "hospital" / "scanned-incident-report.pdf")
    if shutil.which("tesseract") is None:
        assert failed == {scanned: "no extractable text (OCR not available)"}
    else:
        assert failed == {}
    assert report["counts"]["added"] == len(report["documents"]) - len(failed)
    listed = json.loads(run_cli(home, "documents", "list", "--json").stdout)
    for document in listed:
        shown = json.loads(run_cli(home, "documents", "show", document["id"]).stdout)
        located = [c for c in shown["chunks"] if c["page"] is not None or c["headings"]]
        if document["kind"] in ("pdf", "pptx", "xlsx"):
            assert all(c["page"] for c in shown["chunks"]), document["filename"]
        elif document["kind"] not in ("txt", "csv", "eml"):
            assert located, f"{document['filename']} has no section metadata"
    check = run_cli(home, "index", "check", check=False)
    assert check.returncode == 0 and "clean" in check.stdout
