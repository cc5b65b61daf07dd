"""appliance.documents on real SQLite: the reads through the SQL form of the read rule agree with
`Access.can_read` row by row, and the upload rule (who may upload where, who creates a collection) with
its audit records."""

import pytest
from sqlmodel import select

from appliance import documents
from appliance.access import audit, rbac
from appliance.access.actors import Actor
from appliance.access.users import Principal, add_user, get_user
from appliance.db import Document, create_db_engine, session
from appliance.errors import Forbidden
from tests.test_rbac import _document

# name: (collection, acl, status)
DOCUMENTS = {
    "wards-policy.md": ("wards", ["collection:wards"], "indexed"),
    "Wards-Rota.md": ("wards", ["collection:wards"], "indexing"),
    "legal-brief.md": ("legal", ["collection:legal"], "indexed"),
    "legal-for-bob.md": ("legal", ["user:bob"], "indexed"),
    "notes-for-clinical.md": ("notes", ["group:clinical"], "indexed"),
    "drafts-for-carol.md": ("drafts", ["user:carol"], "indexing"),
}
USERS = {"alice": "reader", "bob": "reader", "carol": "reader", "frank": "reader", "ed": "editor", "root": "admin"}
MEMBERS = {"clinical": ("carol", "frank"), "litigation": ("frank",)}
# (collection, subject, role): grants on wards; frank's group is walled off notes (None: a wall)
POLICY = [
    ("wards", {"user": "alice"}, "reader"),
    ("wards", {"group": "clinical"}, "reader"),
    ("wards", {"user": "ed"}, "editor"),
    ("notes", {"group": "litigation"}, None),
]


@pytest.fixture
def engine(tmp_path):
    engine = create_db_engine(f"sqlite:///{tmp_path / 'appliance.db'}")
    for name, role in USERS.items():
        add_user(engine, name, role)
    for name in sorted({collection for collection, _, _ in DOCUMENTS.values()}):
        rbac.add_collection(engine, name)
    for group, members in MEMBERS.items():
        rbac.add_group(engine, group)
        for user in members:
            rbac.add_member(engine, group, user)
    for collection, subject, role in POLICY:
        if role is None:
            rbac.add_wall(engine, collection, **subject)
        else:
            rbac.add_grant(engine, collection, **subject, role=role)
    with session(engine) as db:
        for name, (collection, acl, status) in DOCUMENTS.items():
            document = _document(name, collection, acl)
            document.status = status
            db.add(document)
        db.commit()
    return engine


def _principal(engine, name: str) -> Principal:
    user = get_user(engine, name)
    assert user.id is not None
    return Principal(user.id, name, user.role)


def _accesses(engine) -> dict[str, rbac.Access]:
    return {**{name: rbac.access_for_user(engine, name) for name in USERS}, "operator": rbac.OPERATOR}


def test_readable_documents_are_those_can_read_admits_in_the_same_order(engine):
    with session(engine) as db:
        every = list(db.exec(select(Document).order_by(Document.collection, Document.filename)))
    for who, access in _accesses(engine).items():
        for collection in (None, "", "wards", "legal", "notes", "drafts", "nowhere"):
            for name in (None, "", "  WARDS ", "for", "zzz"):
                needle = (name or "").strip().lower()
                expected = [
                    d.id
                    for d in every
                    if access.can_read(d.collection, d.acl)
                    and (not collection or d.collection == collection)
                    and needle in d.filename.lower()
                ]
                got = [d.id for d in documents.readable_documents(engine, access, collection, name)]
                assert got == expected, (who, collection, name)
        assert documents.readable_document_collections(engine, access) == sorted(
            {d.collection for d in every if access.can_read(d.collection, d.acl)}
        ), who


def test_what_each_caller_reads(engine):
    def names(who: str) -> list[str]:
        return [d.filename for d in documents.readable_documents(engine, rbac.access_for_user(engine, who))]

    assert names("alice") == ["Wards-Rota.md", "wards-policy.md"]  # any status: the listing shows indexing ones
    assert names("bob") == ["legal-for-bob.md"]  # only through the document's ACL
    assert names("carol") == ["drafts-for-carol.md", "notes-for-clinical.md", "Wards-Rota.md", "wards-policy.md"]
    assert names("frank") == ["Wards-Rota.md", "wards-policy.md"]  # the wall on notes beats the group ACL
    assert names("root") == []  # the admin role reads nothing by itself
    assert len(documents.readable_documents(engine, rbac.OPERATOR)) == len(DOCUMENTS)
    assert documents.readable_documents(engine, rbac.NOBODY) == []
    alice = rbac.access_for_user(engine, "alice")
    assert [d.filename for d in documents.readable_documents(engine, alice, "wards", "rota")] == ["Wards-Rota.md"]
    assert documents.readable_documents(engine, alice, "legal") == []


