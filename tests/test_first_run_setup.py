"""First-run setup (`appliance.access.signin.first_admin`): it creates the administrator of a new install only.
Accounts the operator made with the CLI close it, so nobody who reaches the page can claim an install in use;
every refusal is audited once."""

from __future__ import annotations

import pytest

from appliance.access import audit, signin, users
from appliance.db import create_db_engine
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
