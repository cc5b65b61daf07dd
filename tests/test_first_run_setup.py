"""First-run setup (`appliance.access.signin.first_admin`): it creates the administrator of a new install only.
Accounts the operator made with the CLI close it, so nobody who reaches the page can claim an install in use;
every refusal is audited once."""

from __future__ import annotations

import threading

import pytest

from appliance.access import audit, signin, users
from appliance.db import create_db_engine, serialized
from appliance.errors import Forbidden

PASSWORD = "correct horse battery staple 7"


@pytest.fixture
def engine(tmp_path):
    return create_db_engine(f"sqlite:///{tmp_path / 'appliance.db'}")


def test_a_new_install_gets_its_administrator_once(engine):
    assert signin.setup_open(engine)
    done = signin.first_admin(engine, "10.0.0.5", "boss", PASSWORD, PASSWORD)
    assert (done.user.role, done.stage) == ("admin", "enrol") and not signin.setup_open(engine)
    with pytest.raises(Forbidden, match="already exists") as refused:
        signin.first_admin(engine, "10.0.0.6", "intruder", PASSWORD, PASSWORD)
    assert refused.value.audited
    records, _ = audit.search(engine, action="setup")
    assert [(r["actor"], r["outcome"]) for r in reversed(records)] == [("boss", "ok"), ("-", "denied")]


def test_accounts_made_with_the_cli_close_setup_even_without_an_administrator(engine):
    users.add_user(engine, "rita", "reader")
    assert not signin.setup_open(engine)
    assert "appliance users add" in signin.closed_setup_message(engine)
    with pytest.raises(Forbidden, match="appliance users add"):
        signin.first_admin(engine, "10.0.0.6", "intruder", PASSWORD, PASSWORD)
    assert users.count_admins(engine) == 0
    [record], _ = audit.search(engine, action="setup")
    assert (record["outcome"], record["details"]["reason"], record["details"]["address"]) == (
        "denied",
        "accounts exist",
        "10.0.0.6",
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_engine(request, tmp_path):
    """A database as two server processes share it: a SQLite file, or PostgreSQL (the scale-out store)."""
    if request.param == "sqlite":
        return create_db_engine(f"sqlite:///{tmp_path / 'appliance.db'}")
    return create_db_engine(request.getfixturevalue("postgres_server").new_database())


def test_setup_waits_for_another_server_process_midway_through_its_own_and_is_refused(shared_engine):
    """Two server processes sharing one database each see "no account yet"; a thread lock orders only one
    process's requests, so the check and the write are made under a lock in the database itself. Here another
    process's setup holds it, its administrator written but not yet committed: this one waits, then is refused."""
    engine = shared_engine
    outcome: dict[str, object] = {}

    def second_setup() -> None:
        try:
            outcome["done"] = signin.first_admin(engine, "10.0.0.7", "second", PASSWORD, PASSWORD)
        except Forbidden as exc:
            outcome["refused"] = exc

    with serialized(engine, signin.SETUP_LOCK) as db:  # the other process, midway
        db.add(users.new_user("first", "admin", PASSWORD))
        db.flush()
        thread = threading.Thread(target=second_setup)
        thread.start()
        thread.join(1.0)
        assert thread.is_alive(), "setup went on while another process held the setup lock"
    thread.join(30)
    assert "done" not in outcome and outcome["refused"].audited
    assert [(u.name, u.role) for u in users.list_users(engine)] == [("first", "admin")]
    [record], _ = audit.search(engine, action="setup")
    assert (record["outcome"], record["details"]["address"]) == ("denied", "10.0.0.7")
