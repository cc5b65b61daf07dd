"""`appliance doctor` on real homes: what it finds wrong, that it says so in its exit status, and that it changes
nothing (the schema it reports on is left as it was)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pyotp

from appliance.access import users
from appliance.db import FTS_TABLE, alembic_config, create_db_engine
from tests.conftest import run_cli

CORPUS = Path(__file__).parent.parent / "sample_corpus"
STRONG_SECRET = "Zq8-vN3rT6yWp1Lm4Xc7Bd0Hf2"


def doctor(home: Path, **env: str) -> tuple[int, dict[str, dict]]:
    result = run_cli(home, "doctor", "--json", check=False, **env)
    assert result.returncode in (0, 1), result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] == (result.returncode == 0)
    return result.returncode, {check["name"]: check for check in report["checks"]}


def enrol_totp(home: Path, name: str) -> None:
    """What the web enrolment stores once the user's first code is right (web.signin.enrol)."""
    engine = create_db_engine(f"sqlite:///{home / 'appliance.db'}")
    users.set_totp(engine, users.get_user(engine, name).id, pyotp.random_base32())


def test_a_fresh_home_fails_for_want_of_an_administrator_and_creates_nothing(tmp_path):
    home = tmp_path / "never-used"
    code, checks = doctor(home)
    assert code == 1
    assert checks["admins"]["status"] == "fail" and "no database" in checks["admins"]["message"]
    assert checks["admins"]["advice"]
    assert checks["migrations"]["status"] == "warn" and checks["permissions"]["status"] == "warn"
    assert not home.exists()


def test_an_administrator_needs_totp_and_the_home_must_be_private(fresh_home):
    run_cli(fresh_home, "users", "add", "root-admin", "--role", "admin")
    fresh_home.chmod(0o755)
    code, checks = doctor(fresh_home)
    assert code == 1
    assert checks["admins"]["status"] == "fail" and "TOTP" in checks["admins"]["message"]
    assert checks["permissions"]["status"] == "fail" and "0755" in checks["permissions"]["message"]

    enrol_totp(fresh_home, "root-admin")
    run_cli(fresh_home, "users", "add", "second-admin", "--role", "admin")
    fresh_home.chmod(0o700)
    code, checks = doctor(fresh_home)
    assert checks["admins"]["status"] == "warn" and "second-admin" in checks["admins"]["message"]
    assert checks["permissions"]["status"] == "ok"
    assert checks["migrations"]["status"] == "ok" and checks["index"]["status"] == "ok"
    assert checks["tls"]["status"] == "ok" and checks["secrets"]["status"] == "ok"
    assert [name for name, check in checks.items() if check["status"] == "fail"] == []
    assert code == 0

    run_cli(fresh_home, "users", "disable", "second-admin")
    assert doctor(fresh_home)[1]["admins"]["status"] == "ok"


def test_a_lan_bind_without_tls_warns_and_a_weak_secret_fails(fresh_home):
    _, checks = doctor(fresh_home, APPLIANCE_HOST="0.0.0.0")
    assert checks["tls"]["status"] == "warn" and "nginx" in checks["tls"]["advice"]
    _, checks = doctor(fresh_home, APPLIANCE_HOST="10.0.0.8", APPLIANCE_COOKIE_SECURE="true")
    assert checks["tls"]["status"] == "ok"

    oidc = {"APPLIANCE_OIDC_ISSUER": "https://idp.hospital.lan", "APPLIANCE_OIDC_CLIENT_ID": "appliance"}
    code, checks = doctor(fresh_home, APPLIANCE_OIDC_CLIENT_SECRET="hunter2", **oidc)
    assert code == 1 and checks["secrets"]["status"] == "fail"
    assert "APPLIANCE_OIDC_CLIENT_SECRET" in checks["secrets"]["message"] and "hunter2" not in json.dumps(checks)
    _, checks = doctor(fresh_home, APPLIANCE_OIDC_CLIENT_SECRET=STRONG_SECRET, **oidc)
    assert checks["secrets"]["status"] == "ok"
    assert checks["peers"]["status"] == "ok" and "idp.hospital.lan" in checks["peers"]["message"]
    _, checks = doctor(fresh_home, APPLIANCE_OIDC_ISSUER="https://8.8.8.8", APPLIANCE_OIDC_CLIENT_ID="appliance")
    assert checks["peers"]["status"] == "warn" and "8.8.8.8 is a public address" in checks["peers"]["message"]
    weak_database = "postgresql://app:password@127.0.0.1:1/appliance"  # nothing listens there: refused at once
    _, checks = doctor(fresh_home, APPLIANCE_DATABASE_URL=weak_database)
    assert (
        checks["secrets"]["status"] == "fail"
        and "DATABASE_URL (password) is a common word" in checks["secrets"]["message"]
    )
    assert "database at 127.0.0.1:1" in checks["peers"]["message"]


def test_egress_switches_are_reported_as_found(fresh_home):
    _, checks = doctor(fresh_home)
    assert checks["offline"]["status"] == "ok" and "telemetry off" in checks["offline"]["message"]
    assert checks["peers"]["status"] == "ok" and "no outbound connection" in checks["peers"]["message"]
    _, checks = doctor(fresh_home, TRANSFORMERS_OFFLINE="0")
    assert checks["offline"]["status"] == "warn" and "TRANSFORMERS_OFFLINE='0'" in checks["offline"]["message"]


def test_an_index_out_of_step_and_the_schema_revision_are_found_and_left_alone(fresh_home):
    run_cli(fresh_home, "ingest", str(CORPUS / "hospital/records-retention-policy.md"), "--collection", "alpha")
    _, checks = doctor(fresh_home)
    assert checks["index"]["status"] == "ok" and checks["index"]["message"].startswith("1 documents")
    database = fresh_home / "appliance.db"
    with sqlite3.connect(database) as db:
        db.execute(f"DELETE FROM {FTS_TABLE} WHERE rowid = (SELECT min(rowid) FROM {FTS_TABLE})")  # noqa: S608
    code, checks = doctor(fresh_home)
    assert code == 1 and checks["index"]["status"] == "fail" and "missing in fts: 1" in checks["index"]["message"]

    from alembic import command

    url = f"sqlite:///{database}"
    command.downgrade(alembic_config(url), "-1")
    with sqlite3.connect(database) as db:
        behind = db.execute("SELECT version_num FROM alembic_version").fetchone()[0]
    _, checks = doctor(fresh_home)
    assert checks["migrations"]["status"] == "warn" and behind in checks["migrations"]["message"]
    assert checks["index"]["status"] == "warn"
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchone()[0] == behind  # not upgraded
        db.execute("UPDATE alembic_version SET version_num = '9999'")
    code, checks = doctor(fresh_home)
    assert code == 1 and checks["migrations"]["status"] == "fail" and "9999" in checks["migrations"]["message"]


def test_text_output_names_each_check_and_its_advice(fresh_home):
    result = run_cli(fresh_home, "doctor", check=False)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert any(line.startswith("FAIL  admins") for line in lines)
    assert any(line.strip().startswith("-> create one with `appliance users add") for line in lines)
