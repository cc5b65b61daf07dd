"""The `appliance` command as a user runs it: create from a Modelfile, list, show, cp, rm, run, ps."""

import json
import sqlite3

import pytest

from tests.conftest import run_cli, start_server, stop_server


def test_create_from_modelfile_then_list_show_cp_rm(fresh_home, tiny_gguf, tmp_path):
    usb = tmp_path / "usb"
    usb.mkdir()
    (usb / "model.gguf").write_bytes(tiny_gguf.read_bytes())
    (usb / "Modelfile").write_text(
        'FROM ./model.gguf\nPARAMETER temperature 0.3\nPARAMETER stop "###"\nSYSTEM """You are the records clerk."""\n'
    )
    created = run_cli(fresh_home, "create", "clerk", "-f", str(usb / "Modelfile"))
    assert "created clerk:latest" in created.stdout
    listed = json.loads(run_cli(fresh_home, "list", "--json").stdout)
    assert [m["name"] for m in listed] == ["clerk:latest"]
    shown = json.loads(run_cli(fresh_home, "show", "clerk", "--json").stdout)
    assert shown["architecture"] == "llama" and shown["context_length"] == 512
    assert shown["quantization"] == "F32" and shown["parameters_set"] == {"temperature": 0.3, "stop": ["###"]}
    assert "<|im_start|>" in shown["chat_template"] and shown["system"] == "You are the records clerk."
    assert "PARAMETER temperature 0.3" in run_cli(fresh_home, "show", "clerk", "--modelfile").stdout
    run_cli(fresh_home, "cp", "clerk", "clerk-backup")
    run_cli(fresh_home, "rm", "clerk")
    assert [m["name"] for m in json.loads(run_cli(fresh_home, "list", "--json").stdout)] == ["clerk-backup:latest"]
    assert (fresh_home / "models" / "blobs").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["create", "x", "--from", "/nonexistent/model.gguf"], "not found"),
        (["create", "../x", "--from", "/etc/hostname"], "invalid model name"),
        (["show", "missing"], "not found"),
        (["rm", "missing"], "not found"),
        (["users", "add", "bad name!", "--role", "reader"], "user name"),
        (["keys", "create", "--user", "nobody"], "not found"),
    ],
)
def test_cli_errors_are_clear(fresh_home, args, message):
    result = run_cli(fresh_home, *args, check=False)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_create_refuses_a_corrupt_file(fresh_home, tiny_gguf, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(tiny_gguf.read_bytes()[:5000])
    result = run_cli(fresh_home, "create", "broken", "--from", str(broken), check=False)
    assert result.returncode == 1 and "truncated" in result.stderr
    assert json.loads(run_cli(fresh_home, "list", "--json").stdout) == []


def test_password_from_stdin_and_duplicate_user(fresh_home):
    run_cli(fresh_home, "users", "add", "alice", "--role", "editor", "--password-stdin", input="correct horse\n")
    duplicate = run_cli(fresh_home, "users", "add", "alice", "--role", "reader", check=False)
    assert duplicate.returncode == 1 and "already exists" in duplicate.stderr
    short = run_cli(
        fresh_home, "users", "add", "bob", "--role", "reader", "--password-stdin", input="short\n", check=False
    )
    assert short.returncode == 1 and "at least 8" in short.stderr
    users = json.loads(run_cli(fresh_home, "users", "list", "--json").stdout)
    assert [(u["name"], u["role"]) for u in users] == [("alice", "editor")]
    with sqlite3.connect(fresh_home / "appliance.db") as db:
        (stored,) = db.execute("select password_hash from user where name = 'alice'").fetchone()
    assert stored.startswith("$argon2id$") and "correct horse" not in stored


@pytest.fixture(scope="module")
def cli_server(tmp_path_factory, tiny_gguf):
    srv = start_server(tmp_path_factory.mktemp("cli"), {"tiny": tiny_gguf})
    yield srv
    stop_server(srv)


def test_run_chats_with_commands(cli_server):
    session = (
        "\n".join(
            [
                "/set parameter num_predict 3",
                "/set parameter seed 1",
                "/set system You are brief.",
                "/show parameters",
                "Hello there",
                "/save tiny-brief",
                "/nonsense",
                "/bye",
                "this line is never read",
            ]
        )
        + "\n"
    )
    result = run_cli(cli_server.home, "run", "tiny", input=session, APPLIANCE_PORT=str(cli_server.port))
    assert "Set parameter 'num_predict' to '3'" in result.stdout
    assert '"seed": 1' in result.stdout
    assert "Created new model 'tiny-brief'" in result.stdout
    assert "Unknown command '/nonsense'" in result.stdout
    shown = json.loads(run_cli(cli_server.home, "show", "tiny-brief", "--json").stdout)
    assert shown["parameters_set"] == {"num_predict": 3, "seed": 1} and shown["system"] == "You are brief."


def test_run_one_shot_prompt_and_ps(cli_server):
    run_cli(cli_server.home, "run", "tiny", "Say", "hi", APPLIANCE_PORT=str(cli_server.port))
    ps = json.loads(run_cli(cli_server.home, "ps", "--json", APPLIANCE_PORT=str(cli_server.port)).stdout)
    assert "tiny:latest" in [m["name"] for m in ps]
    run_cli(cli_server.home, "stop", "tiny", APPLIANCE_PORT=str(cli_server.port))
    ps = json.loads(run_cli(cli_server.home, "ps", "--json", APPLIANCE_PORT=str(cli_server.port)).stdout)
    assert ps == []


def test_run_reports_unknown_model_and_missing_server(cli_server, fresh_home):
    missing = run_cli(cli_server.home, "run", "ghost", input="/bye\n", APPLIANCE_PORT=str(cli_server.port), check=False)
    assert missing.returncode == 1 and "not found" in missing.stderr
    no_server = run_cli(fresh_home, "ps", APPLIANCE_PORT="9", check=False)
    assert no_server.returncode == 1 and "appliance serve" in no_server.stderr


def test_config_show_lists_every_setting_with_secrets_masked(fresh_home):
    from appliance.config import settings_reference

    env = {
        "APPLIANCE_RRF_K": "33",
        "APPLIANCE_OIDC_CLIENT_SECRET": "very-secret-value",
        "APPLIANCE_DATABASE_URL": "postgresql://app:db-password-1@db.internal/appliance",
    }
    result = run_cli(fresh_home, "config", "show", "--json", **env)
    rows = {row["env"]: row for row in json.loads(result.stdout)}
    assert set(rows) == {env_name for env_name, _default, _description in settings_reference()}
    assert rows["APPLIANCE_RRF_K"]["value"] == 33 and rows["APPLIANCE_RRF_K"]["default"] == 20
    assert rows["APPLIANCE_OIDC_CLIENT_SECRET"]["value"] == "********"
    assert rows["APPLIANCE_DATABASE_URL"]["value"] == "postgresql://app:***@db.internal/appliance"
    assert rows["APPLIANCE_HOME"]["value"] == str(fresh_home.resolve())
    assert all(row["description"] for row in rows.values())
    text = run_cli(fresh_home, "config", "show", **env).stdout
    for output in (result.stdout, text):
        assert "very-secret-value" not in output and "db-password-1" not in output
    assert "APPLIANCE_RRF_K=33   (default: 20)" in text
