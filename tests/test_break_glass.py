"""Break-glass: an admin's own time-limited reader grant, with a reason, audited; expired ones never count,
walls beat it, and nobody else may take one (real SQLite; the CLI as a subprocess)."""

import json
from datetime import timedelta

import pytest
from sqlalchemy import update

from appliance.access import audit, rbac
from appliance.access.users import add_user, disable_user
from appliance.db import Document, Grant, create_db_engine, session, utcnow
from appliance.errors import BadRequest, Conflict, Forbidden
from tests.conftest import run_cli

REASON = "Patient 4711 transferred from ICU, consultant asked for the ward notes"


@pytest.fixture
def engine(tmp_path):
    engine = create_db_engine(f"sqlite:///{tmp_path / 'appliance.db'}")
    for name, role in (("root", "admin"), ("walled-root", "admin"), ("ed", "editor"), ("rita", "reader")):
        add_user(engine, name, role)
    for name in ("wards", "legal"):
        rbac.add_collection(engine, name)
    rbac.add_group(engine, "litigation")
    rbac.add_member(engine, "litigation", "walled-root")
    rbac.add_wall(engine, "wards", group="litigation")
    with session(engine) as db:
        db.add(Document(id="a" * 64, collection="wards", source="w", filename="w.md", kind="md", size=1,
                        acl=["collection:wards"]))  # fmt: skip
        db.commit()
    return engine


def _expire(engine, user: str) -> None:
    """Move a user's break-glass grants one second into the past (as time passing would)."""
    user_id = rbac.get_user(engine, user).id
    with session(engine) as db:
        past = utcnow() - timedelta(seconds=1)
        mine = (Grant.subject_kind == "user") & (Grant.subject_id == user_id) & Grant.expires_at.is_not(None)
        db.execute(update(Grant).where(mine).values(expires_at=past))
        db.commit()


def test_an_admin_reads_until_it_expires_and_then_not_at_all(engine):
    assert not rbac.access_for_user(engine, "root").can_read("wards", ["collection:wards"])
    grant = rbac.break_glass(engine, "root", "wards", REASON, 30, max_minutes=480)
    assert grant.role == "reader" and grant.reason == REASON
    assert timedelta(minutes=29) < grant.expires_at - utcnow() <= timedelta(minutes=30)
    access = rbac.access_for_user(engine, "root")
    assert access.can_read("wards", ["collection:wards"]) and access.may("read", "wards")
    assert [name for name, _ in access.break_glass] == ["wards"]
    assert not access.may("edit", "wards")  # a reader grant, whatever the admin role allows
    [listed] = rbac.list_grants(engine, "wards")
    assert listed["expired"] is False and listed["reason"] == REASON and listed["role"] == "reader"

    _expire(engine, "root")
    access = rbac.access_for_user(engine, "root")
    assert not access.can_read("wards", ["collection:wards"]) and access.break_glass == ()
    assert access.collections == frozenset() and "collection:wards" not in access.principals
    assert rbac.list_grants(engine, "wards")[0]["expired"] is True  # kept as history, counts for nothing

    again = rbac.break_glass(engine, "root", "wards", "Second look at the same ward notes", max_minutes=480)
    assert timedelta(minutes=59) < again.expires_at - utcnow() <= timedelta(minutes=60)  # 60 by default
    assert rbac.access_for_user(engine, "root").can_read_collection("wards")


def test_a_wall_beats_break_glass(engine):
    with pytest.raises(Forbidden, match="wall"):
        rbac.break_glass(engine, "walled-root", "wards", REASON, max_minutes=480)
    # Walled after taking it: the grant stays but gives nothing.
    rbac.break_glass(engine, "root", "wards", REASON, max_minutes=480)
    rbac.add_wall(engine, "wards", user="root")
    access = rbac.access_for_user(engine, "root")
    assert not access.can_read("wards", ["collection:wards"]) and access.break_glass == ()


