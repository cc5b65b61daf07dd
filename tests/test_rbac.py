"""The access policy as a matrix (user x document -> readable), and the CLI that edits it, on real SQLite."""

import hashlib
import json

import pytest
from alembic import command
from sqlalchemy import create_engine
from sqlmodel import select

from appliance.access import rbac
from appliance.access.users import Principal, add_user, authenticate_key, create_key, disable_user, get_user, oidc_user
from appliance.config import Settings
from appliance.db import Collection, Document, alembic_config, create_db_engine, session
from appliance.errors import BadRequest, Conflict, NotFound, Unauthorized
from appliance.retrieval.index import ChunkIndex, open_vector_store
from appliance.retrieval.retrieve import Retriever
from tests.conftest import run_cli

DOCUMENTS = {
    # name: (collection, acl)
    "wards-policy": ("wards", ["collection:wards"]),
    "legal-brief": ("legal", ["collection:legal"]),
    "legal-for-bob": ("legal", ["user:bob"]),
    "notes-for-clinical": ("notes", ["group:clinical"]),
}

# user: (role, documents they may read)
MATRIX = {
    "alice": ("reader", {"wards-policy"}),  # direct grant on wards
    "carol": ("reader", {"wards-policy", "notes-for-clinical"}),  # grant via group clinical; group ACL on notes
    "dave": ("reader", set()),  # no grant at all
    "erin": ("reader", set()),  # granted legal, but walled off it as a user
    "frank": ("reader", set()),  # granted wards via clinical, walled off it via litigation; the wall also hides notes
    "bob": ("reader", {"legal-for-bob"}),  # only a document-level ACL, in a collection nobody granted him
    "root": ("admin", set()),  # the admin role reads nothing by itself
    "gina": ("reader", set()),  # granted wards, then disabled
}


def _document(name: str, collection: str, acl: list[str]) -> Document:
    return Document(
        id=hashlib.sha256(name.encode()).hexdigest(),
        collection=collection,
        source=name,
        filename=name,
        kind="md",
        size=1,
        acl=acl,
    )


@pytest.fixture
def engine(tmp_path):
    engine = create_db_engine(f"sqlite:///{tmp_path / 'appliance.db'}")
    for name, (role, _) in MATRIX.items():
        add_user(engine, name, role)
    for name in ("wards", "legal", "notes"):
        rbac.add_collection(engine, name)
    rbac.add_group(engine, "clinical")
    rbac.add_group(engine, "litigation")
    for user in ("carol", "frank"):
        rbac.add_member(engine, "clinical", user)
    rbac.add_member(engine, "litigation", "frank")
    rbac.add_grant(engine, "wards", user="alice")
    rbac.add_grant(engine, "wards", group="clinical")
    rbac.add_grant(engine, "legal", user="erin")
    rbac.add_wall(engine, "legal", user="erin")
    rbac.add_wall(engine, "wards", group="litigation")
    rbac.add_wall(engine, "notes", group="litigation")
    rbac.add_grant(engine, "wards", user="gina")
    with session(engine) as db:
        for name, (collection, acl) in DOCUMENTS.items():
            db.add(_document(name, collection, acl))
        db.commit()
    return engine


def _readable(access: rbac.Access) -> set[str]:
    return {name for name, (collection, acl) in DOCUMENTS.items() if access.can_read(collection, acl)}


@pytest.mark.parametrize("user", sorted(MATRIX))
def test_policy_matrix(engine, user):
    role, expected = MATRIX[user]
    if user == "gina":
        key = create_key(engine, "gina")
        assert rbac.access_for_user(engine, "gina").can_read_collection("wards")  # before disabling
        disable_user(engine, "gina")
        with pytest.raises(Unauthorized):
            authenticate_key(engine, key)
    by_name = rbac.access_for_user(engine, user)
    by_principal = rbac.access_for(engine, Principal(get_user(engine, user).id, user, role))
    assert by_name == by_principal
    assert _readable(by_name) == expected
    assert by_name.collections == {DOCUMENTS[name][0] for name in expected}
    assert not by_name.everything


