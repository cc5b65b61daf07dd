"""The restore drill: ingest, back up while the server runs, wipe, restore, ask: the same answers.

Also: a damaged or altered archive, a path-traversal member and a non-empty home are refused and
leave nothing behind.
"""

import io
import json
import shutil
import tarfile

import pytest

from tests.conftest import HERE, launch_server, run_cli, stop_server

CORPUS = HERE.parent / "sample_corpus"
QUESTIONS = [
    "What is the retention period for adult medical records?",
    "Who must be informed when a patient shows signs of sepsis?",
]


def _ask(home, question: str) -> dict:
    result = run_cli(home, "ask", question, "--collection", "hospital", "--json")
    answer = json.loads(result.stdout)
    return {
        "answer": answer["answer"],
        "grounded": answer["grounded"],
        "citations": [(c["chunk_id"], c["document_id"], c["quote"], c["start"], c["end"]) for c in answer["citations"]],
    }


@pytest.fixture(scope="module")
def drill(tmp_path_factory, tiny_gguf):
    """A home with two documents, a model and an admin, backed up while its server runs."""
    root = tmp_path_factory.mktemp("backup")
    home = root / "home"
    home.mkdir()
    run_cli(home, "users", "add", "admin", "--role", "admin")
    admin_key = run_cli(home, "keys", "create", "--user", "admin").stdout.strip()
    for name in ("records-retention-policy.md", "sepsis-escalation-pathway.md"):
        run_cli(home, "ingest", str(CORPUS / "hospital" / name), "--collection", "hospital")
    before = {q: _ask(home, q) for q in QUESTIONS}  # extractive: no generation model yet, so deterministic
    run_cli(home, "create", "tiny", "--from", str(tiny_gguf))
    server = launch_server(home, admin_key, admin_key)
    try:
        archive = root / "appliance-backup.tar.gz"
        result = run_cli(home, "backup", "--out", str(archive))
        assert "2 documents" in result.stdout
        server.assert_alive()  # the server kept serving while the snapshot was taken
    finally:
        stop_server(server)
    return root, home, archive, before


def test_restore_drill_gives_the_same_answers_and_citations(drill):
    root, home, archive, before = drill
    restored = root / "restored-home"
    result = run_cli(restored, "restore", str(archive))
    assert "restored 2 documents" in result.stdout and "clean" in result.stdout
    assert run_cli(restored, "index", "check").returncode == 0
    assert "tiny:latest" in run_cli(restored, "list").stdout  # the model store came back, blobs verified on load
    run_cli(restored, "rm", "tiny")  # ask as before the model was added: extractive, deterministic
    assert {q: _ask(restored, q) for q in QUESTIONS} == before
    assert all(answer["citations"] for answer in before.values())
    verified = run_cli(restored, "audit", "verify")
    assert verified.returncode == 0
    restored_log = [json.loads(line)["action"] for line in run_cli(restored, "audit", "export").stdout.splitlines()]
    original_log = [json.loads(line)["action"] for line in run_cli(home, "audit", "export").stdout.splitlines()]
    at_snapshot = original_log[: original_log.index("backup")]  # the backup's own record follows the snapshot
    assert at_snapshot and restored_log[: len(at_snapshot)] == at_snapshot
    assert restored_log[len(at_snapshot)] == "restore"


def test_restore_refuses_a_home_that_is_not_empty(drill):
    _root, home, archive, _before = drill
    result = run_cli(home, "restore", str(archive), check=False)
    assert result.returncode == 1 and "not empty" in result.stderr


def _rewrite(archive, target, change):
    """Copy the archive member by member, letting `change(name, data)` alter or add members."""
    with tarfile.open(archive, "r:*") as source, tarfile.open(target, "w") as out:
        for member in source:
            data = source.extractfile(member).read()
            for name, content in change(member.name, data):
                info = tarfile.TarInfo(name)
                info.size = len(content)
                out.addfile(info, io.BytesIO(content))


def _assert_refused_and_nothing_left(home, archive, message):
    result = run_cli(home, "restore", str(archive), check=False)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert not any(p.is_file() for p in home.rglob("*")), "a refused restore left files behind"


def test_an_altered_original_is_refused(drill, tmp_path):
    _root, _home, archive, _before = drill
    altered = tmp_path / "altered.tar"

    def change(name, data):
        if name.startswith("originals/"):
            data = data.replace(b"retention", b"RETENTION", 1)
        yield name, data

    _rewrite(archive, altered, change)
    _assert_refused_and_nothing_left(tmp_path / "home", altered, "checksum mismatch")


def test_a_member_escaping_the_home_is_refused(drill, tmp_path):
    _root, _home, archive, _before = drill
    evil = tmp_path / "evil.tar"

    def change(name, data):
        yield name, data
        if name == "manifest.json":
            yield "originals/../../escaped.txt", b"written outside the home"

    _rewrite(archive, evil, change)
    _assert_refused_and_nothing_left(tmp_path / "home", evil, "not a plain relative path")
    assert not (tmp_path / "escaped.txt").exists()


def test_a_link_member_is_refused(drill, tmp_path):
    _root, _home, archive, _before = drill
    linked = tmp_path / "linked.tar"
    shutil.copy(archive, tmp_path / "copy.tar.gz")
    with tarfile.open(tmp_path / "copy.tar.gz", "r:*") as source, tarfile.open(linked, "w") as out:
        for member in source:
            out.addfile(member, source.extractfile(member))
        link = tarfile.TarInfo("originals/passwd")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        out.addfile(link)
    _assert_refused_and_nothing_left(tmp_path / "home", linked, "link or a special file")


def test_backup_inside_the_home_is_refused(drill):
    _root, home, _archive, _before = drill
    result = run_cli(home, "backup", "--out", str(home / "self.tar"), check=False)
    assert result.returncode == 1 and "outside the appliance home" in result.stderr
