"""The audit log: one hash chain that `appliance audit verify` checks, refused edits at the database
level, edits behind the database's back caught and named, concurrent writers kept on one chain, and
nothing secret or textual in what `appliance audit export` prints."""

import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from appliance.access import audit
from appliance.db import create_db_engine
from tests.conftest import run_cli

CORPUS = Path(__file__).parent.parent / "sample_corpus"
SECRET_SENTENCE = "The night porter keeps the spare pharmacy key in the blue tin behind reception."


def _export(home: Path, *args: str, **env: str) -> list[dict]:
    return [json.loads(line) for line in run_cli(home, "audit", "export", *args, **env).stdout.splitlines()]


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> Path:
    """A home whose log holds the records of a few administrative commands (ids 1-6)."""
    home = tmp_path_factory.mktemp("audited")
    run_cli(home, "users", "add", "alice", "--role", "reader")
    run_cli(home, "groups", "add", "clinical")
    run_cli(home, "groups", "add-member", "clinical", "alice")
    run_cli(home, "collections", "add", "wards")
    run_cli(home, "grants", "add", "--collection", "wards", "--group", "clinical")
    run_cli(home, "walls", "add", "--collection", "wards", "--user", "alice")
    return home


def _tampered(logged: Path, tmp_path: Path, *statements: str) -> Path:
    """A copy of the logged home's database, changed behind the appliance's back (triggers dropped first)."""
    home = tmp_path / "home"
    home.mkdir()
    source = sqlite3.connect(logged / "appliance.db")
    copy = sqlite3.connect(home / "appliance.db")
    source.backup(copy)
    source.close()
    copy.execute("DROP TRIGGER audit_record_no_update")
    copy.execute("DROP TRIGGER audit_record_no_delete")
    for statement in statements:
        copy.execute(statement)
    copy.commit()
    copy.close()
    return home


def test_the_chain_verifies_and_names_the_commands(logged):
    result = run_cli(logged, "audit", "verify")
    assert result.stdout.startswith("OK: 6 records, the chain is intact")
    records = _export(logged)
    assert [r["action"] for r in records] == [
        "user_add",
        "group_add",
        "member_add",
        "collection_add",
        "grant_add",
        "wall_add",
    ]
    assert {r["actor"] for r in records} == {"local-operator"}
    assert records[0]["prev_hash"] == audit.GENESIS
    assert all(later["prev_hash"] == earlier["hash"] for earlier, later in zip(records, records[1:], strict=False))
    assert records[4]["target"] == "wards"
    assert records[4]["details"] == {"subject_kind": "group", "subject": "clinical", "role": "reader"}


