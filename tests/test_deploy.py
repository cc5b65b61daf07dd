"""The deployment files say what the operations guide promises: hardening, streaming, the data path."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def _directives(unit: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_server_unit_is_hardened_and_may_write_only_its_home():
    unit = _directives(DEPLOY / "systemd" / "appliance.service")
    home = next(v.split("=", 1)[1] for v in unit["Environment"] if v.startswith("APPLIANCE_HOME="))
    assert unit["User"] == ["appliance"] and unit["NoNewPrivileges"] == ["yes"]
    assert unit["ProtectSystem"] == ["strict"] and unit["ReadWritePaths"] == [home]
    assert unit["MemoryMax"] and unit["MemoryHigh"] and unit["KillMode"] == ["control-group"]
    assert unit["CapabilityBoundingSet"] == [""]
    assert any(v == "APPLIANCE_HOST=127.0.0.1" for v in unit["Environment"])  # TLS ends at nginx in front


def test_worker_unit_is_hardened_and_lends_only_its_tls_port():
    unit = _directives(DEPLOY / "systemd" / "appliance-worker.service")
    home = next(v.split("=", 1)[1] for v in unit["Environment"] if v.startswith("APPLIANCE_HOME="))
    assert unit["NoNewPrivileges"] == ["yes"] and unit["ProtectSystem"] == ["strict"]
    assert unit["ReadWritePaths"] == [home] and unit["User"] == ["appliance"] and unit["MemoryMax"]
    assert unit["ExecStart"][0].endswith("appliance worker --listen ${WORKER_LISTEN} --max-memory ${WORKER_MAX_MEMORY}")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", ["appliance.service", "appliance-worker.service"])
def test_units_parse(unit):
    result = subprocess.run(
        ["systemd-analyze", "verify", str(DEPLOY / "systemd" / unit)], capture_output=True, text=True
    )
    problems = [
        line for line in result.stderr.splitlines() if line.strip() and "/opt/appliance/.venv/bin/appliance" not in line
    ]
    assert problems == []


def test_nginx_streams_every_streaming_route_unbuffered():
    config = (DEPLOY / "nginx" / "appliance.conf").read_text()
    streaming = re.search(r"location ~ (\S+) \{([^}]*)\}", config)
    assert streaming and "proxy_buffering off;" in streaming.group(2)
    pattern = re.compile(streaming.group(1))
    for path in ("/api/chat", "/api/generate", "/api/rag/ask", "/v1/chat/completions", "/v1/completions"):
        assert pattern.match(path), path
    for path in ("/api/tags", "/api/documents", "/"):
        assert not pattern.match(path), path
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in config and "X-Forwarded-Proto" in config


def test_containers_run_unprivileged_and_offline():
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (DEPLOY / "docker" / name).read_text()
        assert "USER appliance" in text and "HF_HUB_OFFLINE=1" in text
        assert "VOLUME /var/lib/appliance" in text and "APPLIANCE_HOME=/var/lib/appliance" in text


def test_compose_names_the_shared_stores_and_keeps_them_off_the_network():
    """Every appliance server gets the PostgreSQL and Chroma URLs of the compose file's own services, with the
    password from .env; the stores are published nowhere and sit on an internal network."""
    import yaml

    compose = yaml.safe_load((DEPLOY / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    servers = {name: s for name, s in services.items() if name.startswith("appliance")}
    assert len(servers) >= 2
    for service in servers.values():
        env = service["environment"]
        url = env["APPLIANCE_DATABASE_URL"]
        assert url.startswith("postgresql://appliance:${APPLIANCE_DB_PASSWORD") and url.endswith(
            "@postgres:5432/appliance"
        )
        assert env["APPLIANCE_CHROMA_URL"] == "http://chroma:8000"
        assert all(port.startswith("127.0.0.1:") for port in service["ports"])
        assert "backend" in service["networks"]
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert len({s["volumes"][0] for s in servers.values()}) == len(servers)  # a home of its own each
    for store in ("postgres", "chroma"):
        assert "ports" not in services[store] and services[store]["networks"] == ["backend"]
    assert compose["networks"]["backend"]["internal"] is True
    assert services["chroma"]["environment"]["ANONYMIZED_TELEMETRY"] == "False"
