"""`appliance ingest` end to end, offline: every format, per-file failures, idempotence, replacement
of a changed file, deletion without a trace, and `appliance index check`; on the embedded stores and on
PostgreSQL + a Chroma server."""

import json
from pathlib import Path

import pytest

from tests.conftest import HERE, run_cli
from tests.documents import write_all, write_pdf

pytestmark = pytest.mark.usefixtures("stores")


@pytest.fixture(scope="module")
def library(tmp_path_factory, stores):
    root = tmp_path_factory.mktemp("library")
    folder = root / "hospital"
    documents = write_all(folder)
    pdf = write_pdf(root / "whole.pdf")
    (folder / "truncated.pdf").write_bytes(pdf.read_bytes()[: pdf.stat().st_size // 2])
    (folder / "report.docx").write_text("plain text with a lying extension")
    home = root / "home"
    home.mkdir()
    return home, folder, documents


def _cli(home: Path, *args: str, check: bool = True):
    guard = home / "netguard.log"
    result = run_cli(home, *args, check=check, PYTHONPATH=str(HERE / "netguard"), APPLIANCE_NETGUARD_LOG=str(guard))
    assert not guard.exists() or guard.read_text() == "", f"ingestion tried the network:\n{guard.read_text()}"
    return result


def _check(home: Path) -> dict:
    report = json.loads(_cli(home, "index", "check", "--json").stdout)
    assert report["clean"], report
    return report


def test_ingest_a_folder_offline(library):
    home, folder, documents = library
    _cli(home, "groups", "add", "oncology")  # an ACL may name only groups that exist
    result = _cli(
        home, "ingest", str(folder), "--collection", "hospital", "--acl", "group:oncology", "--json", check=False
    )
    assert result.returncode == 1  # some files failed
    report = json.loads(result.stdout)
    assert report["counts"] == {"added": len(documents), "unchanged": 0, "updated": 0, "failed": 2}
    reasons = {Path(d["source"]).name: d["reason"] for d in report["documents"] if d["status"] == "failed"}
    assert reasons["truncated.pdf"].startswith("damaged or truncated PDF")
    assert reasons["report.docx"] == "content is plain text but the file is named '*.docx'"
    assert _check(home)["documents"] == len(documents)
    listed = json.loads(_cli(home, "documents", "list", "--collection", "hospital", "--json").stdout)
    assert {d["filename"] for d in listed} == {p.name for p in documents.values()}
    assert all(d["acl"] == ["group:oncology"] and d["status"] == "indexed" and d["chunks"] > 0 for d in listed)
    pdf = next(d for d in listed if d["kind"] == "pdf")
    shown = json.loads(_cli(home, "documents", "show", pdf["id"][:12]).stdout)
    assert {c["page"] for c in shown["chunks"]} == {1, 2}


def test_reingest_is_idempotent_and_a_changed_file_replaces_its_old_version(library):
    home, folder, documents = library
    again = json.loads(
        _cli(home, "ingest", str(documents["md"]), str(documents["docx"]), "--collection", "hospital", "--json").stdout
    )
    assert again["counts"]["unchanged"] == 2 and again["counts"]["added"] == 0
    before = {d["filename"]: d["id"] for d in json.loads(_cli(home, "documents", "list", "--json").stdout)}
    documents["md"].write_text("# Retention\n\n## Adults\n\nAdult records are now kept for twelve years.\n")
    changed = json.loads(_cli(home, "ingest", str(documents["md"]), "--collection", "hospital", "--json").stdout)
    assert changed["counts"]["updated"] == 1
    after = {d["filename"]: d["id"] for d in json.loads(_cli(home, "documents", "list", "--json").stdout)}
    assert after["policy.md"] != before["policy.md"] and len(after) == len(before)
    assert _check(home)["documents"] == len(before)
    assert not list((home / "originals").glob(f"{before['policy.md']}*")), "the old original is gone"


def test_delete_leaves_no_trace(library):
    home, _folder, _documents = library
    listed = json.loads(_cli(home, "documents", "list", "--json").stdout)
    victim = next(d for d in listed if d["kind"] == "docx")
    _cli(home, "documents", "rm", victim["id"])
    remaining = json.loads(_cli(home, "documents", "list", "--json").stdout)
    assert victim["id"] not in {d["id"] for d in remaining}
    assert _check(home)["documents"] == len(listed) - 1
    originals = sorted(p.name.split(".")[0] for p in (home / "originals").iterdir() if not p.name.startswith("."))
    assert originals == sorted(d["id"] for d in remaining)
    missing = _cli(home, "documents", "rm", victim["id"], check=False)
    assert missing.returncode == 1 and "not found" in missing.stderr
    rebuilt = _cli(home, "index", "rebuild")
    assert "rebuilt the keyword and vector indexes" in rebuilt.stdout and ": clean" in rebuilt.stdout


def test_bad_acl_and_missing_path(library):
    home, folder, _documents = library
    bad = _cli(home, "ingest", str(folder), "--collection", "hospital", "--acl", "everyone", check=False)
    assert bad.returncode == 1 and "invalid ACL entry" in bad.stderr
    missing = _cli(home, "ingest", str(folder / "nope.pdf"), "--collection", "hospital", "--json", check=False)
    assert json.loads(missing.stdout)["documents"][0]["reason"] == "not a regular file"


def test_email_attachments_become_documents_of_their_own(tmp_path, fresh_stores):
    from tests.documents import write_docx, write_eml

    home = tmp_path / "home"
    home.mkdir()
    attachment = write_docx(tmp_path / "hold-scope.docx").read_bytes()
    eml = write_eml(tmp_path / "notice.eml", {"hold-scope.docx": attachment, "payload.exe": b"MZ\x90\x00"})
    report = json.loads(_cli(home, "ingest", str(eml), "--collection", "legal", "--json", check=False).stdout)
    by_name = {Path(d["source"].split("#")[-1]).name: d for d in report["documents"]}
    assert by_name["notice.eml"]["status"] == "added"
    assert by_name["hold-scope.docx"]["status"] == "added"
    assert by_name["payload.exe"] == {
        **by_name["payload.exe"],
        "status": "failed",
        "reason": "unsupported attachment type",
    }
    listed = {d["filename"] for d in json.loads(_cli(home, "documents", "list", "--json").stdout)}
    assert listed == {"notice.eml", "hold-scope.docx"}
    _check(home)