def test_update_and_delete_are_refused_by_the_database(logged):
    connection = sqlite3.connect(logged / "appliance.db")
    try:
        for statement in ("UPDATE audit_record SET actor = 'mallory' WHERE id = 2", "DELETE FROM audit_record"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                connection.execute(statement)
    finally:
        connection.close()
    assert run_cli(logged, "audit", "verify").stdout.startswith("OK: 6 records")


@pytest.mark.parametrize(
    ("statements", "bad_id", "why"),
    [
        (['UPDATE audit_record SET details = \'{"subject": "everyone"}\' WHERE id = 5'], 5, "edited"),
        (["UPDATE audit_record SET actor = 'alice' WHERE id = 2"], 2, "edited"),
        (["UPDATE audit_record SET at = '2020-01-01 00:00:00.000000' WHERE id = 6"], 6, "edited"),
        (["DELETE FROM audit_record WHERE id = 3"], 4, "removed"),
        (["DELETE FROM audit_record WHERE id = 1"], 2, "removed"),
        (  # two records swap places
            [
                "UPDATE audit_record SET id = 100 WHERE id = 3",
                "UPDATE audit_record SET id = 3 WHERE id = 4",
                "UPDATE audit_record SET id = 4 WHERE id = 100",
            ],
            3,
            "reordered",
        ),
        (["UPDATE audit_record SET hash = substr(hash, 2) || substr(hash, 1, 1) WHERE id = 4"], 4, "edited"),
    ],
)
def test_verify_names_the_first_bad_record(logged, tmp_path, statements, bad_id, why):
    home = _tampered(logged, tmp_path, *statements)
    result = run_cli(home, "audit", "verify", check=False)
    assert result.returncode == 1
    assert result.stdout.startswith(f"BROKEN: record {bad_id}:") and why in result.stdout
    ok, first_bad, reason = audit.verify(create_db_engine(f"sqlite:///{home / 'appliance.db'}"))
    assert (ok, first_bad) == (False, bad_id) and why in reason


def test_an_edit_with_a_recomputed_hash_breaks_the_next_link(logged, tmp_path):
    record = _export(logged)[3]
    forged = {**record, "details": {"forged": True}}
    forged["at"] = audit.parse_since(record["at"])
    digest = audit._digest(forged)
    home = _tampered(
        logged,
        tmp_path,
        f"UPDATE audit_record SET details = '{{\"forged\": true}}', hash = '{digest}' WHERE id = {record['id']}",
    )
    result = run_cli(home, "audit", "verify", check=False)
    assert result.returncode == 1 and result.stdout.startswith(f"BROKEN: record {record['id'] + 1}:")
    assert "re-hashed" in result.stdout


def test_concurrent_writers_keep_one_chain(tmp_path):
    """Threads of one process and several processes append at once; the chain never forks."""
    url = f"sqlite:///{tmp_path / 'appliance.db'}"
    engine = create_db_engine(url)
    script = (
        "import sys; from appliance.access import audit; from appliance.db import create_db_engine\n"
        "engine = create_db_engine(sys.argv[1])\n"
        "for n in range(20): audit.record(engine, f'proc{sys.argv[2]}', 'search', details={'n': n})\n"
    )
    processes = [subprocess.Popen([sys.executable, "-c", script, url, str(p)]) for p in range(3)]
    errors: list[BaseException] = []

    def write(thread: int) -> None:
        try:
            for n in range(25):
                audit.record(engine, f"thread{thread}", "ask", actor_id=thread, details={"n": n})
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [p.wait(120) for p in processes] == [0, 0, 0]
    assert errors == []
    result = audit.check(engine)
    assert result.ok and result.records == 6 * 25 + 3 * 20
    records = list(audit.export(engine))
    assert [r["id"] for r in records] == list(range(1, 211))
    assert len({r["prev_hash"] for r in records}) == 210  # no two records chain from the same one


def test_no_document_text_or_key_in_the_log_and_question_text_only_when_allowed(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "porter.md").write_text(f"# Night porter\n\n{SECRET_SENTENCE}\n")
    for name, text in (
        ("parking.md", "# Parking\n\nVisitor parking costs two pounds per hour at the main entrance."),
        ("canteen.md", "# Canteen\n\nThe staff canteen serves breakfast from seven until ten."),
        ("laundry.md", "# Laundry\n\nSoiled linen goes to the laundry chute on the ground floor."),
    ):
        (tmp_path / "docs" / name).write_text(text)
    run_cli(home, "ingest", str(tmp_path / "docs"), "--collection", "wards")
    run_cli(home, "users", "add", "alice", "--role", "reader")
    run_cli(home, "users", "add", "bob", "--role", "reader", "--password-stdin", input="hunter2hunter2\n")
    key = run_cli(home, "keys", "create", "--user", "alice").stdout.strip()
    run_cli(home, "grants", "add", "--collection", "wards", "--user", "alice")
    question = "Where does the night porter keep the spare pharmacy key?"
    answer = json.loads(run_cli(home, "ask", question, "--collection", "wards", "--json").stdout)
    assert SECRET_SENTENCE in answer["answer"]  # the extractive answer quotes the document
    run_cli(home, "keys", "revoke", key[:12])

    exported = run_cli(home, "audit", "export").stdout
    for secret in (key, key[12:], "hunter2hunter2", SECRET_SENTENCE, "blue tin", question, "pharmacy key"):
        assert secret not in exported, secret
    records = [json.loads(line) for line in exported.splitlines()]
    by_action = {r["action"]: r for r in records}
    assert by_action["upload"]["details"]["result"] == "added" and by_action["upload"]["target"] == "wards"
    assert by_action["key_create"]["details"] == {"prefix": key[:12], "label": ""}
    assert by_action["key_revoke"]["target"] == key[:12]
    assert by_action["user_add"]["details"] == {"role": "reader", "with_password": True}  # bob, the last one
    asked = by_action["ask"]["details"]
    assert asked["cited"] == [c["chunk_id"] for c in answer["citations"]] and asked["cited"]
    assert asked["retrieved"] == answer["retrieved"] and asked["mode"] == "extractive"
    assert asked["as_user"] is None and "question" not in asked

    run_cli(home, "ask", question, "--as", "alice", APPLIANCE_AUDIT_QUESTION_TEXT="true")
    [_, with_text] = _export(home, "--since", records[-1]["at"])
    assert with_text["details"]["question"] == question and with_text["details"]["as_user"] == "alice"
    assert with_text["details"]["cited"] == asked["cited"]  # alice reads the collection through her grant
    assert SECRET_SENTENCE not in json.dumps(with_text)
    assert run_cli(home, "audit", "verify").stdout.startswith(f"OK: {len(records) + 1} records")


def test_export_filters(logged):
    everything = _export(logged)
    assert [r["action"] for r in _export(logged, "--action", "grant_add")] == ["grant_add"]
    assert _export(logged, "--user", "local-operator") == everything
    assert _export(logged, "--user", "alice") == []
    assert _export(logged, "--since", "2000-01-01") == everything
    assert _export(logged, "--since", "2999-01-01T00:00:00Z") == []
    assert _export(logged, "--since", everything[3]["at"]) == everything[3:]
    bad = run_cli(logged, "audit", "export", "--since", "yesterday", check=False)
    assert bad.returncode == 1 and "not an ISO date" in bad.stderr
    engine = create_db_engine(f"sqlite:///{logged / 'appliance.db'}")
    page, total = audit.search(engine, action="member_add")
    assert total == 1 and page[0]["details"] == {"user": "alice"} and page[0]["target"] == "clinical"
    newest, total = audit.search(engine, limit=2)
    assert total == len(everything) and [r["id"] for r in newest] == [everything[-1]["id"], everything[-2]["id"]]


def test_details_never_carry_secrets_or_text(tmp_path):
    engine = create_db_engine(f"sqlite:///{tmp_path / 'appliance.db'}")
    for key in ("password", "api_key", "text", "answer"):
        with pytest.raises(ValueError, match="no secrets or document text"):
            audit.record(engine, "alice", "ask", details={key: "x"})
    with pytest.raises(ValueError, match="unknown audit action"):
        audit.record(engine, "alice", "shred")
    assert audit.verify(engine) == (True, None, None) and audit.check(engine).records == 0
