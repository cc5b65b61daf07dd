"""Works with the clients people already use (issue 21, points 5 and 6): HEAD where Ollama answers it,
the Host names Ollama accepts on loopback, and APPLIANCE_HOST written the way OLLAMA_HOST is (`host:port`,
`http://host:port`, `[::1]:port`), with the local CLI finding the running server through its run directory.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import APPLIANCE, HERE, cli_env, end_process, free_port, run_cli, wait_until_serving

# --- HEAD ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/api/version"])
def test_head_is_answered_like_get_without_a_body(server, path):
    get = httpx.get(server.url + path, timeout=30)
    head = httpx.head(server.url + path, timeout=30)
    assert head.status_code == get.status_code == 200
    assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
    assert head.headers["content-length"] == get.headers["content-length"]


def test_head_on_a_keyed_route_needs_the_key_like_get(server):
    assert httpx.head(server.url + "/api/tags", timeout=30).status_code == 401
    assert (
        httpx.head(server.url + "/api/tags", headers=server.auth("apk_not-a-real-key"), timeout=30).status_code == 401
    )
    head = httpx.head(server.url + "/api/tags", headers=server.auth(server.reader_key), timeout=30)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == "application/json"
    models = httpx.head(server.url + "/v1/models", headers=server.auth(server.reader_key), timeout=30)
    assert models.status_code == 200 and models.content == b""


def test_head_keeps_its_own_routes_and_refusals(server):
    digest = "sha256:" + "0" * 64
    assert httpx.head(f"{server.url}/api/blobs/{digest}", headers=server.auth(), timeout=30).status_code == 404
    assert httpx.head(f"{server.url}/api/chat", headers=server.auth(), timeout=30).status_code == 405  # POST only
    foreign = httpx.head(server.url + "/api/version", headers={"Host": "evil.example.com"}, timeout=30)
    assert foreign.status_code == 403 and foreign.content == b""


# --- Host names on loopback ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        socket.gethostname(),
        socket.gethostname().upper() + ":11434",
        "appliance.hospital.local",
        "appliance.hospital.local:443",
        "box.internal",
        "192.168.1.5",
        "10.0.0.7:11434",
        "[fd00::7]:8080",
    ],
)
def test_names_ollama_accepts_on_loopback_are_accepted(server, host):
    response = httpx.get(server.url + "/api/tags", headers={**server.auth(), "Host": host}, timeout=30)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("host", ["evil.example.com", "local.evil.example.com", "93.184.216.34", "appliance.lan"])
def test_a_refused_name_says_how_to_allow_it(server, host):
    response = httpx.get(server.url + "/api/tags", headers={**server.auth(), "Host": host}, timeout=30)
    assert response.status_code == 403
    error = response.json()["error"]
    assert f"APPLIANCE_ALLOWED_HOSTS='[\"{host}\"]'" in error
    page = httpx.get(server.url + "/documents", headers={"Host": host, "Accept": "text/html"}, timeout=30)
    assert page.status_code == 403 and "APPLIANCE_ALLOWED_HOSTS" in page.text


def test_allowed_hosts_admits_a_name(tmp_path, tiny_gguf):
    server = _Serve(tmp_path / "home", tiny_gguf, APPLIANCE_ALLOWED_HOSTS='["appliance.lan"]')
    try:
        key = run_cli(server.home, "keys", "create", "--user", "admin").stdout.strip()
        headers = {"Authorization": f"Bearer {key}", "Host": "appliance.lan"}
        assert httpx.get(server.url + "/api/tags", headers=headers, timeout=30).status_code == 200
        headers["Host"] = "other.lan"
        assert httpx.get(server.url + "/api/tags", headers=headers, timeout=30).status_code == 403
    finally:
        server.stop()


# --- APPLIANCE_HOST as OLLAMA_HOST is written; the CLI finds the server ------------------------------


class _Serve:
    """`appliance serve` on a new home with the tiny model, configured only by the given environment (no
    APPLIANCE_PORT unless given), reached at `url`."""

    def __init__(self, home: Path, tiny_gguf: Path, url: str | None = None, **env: str):
        self.home = home
        home.mkdir(parents=True)
        run_cli(home, "users", "add", "admin", "--role", "admin")
        run_cli(home, "create", "tiny", "--from", str(tiny_gguf))
        if url is None:
            port = free_port()
            env.setdefault("APPLIANCE_PORT", str(port))
            url = f"http://127.0.0.1:{port}"
        self.url = url
        self.netguard_log = home / "netguard.log"
        self.netguard_log.touch()
        server_env = cli_env(
            home, APPLIANCE_NETGUARD_LOG=str(self.netguard_log), PYTHONPATH=str(HERE / "netguard"), **env
        )
        log = home / "server.log"
        self.process = subprocess.Popen(
            [APPLIANCE, "serve"], env=server_env, stdout=log.open("ab"), stderr=subprocess.STDOUT
        )
        wait_until_serving(self.process, url, log)

    def stop(self) -> None:
        end_process(self.process)
        assert self.netguard_log.read_text() == ""


def _ps(home: Path, **env: str) -> list[str]:
    return [model["name"] for model in json.loads(run_cli(home, "ps", "--json", **env).stdout)]


def test_ollama_style_host_port_binds_and_the_cli_follows(tmp_path, tiny_gguf):
    port = free_port()
    server = _Serve(tmp_path / "home", tiny_gguf, f"http://127.0.0.1:{port}", APPLIANCE_HOST=f"127.0.0.1:{port}")
    try:
        run_cli(server.home, "run", "tiny", "Say", "hi", APPLIANCE_HOST=f"127.0.0.1:{port}")
        assert _ps(server.home, APPLIANCE_HOST=f"http://127.0.0.1:{port}") == ["tiny:latest"]
        # Nothing said where the server is: the run directory says it.
        assert (server.home / "run" / "server.url").read_text().strip() == f"http://127.0.0.1:{port}"
        assert _ps(server.home, APPLIANCE_PORT=str(free_port())) == ["tiny:latest"]
        # An explicit APPLIANCE_URL comes first, written with or without its scheme.
        assert _ps(server.home, APPLIANCE_URL=f"127.0.0.1:{port}") == ["tiny:latest"]
        dead = free_port()
        missed = run_cli(server.home, "ps", APPLIANCE_URL=f"http://127.0.0.1:{dead}", check=False)
        assert missed.returncode == 1 and f"http://127.0.0.1:{dead}" in missed.stderr
        assert "Traceback" not in missed.stderr
    finally:
        server.stop()
    assert not (server.home / "run" / "server.url").exists()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_bracketed_ipv6_host_port(tmp_path, tiny_gguf):
    port = free_port()
    server = _Serve(tmp_path / "home", tiny_gguf, f"http://[::1]:{port}", APPLIANCE_HOST=f"[::1]:{port}")
    try:
        assert _ps(server.home, APPLIANCE_HOST=f"[::1]:{port}") == []
        assert (server.home / "run" / "server.url").read_text().strip() == f"http://[::1]:{port}"
    finally:
        server.stop()


@pytest.mark.parametrize(
    "env, message",
    [
        ({"APPLIANCE_HOST": "127.0.0.1:99999"}, "APPLIANCE_HOST"),
        ({"APPLIANCE_HOST": "ftp://127.0.0.1:11434"}, "APPLIANCE_HOST"),
        ({"APPLIANCE_HOST": "https://127.0.0.1:11434"}, "APPLIANCE_URL"),
        ({"APPLIANCE_URL": "http://[not-an-address"}, "APPLIANCE_URL"),
    ],
)
def test_a_bad_address_is_a_clear_error(fresh_home, env, message):
    result = run_cli(fresh_home, "ps", check=False, **env)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "value, host, port",
    [
        ("127.0.0.1:11500", "127.0.0.1", 11500),
        ("http://127.0.0.1:11500", "127.0.0.1", 11500),
        ("http://0.0.0.0:11500/", "0.0.0.0", 11500),
        ("[::1]:11500", "::1", 11500),
        ("::1", "::1", 11434),
        ("0.0.0.0", "0.0.0.0", 11434),
        ("appliance.hospital.local:8080", "appliance.hospital.local", 8080),
        ("", "127.0.0.1", 11434),
    ],
)
def test_host_setting_reads_ollama_host_forms(value, host, port):
    from appliance.config import ServerSettings

    settings = ServerSettings(host=value)
    assert (settings.host, settings.port) == (host, port)