def test_readable_collections_hold_indexed_documents_the_caller_may_read(engine):
    accesses = _accesses(engine)
    assert documents.indexed_collections(engine) == {"wards", "legal", "notes"}  # drafts holds none indexed yet
    assert documents.readable_collections(engine, accesses["operator"]) == ["legal", "notes", "wards"]
    assert documents.readable_collections(engine, accesses["carol"]) == ["notes", "wards"]
    assert documents.readable_collections(engine, accesses["bob"]) == ["legal"]
    assert documents.readable_collections(engine, accesses["frank"]) == ["wards"]
    assert documents.readable_collections(engine, accesses["root"]) == []


def test_who_may_upload_where(engine):
    accesses = _accesses(engine)
    offered = {who: access.may_upload_somewhere() for who, access in accesses.items()}
    assert offered == {
        "alice": False,
        "bob": False,
        "carol": False,
        "frank": False,
        "ed": True,
        "root": True,
        "operator": True,
    }
    assert [who for who, access in accesses.items() if access.may_upload_by_role()] == ["ed", "root", "operator"]
    assert [who for who, access in accesses.items() if access.may_create_collection()] == ["root", "operator"]
    assert documents.editable_collections(engine, accesses["ed"]) == ["wards"]
    assert documents.editable_collections(engine, accesses["root"]) == []
    assert documents.editable_collections(engine, accesses["operator"]) == ["drafts", "legal", "notes", "wards"]
    add_user(engine, "newbie", "editor")  # the editor role, no grant yet: may upload by role, nowhere yet
    newbie = rbac.access_for_user(engine, "newbie")
    assert newbie.may_upload_by_role() and not newbie.may_upload_somewhere()


def _upload_records(engine) -> list[dict]:
    return [r for r in audit.export(engine, action="upload")]


def test_a_reader_is_refused_by_role_and_the_refusal_is_audited(engine):
    alice = _principal(engine, "alice")
    with pytest.raises(Forbidden, match="editor \\(or admin\\) role"):
        documents.check_upload_role(engine, Actor.of(engine, alice))
    [refused] = _upload_records(engine)
    assert (refused["actor"], refused["actor_id"], refused["target"], refused["outcome"]) == (
        "alice",
        alice.user_id,
        None,
        "denied",
    )
    assert refused["details"] == {
        "reason": "uploading needs the editor (or admin) role and an editor grant on the collection"
    }
    documents.check_upload_role(engine, Actor.of(engine, _principal(engine, "ed")))
    assert len(_upload_records(engine)) == 1  # allowed: nothing recorded


def test_an_editor_uploads_only_where_granted_whether_the_collection_exists_or_not(engine):
    ed = Actor.of(engine, _principal(engine, "ed"))
    documents.authorize_upload(engine, ed, "wards")
    for collection in ("legal", "brand-new"):
        with pytest.raises(Forbidden) as refused:
            documents.authorize_upload(engine, ed, collection)
        assert refused.value.message == f"uploading to collection '{collection}' needs an editor grant on it"
    assert "brand-new" not in {c["name"] for c in rbac.list_collections(engine)}  # an editor creates nothing
    records = _upload_records(engine)
    assert [(r["actor"], r["target"], r["outcome"], r["details"]) for r in records] == [
        ("ed", c, "denied", {"reason": f"uploading to collection '{c}' needs an editor grant on it"})
        for c in ("legal", "brand-new")
    ]


def test_an_admin_who_names_a_new_collection_creates_it_and_becomes_its_editor(engine):
    root = _principal(engine, "root")
    documents.authorize_upload(engine, Actor.of(engine, root), "cases")
    assert "cases" in {c["name"] for c in rbac.list_collections(engine)}
    assert {"collection": "cases", "kind": "user", "subject": "root", "role": "editor"} in rbac.list_grants(engine)
    assert rbac.access_for_user(engine, "root").may("edit", "cases")
    with pytest.raises(Forbidden):  # an existing collection without a grant: refused, as for an editor
        documents.authorize_upload(engine, Actor.of(engine, root), "legal")
    assert [(r["target"], r["outcome"]) for r in _upload_records(engine)] == [("legal", "denied")]


def test_the_operator_uploads_anywhere_and_a_new_collection_is_created_without_a_grant(engine):
    documents.authorize_upload(engine, Actor.operator(), "archive")
    assert "archive" in {c["name"] for c in rbac.list_collections(engine)}
    assert rbac.list_grants(engine, "archive") == []
    assert _upload_records(engine) == []