@pytest.mark.parametrize("user", ["ed", "rita"])
def test_only_an_admin_may_take_one(engine, user):
    with pytest.raises(Forbidden, match="administrator"):
        rbac.break_glass(engine, user, "wards", REASON, max_minutes=480)
    assert rbac.list_grants(engine, "wards") == []


def test_a_disabled_admin_may_not(engine):
    disable_user(engine, "root")
    with pytest.raises(Forbidden):
        rbac.break_glass(engine, "root", "wards", REASON, max_minutes=480)


@pytest.mark.parametrize(
    "reason, minutes, message",
    [
        ("because", 60, "at least 10 characters"),
        ("          x         ", 60, "at least 10 characters"),
        (REASON, 0, "1 to 480 minutes"),
        (REASON, 481, "1 to 480 minutes"),
        ("x" * 501, 60, "at most 500"),
    ],
)
def test_a_reason_and_a_bounded_time_are_required(engine, reason, minutes, message):
    with pytest.raises(BadRequest, match=message):
        rbac.break_glass(engine, "root", "wards", reason, minutes, max_minutes=480)
    assert rbac.list_grants(engine) == []


def test_a_permanent_grant_is_left_alone_and_a_grant_made_later_is_permanent(engine):
    rbac.add_grant(engine, "legal", user="root")
    with pytest.raises(Conflict):
        rbac.break_glass(engine, "root", "legal", REASON, max_minutes=480)
    rbac.break_glass(engine, "root", "wards", REASON, max_minutes=480)
    rbac.add_grant(engine, "wards", user="root")  # an ordinary grant replaces the break-glass one
    [listed] = rbac.list_grants(engine, "wards")
    assert "expires_at" not in listed
    _expire(engine, "root")  # nothing to expire any more: the grant is permanent
    assert rbac.access_for_user(engine, "root").can_read_collection("wards")
    rbac.remove_grant(engine, "wards", user="root")
    assert not rbac.access_for_user(engine, "root").can_read_collection("wards")


def test_the_cli_takes_one_lists_it_and_audits_it(fresh_home):
    run_cli(fresh_home, "users", "add", "root", "--role", "admin")
    run_cli(fresh_home, "users", "add", "rita", "--role", "reader")
    run_cli(fresh_home, "collections", "add", "wards")
    done = run_cli(
        fresh_home, "break-glass", "--user", "root", "--collection", "wards", "--reason", REASON, "--minutes", "15"
    )
    assert "until" in done.stdout
    assert "break-glass until" in run_cli(fresh_home, "grants", "list").stdout
    [listed] = json.loads(run_cli(fresh_home, "grants", "list", "--json").stdout)
    assert listed["subject"] == "root" and listed["reason"] == REASON and listed["expired"] is False

    refused = run_cli(
        fresh_home, "break-glass", "--user", "rita", "--collection", "wards", "--reason", REASON, check=False
    )
    assert refused.returncode == 1 and "administrator" in refused.stderr
    short = run_cli(
        fresh_home, "break-glass", "--user", "root", "--collection", "wards", "--reason", "urgent", check=False
    )
    assert short.returncode == 1 and "10 characters" in short.stderr
    too_long = run_cli(
        fresh_home, "break-glass", "--user", "root", "--collection", "wards", "--reason", REASON, "--minutes", "30",
        check=False, APPLIANCE_BREAK_GLASS_MAX_MINUTES="20",
    )  # fmt: skip
    assert too_long.returncode == 1 and "1 to 20 minutes" in too_long.stderr

    engine = create_db_engine(f"sqlite:///{fresh_home / 'appliance.db'}")
    records = list(audit.export(engine, action="break_glass"))
    assert [(r["outcome"], r["details"]["user"]) for r in records] == [
        ("ok", "root"),
        ("denied", "rita"),
        ("failed", "root"),
        ("failed", "root"),
    ]
    ok = records[0]
    assert ok["target"] == "wards" and ok["details"]["reason"] == REASON and ok["details"]["minutes"] == 15
    assert ok["details"]["expires_at"] == listed["expires_at"]
    assert audit.verify(engine)[0]