def test_principals_and_walls_as_retrieval_sees_them(engine):
    carol = rbac.access_for_user(engine, "carol")
    assert carol.principals == {"user:carol", "group:clinical", "collection:wards"}
    assert carol.walled == frozenset()
    frank = rbac.access_for_user(engine, "frank")
    assert frank.walled == {"wards", "notes"} and "collection:wards" not in frank.principals
    assert "group:clinical" in frank.principals  # held, but the wall still hides walled collections
    bob = rbac.access_for_user(engine, "bob")
    assert "collection:legal" not in bob.principals and bob.can_read_collection("legal")
    assert not bob.can_read("legal", ["collection:legal"])


def test_the_operator_reads_everything(engine):
    from web.auth import LOCAL_ADMIN

    access = rbac.access_for(engine, LOCAL_ADMIN)
    assert access is rbac.OPERATOR and access.everything
    assert _readable(access) == set(DOCUMENTS)
    assert access.may("edit", "legal") and access.may("manage_policy")


def test_unknown_user_for_as_is_not_found(engine):
    with pytest.raises(NotFound):
        rbac.access_for_user(engine, "nobody")


def test_editing_needs_an_editor_grant_and_an_editing_role_and_walls_win(engine):
    add_user(engine, "ed", "editor")
    rbac.add_grant(engine, "notes", user="ed", role="editor")
    rbac.add_grant(engine, "legal", user="ed", role="editor")
    rbac.add_grant(engine, "notes", user="dave", role="editor")  # dave's role is reader: read only
    ed = rbac.access_for_user(engine, "ed")
    assert ed.editable == {"notes", "legal"} and ed.may("edit", "notes")
    assert not ed.may("manage_users")
    dave = rbac.access_for_user(engine, "dave")
    assert dave.editable == frozenset() and dave.may("read", "notes")
    rbac.add_wall(engine, "legal", user="ed")
    ed = rbac.access_for_user(engine, "ed")
    assert ed.editable == {"notes"} and not ed.may("read", "legal")
    root = rbac.access_for_user(engine, "root")
    assert root.may("manage_users") and not root.may("read", "wards")


def test_a_second_grant_replaces_the_role_and_rm_checks_it(engine):
    rbac.add_grant(engine, "wards", user="alice", role="editor")
    assert [g["role"] for g in rbac.list_grants(engine, "wards") if g["subject"] == "alice"] == ["editor"]
    with pytest.raises(NotFound):
        rbac.remove_grant(engine, "wards", user="alice", role="reader")
    rbac.remove_grant(engine, "wards", user="alice")
    assert rbac.access_for_user(engine, "alice").collections == frozenset()


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda e: rbac.add_collection(e, "../etc"), BadRequest),
        (lambda e: rbac.add_collection(e, "wards"), Conflict),
        (lambda e: rbac.add_group(e, "a:b"), BadRequest),
        (lambda e: rbac.add_group(e, "clinical"), Conflict),
        (lambda e: rbac.add_member(e, "clinical", "carol"), Conflict),
        (lambda e: rbac.add_member(e, "nope", "carol"), NotFound),
        (lambda e: rbac.add_grant(e, "nope", user="alice"), NotFound),
        (lambda e: rbac.add_grant(e, "wards", user="alice", role="owner"), BadRequest),
        (lambda e: rbac.add_grant(e, "wards", user="alice", group="clinical"), BadRequest),
        (lambda e: rbac.add_wall(e, "wards", user="nobody"), NotFound),
        (lambda e: rbac.remove_wall(e, "wards", user="alice"), NotFound),
    ],
)
def test_service_errors(engine, call, error):
    with pytest.raises(error):
        call(engine)


def test_ensure_collection_is_idempotent(engine):
    assert rbac.ensure_collection(engine, "new").id == rbac.ensure_collection(engine, "new").id
    assert rbac.ensure_collection(engine, "wards").name == "wards"


