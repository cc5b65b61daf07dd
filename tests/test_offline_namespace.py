"""Egress: ingestion, a grounded answer and the server all work in a network namespace that has no network.

A new network namespace holds only a loopback interface (brought up here) and no route anywhere, so any
reach for the internet (a model hub, telemetry, a DNS lookup) fails there instead of succeeding quietly.
The network guard (tests/netguard) runs in every process too, so an attempt is recorded even where its
failure is tolerated. Skipped where the machine does not permit network namespaces.

Run as `python -m tests.test_offline_namespace HOME MODEL.gguf` inside the namespace, this module is the
driver: it prints one JSON object with what each step returned.
"""

from __future__ import annotations

import fcntl
import json
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import APPLIANCE, HERE, cli_env, free_port, network_namespace_command, run_cli

CORPUS = HERE.parent / "sample_corpus" / "hospital"
DOCUMENTS = ("records-retention-policy.md", "infection-control-manual.pdf")
QUESTION = "What bleep reaches the infection prevention and control nurse on call during the day?"  # in the PDF
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


NAMESPACE = network_namespace_command()


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(NAMESPACE is None, reason="network namespaces are not permitted here (`unshare -n` failed)")
def test_ingest_ask_and_serve_with_no_network(tmp_path, tiny_gguf):
    home = tmp_path / "home"
    guard_log = tmp_path / "netguard.log"
    guard_log.touch()
    result = subprocess.run(
        [*NAMESPACE, sys.executable, "-m", "tests.test_offline_namespace", str(home), str(tiny_gguf), str(guard_log)],
        cwd=HERE.parent,
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert result.returncode == 0, f"driver failed:\n{result.stdout}\n{result.stderr}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["interfaces"] == ["lo"]  # really a namespace with nothing but loopback
    assert report["outside"] == "unreachable"
    assert sorted(report["ingested"]) == sorted(DOCUMENTS)
    assert report["answer"]["mode"] == "extractive" and report["answer"]["citations"]
    assert report["answer"]["citations"][0]["title"] == "infection-control-manual.pdf"  # the PDF was read offline
    assert report["version"] == 200 and report["generated_tokens"] > 0
    assert guard_log.read_text() == "", f"something tried to reach the network:\n{guard_log.read_text()}"


# --- the driver, run inside the namespace ---------------------------------------------------------------
def _loopback_up() -> None:
    """`ip link set lo up`, without needing iproute2."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14s", b"lo", flags | IFF_UP, b""))


def _outside() -> str:
    try:
        socket.create_connection(("192.0.2.1", 80), timeout=3).close()  # TEST-NET-1: no route to it in here
    except OSError:
        return "unreachable"
    return "reachable"


def drive(home: Path, model: Path, guard_log: Path) -> dict:
    _loopback_up()
    report: dict = {"interfaces": sorted(name for _index, name in socket.if_nameindex()), "outside": _outside()}
    guard = {"PYTHONPATH": str(HERE / "netguard"), "APPLIANCE_NETGUARD_LOG": str(guard_log)}
    home.mkdir(parents=True)
    run_cli(home, "ingest", *(str(CORPUS / name) for name in DOCUMENTS), "--collection", "ns", **guard)
    listing = json.loads(run_cli(home, "documents", "list", "--json", **guard).stdout)
    report["ingested"] = sorted(document["filename"] for document in listing)
    # Asked before any generation model is installed: the extractive answer, cited.
    report["answer"] = json.loads(run_cli(home, "ask", QUESTION, "--json", **guard).stdout)
    run_cli(home, "create", "tiny", "--from", str(model), **guard)
    run_cli(home, "users", "add", "admin", "--role", "admin", **guard)
    key = run_cli(home, "keys", "create", "--user", "admin", **guard).stdout.strip()
    port = free_port()
    with (home / "server.log").open("ab") as log:
        server = subprocess.Popen(
            [APPLIANCE, "serve"], env=cli_env(home, APPLIANCE_PORT=str(port), **guard), stdout=log, stderr=log
        )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            if server.poll() is not None:
                raise RuntimeError(f"server exited: {(home / 'server.log').read_text()}")
            try:
                report["version"] = httpx.get(f"{url}/api/version", timeout=2).status_code
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        body = {"model": "tiny", "prompt": "Hello", "stream": False, "options": {"num_predict": 4}}
        generated = httpx.post(
            f"{url}/api/generate", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120
        )
        report["generated_tokens"] = generated.json()["eval_count"]
    finally:
        server.terminate()
        server.wait(60)
    return report


if __name__ == "__main__":
    print(json.dumps(drive(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))))