def test_cli_round_trip_applies_on_the_next_request(fresh_home):
    """CLI processes edit the policy; an engine opened before them (as a running server's) sees it at once."""
    run_cli(fresh_home, "users", "add", "alice", "--role", "reader")
    key = run_cli(fresh_home, "keys", "create", "--user", "alice").stdout.strip()
    run_cli(fresh_home, "collections", "add", "wards", "--description", "Ward policies")
    engine = create_db_engine(f"sqlite:///{fresh_home / 'appliance.db'}")
    alice = authenticate_key(engine, key)
    assert rbac.access_for(engine, alice).collections == frozenset()

    run_cli(fresh_home, "groups", "add", "clinical")
    run_cli(fresh_home, "groups", "add-member", "clinical", "alice")
    run_cli(fresh_home, "grants", "add", "--collection", "wards", "--group", "clinical")
    assert rbac.access_for(engine, alice).collections == {"wards"}
    assert json.loads(run_cli(fresh_home, "grants", "list", "--json").stdout) == [
        {"collection": "wards", "kind": "group", "subject": "clinical", "role": "reader"}
    ]
    assert json.loads(run_cli(fresh_home, "groups", "list", "--json").stdout) == [
        {"name": "clinical", "members": ["alice"]}
    ]
    listed = json.loads(run_cli(fresh_home, "collections", "list", "--json").stdout)
    assert [(c["name"], c["description"], c["documents"]) for c in listed] == [("wards", "Ward policies", 0)]

    run_cli(fresh_home, "walls", "add", "--collection", "wards", "--user", "alice")
    assert "alice" in run_cli(fresh_home, "walls", "list").stdout
    assert rbac.access_for(engine, alice).walled == {"wards"}
    assert rbac.access_for(engine, alice).collections == frozenset()
    run_cli(fresh_home, "walls", "rm", "--collection", "wards", "--user", "alice")
    assert rbac.access_for(engine, alice).collections == {"wards"}

    run_cli(fresh_home, "grants", "rm", "--collection", "wards", "--group", "clinical")
    assert rbac.access_for(engine, alice).collections == frozenset()
    assert json.loads(run_cli(fresh_home, "grants", "list", "--json").stdout) == []

    assert "revoked 1 key(s)" in run_cli(fresh_home, "users", "disable", "alice").stdout
    with pytest.raises(Unauthorized):
        authenticate_key(engine, key)
    assert rbac.access_for(engine, alice) == rbac.NOBODY


@pytest.mark.parametrize(
    "args, message",
    [
        (["grants", "add", "--collection", "nope", "--user", "alice"], "collections add nope"),
        (["grants", "rm", "--collection", "wards", "--user", "alice"], "no grant"),
        (["groups", "add-member", "nope", "alice"], "group 'nope' not found"),
        (["collections", "add", "bad/name"], "collection name"),
        (["users", "disable", "nobody"], "not found"),
        (["users", "add", "Local-Operator", "--role", "reader"], "reserved"),
    ],
)
def test_cli_errors_are_clear(fresh_home, args, message):
    run_cli(fresh_home, "users", "add", "alice", "--role", "reader")
    run_cli(fresh_home, "collections", "add", "wards")
    result = run_cli(fresh_home, *args, check=False)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_migration_0004_gives_existing_collections_a_row(tmp_path):
    url = f"sqlite:///{tmp_path / 'appliance.db'}"
    config = alembic_config(url)
    command.upgrade(config, "0003")
    engine = create_engine(url)
    with engine.begin() as connection:
        for n, collection in enumerate(("wards", "wards", "legal")):
            connection.exec_driver_sql(
                "INSERT INTO document (id, collection, source, filename, kind, size, acl, status, chunk_count, "
                f"created_at) VALUES ('{n:064x}', '{collection}', 's{n}', 'f', 'md', 1, '[]', 'indexed', 0, "
                "'2026-01-01 00:00:00')"
            )
    engine.dispose()
    engine = create_db_engine(url)  # upgrades to head
    with session(engine) as db:
        assert sorted(c.name for c in db.exec(select(Collection))) == ["legal", "wards"]


def test_an_upload_creates_its_collection(server):
    with server.http() as api:
        response = api.post(
            "/api/documents", data={"collection": "uploaded-here"}, files=[("file", ("a.md", b"# Rota\n\nNights."))]
        )
    assert response.status_code == 200, response.text
    listed = json.loads(run_cli(server.home, "collections", "list", "--json").stdout)
    assert "uploaded-here" in [c["name"] for c in listed]


def test_an_acl_names_only_users_groups_and_collections_that_exist(tmp_path):
    """An ACL entry for a name nobody holds would be inherited by whoever gets that name later (finding 11);
    and a name that a document's ACL already holds is never given to a newcomer signing in with OIDC."""
    engine = create_db_engine(f"sqlite:///{tmp_path / 'acl.db'}")
    add_user(engine, "alice", "reader")
    rbac.add_group(engine, "nursing")
    rbac.add_collection(engine, "wards")
    rbac.check_acl_subjects(engine, ["user:alice", "group:nursing", "collection:wards"], "wards")
    rbac.check_acl_subjects(engine, ["collection:brand-new"], "brand-new")  # created with the upload
    with pytest.raises(BadRequest, match="no such entries: collection:elsewhere, group:ghosts, user:ghost"):
        rbac.check_acl_subjects(engine, ["user:alice", "user:ghost", "group:ghosts", "collection:elsewhere"], "wards")
    # An entry left from before the check (written straight to the database) keeps its name from newcomers.
    with session(engine) as db:
        db.add(
            Document(
                id="d" * 64, collection="wards", source="s", filename="f.md", kind="md", size=1, acl=["user:ghost"]
            )
        )
        db.commit()
    newcomer, created = oidc_user(engine, "https://idp.example", "subject-1", "ghost", "reader")
    assert created and newcomer.name == "ghost-2"
    assert not rbac.access_for_user(engine, "ghost-2").principals & {"user:ghost"}


@pytest.mark.slow
def test_document_acl_and_role_changes_from_the_cli(fresh_home, tmp_path):
    """`documents acl` narrows one document at once for both searches; `users role` changes what a user may
    do on their next request and never removes the last administrator; both are audited."""
    note = tmp_path / "night-shift.md"
    note.write_text("# Night shift\n\nThe night shift handover happens at the nurses' station at 19:45.\n")
    run_cli(fresh_home, "ingest", str(note), "--collection", "wards")
    for name, role in (("alice", "reader"), ("bob", "reader"), ("boss", "admin")):
        run_cli(fresh_home, "users", "add", name, "--role", role)
    run_cli(fresh_home, "grants", "add", "--collection", "wards", "--user", "alice")
    [document] = json.loads(run_cli(fresh_home, "documents", "list", "--json").stdout)

    def found(user: str) -> set[str]:
        hits = json.loads(run_cli(fresh_home, "search", "night shift handover", "--as", user, "--json").stdout)
        return {h["document_id"] for h in hits["results"]}

    assert found("alice") == {document["id"]} and found("bob") == set()
    refused = run_cli(fresh_home, "documents", "acl", document["id"][:12], "--acl", "user:bobby", check=False)
    assert refused.returncode != 0 and "no such entry: user:bobby" in refused.stderr
    run_cli(fresh_home, "documents", "acl", document["id"][:12], "--acl", "user:bob")
    assert found("alice") == set() and found("bob") == {document["id"]}
    engine = create_db_engine(f"sqlite:///{fresh_home / 'appliance.db'}")
    keyword = Retriever(ChunkIndex(engine, open_vector_store(Settings(home=fresh_home))), None, Settings().retrieval)
    for user, expected in (("alice", 0), ("bob", 1)):
        access = rbac.access_for_user(engine, user)
        assert len({c.split(":")[0] for c in keyword.keyword_search("handover", access, None, 10)}) == expected
    run_cli(fresh_home, "documents", "acl", document["id"][:12])  # back to the collection's readers
    assert found("alice") == {document["id"]} and found("bob") == set()

    assert "reader -> editor" in run_cli(fresh_home, "users", "role", "alice", "editor").stdout
    assert not rbac.access_for_user(engine, "alice").editable  # an editor now, but her grant says reader
    run_cli(fresh_home, "grants", "add", "--collection", "wards", "--user", "alice", "--role", "editor")
    assert rbac.access_for_user(engine, "alice").editable == {"wards"}
    refused = run_cli(fresh_home, "users", "role", "boss", "reader", check=False)
    assert refused.returncode == 1 and "last administrator" in refused.stderr
    records = [json.loads(line) for line in run_cli(fresh_home, "audit", "export").stdout.splitlines()]
    done = [r["action"] for r in records if r["outcome"] == "ok"]
    assert done.count("acl_set") == 2 and done.count("role_set") == 1
    failed = [r["action"] for r in records if r["outcome"] == "failed"]  # the refused changes are audited too
    assert failed.count("acl_set") == 1 and failed.count("role_set") == 1
