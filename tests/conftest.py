"""Fixtures: tiny GGUF models written on the spot, and a real `appliance serve` in a temp home.

The server runs as a subprocess from the real console script, with a network guard
(tests/netguard/sitecustomize.py) that blocks and records any non-loopback connection or DNS lookup
in the server and its runner processes; every server fixture asserts at teardown that none happened.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from appliance.models.synthetic_gguf import TINY, TINY_LONG, write_gguf

HERE = Path(__file__).parent
APPLIANCE = str(Path(sys.executable).with_name("appliance"))
# Tests work with tiny generated models; only tests/test_real_model.py installs the bundled SmolLM2.
os.environ["APPLIANCE_DEFAULT_MODEL"] = "0"
# Every test home shares one ONNX export of the embedding model (checked by its sha256 before each load), made by
# the first test that embeds, instead of one export per home.
EMBEDDING_EXPORTS = str(Path(tempfile.gettempdir()) / f"appliance-test-embeddings-{os.getuid()}")
os.environ["APPLIANCE_EMBEDDING_EXPORT_DIR"] = EMBEDDING_EXPORTS


def network_namespace_command() -> list[str] | None:
    """`unshare -n` (with a user namespace too when not root) if this machine permits it, else None."""
    import shutil

    if shutil.which("unshare") is None or not sys.platform.startswith("linux"):
        return None
    command = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]
    try:
        probe = subprocess.run([*command, "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return command if probe.returncode == 0 else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Set while a test runs against the server stores (the `stores` fixture): PostgreSQL and Chroma server URLs
# that every Settings() of the test reads from the environment and every CLI or server it starts gets too.
STORES_ENV: dict[str, str] = {}


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APPLIANCE_", "OLLAMA_"))}
    env.update(
        APPLIANCE_HOME=str(home),
        HF_HUB_OFFLINE="1",
        APPLIANCE_DEFAULT_MODEL="0",
        APPLIANCE_EMBEDDING_EXPORT_DIR=EMBEDDING_EXPORTS,
    )
    env.update(**STORES_ENV, **extra)
    return env


def run_cli(home: Path, *args: str, input: str | None = None, check: bool = True, **extra: str):
    result = subprocess.run(
        [APPLIANCE, *args], env=cli_env(home, **extra), input=input, capture_output=True, text=True, timeout=300
    )
    if check and result.returncode != 0:
        raise AssertionError(f"appliance {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


@pytest.fixture(scope="session")
def postgres_server():
    """A private PostgreSQL server for the session (Debian's `postgresql` package); skipped where it is not
    installed, except in CI (`CI` set), where its absence fails the run."""
    from tests.services import postgres_bin, start_postgres

    if postgres_bin() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed: .ci/run installs the Debian package 'postgresql'")
        pytest.skip("PostgreSQL is not installed (Debian package 'postgresql')")
    server = start_postgres()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def chroma_server(tmp_path_factory):
    """A `chroma run` server for the session."""
    from tests.services import start_chroma

    server = start_chroma(tmp_path_factory.mktemp("chroma-server"))
    yield server
    server.stop()


@pytest.fixture(scope="module", params=["embedded", "servers"])
def stores(request):
    """Runs a module's tests twice: on the embedded defaults (SQLite and Chroma in the home), and on a fresh
    PostgreSQL database and a fresh database of a Chroma server, through APPLIANCE_DATABASE_URL and
    APPLIANCE_CHROMA_URL, which Settings() and the CLIs and servers the tests start all read. Modules opt in
    with `pytestmark = pytest.mark.usefixtures("stores")`; module-scoped fixtures that build a home take
    `stores` as an argument so that they are built after it."""
    if request.param == "embedded":
        yield request.param
        return
    postgres = request.getfixturevalue("postgres_server")
    chroma = request.getfixturevalue("chroma_server")
    env = {
        "APPLIANCE_DATABASE_URL": postgres.new_database(),
        "APPLIANCE_CHROMA_URL": chroma.url,
        "APPLIANCE_CHROMA_DATABASE": chroma.new_database(),
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        STORES_ENV.update(env)
        try:
            yield request.param
        finally:
            STORES_ENV.clear()


@pytest.fixture
def fresh_stores(stores, request, monkeypatch):
    """Within a module run on the server stores, new empty databases for this one test (the embedded stores
    are new with every home anyway)."""
    if stores == "servers":
        saved = dict(STORES_ENV)
        env = {
            "APPLIANCE_DATABASE_URL": request.getfixturevalue("postgres_server").new_database(),
            "APPLIANCE_CHROMA_DATABASE": request.getfixturevalue("chroma_server").new_database(),
        }
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        STORES_ENV.update(env)
        yield stores
        STORES_ENV.update(saved)
    else:
        yield stores


def database_url(home: Path) -> str:
    """The database a test's home uses: the `stores` fixture's PostgreSQL database, or SQLite in the home."""
    return os.environ.get("APPLIANCE_DATABASE_URL") or f"sqlite:///{home / 'appliance.db'}"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf")


def local_ingestor(home: Path, embedder=None, **settings_fields):
    """An Ingestor on a fresh home of its own (SQLite, Chroma, originals), as `appliance ingest` builds it
    (`Services`); `embedder`: one already loaded, shared between tests. The caller closes the ingestor."""
    from appliance.config import Settings
    from appliance.services import Services

    settings = Settings(home=home, **settings_fields)
    given = {"embedder": embedder} if embedder is not None else {}
    return Services(settings, **given).ingestor


@pytest.fixture(scope="session")
def tiny_gguf(model_dir) -> Path:
    return write_gguf(model_dir / "tiny.gguf", TINY, seed=1)


@pytest.fixture(scope="session")
def tiny_long_gguf(model_dir) -> Path:
    return write_gguf(model_dir / "tiny-long.gguf", TINY_LONG, seed=2)


@dataclass
class Server:
    home: Path
    url: str
    port: int
    admin_key: str
    reader_key: str
    process: subprocess.Popen
    netguard_log: Path
    log_path: Path

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.admin_key}"}

    def http(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.auth(key), timeout=120)

    def assert_alive(self) -> None:
        assert self.process.poll() is None, "server process died"
        assert httpx.get(f"{self.url}/api/version", timeout=10).status_code == 200


def start_server(home: Path, models: dict[str, Path], **env: str) -> Server:
    """A new home with an admin and a reader (each with a key) and the given models, then the server."""
    home.mkdir(parents=True, exist_ok=True)
    run_cli(home, "users", "add", "admin", "--role", "admin")
    run_cli(home, "users", "add", "reader", "--role", "reader")
    admin_key = run_cli(home, "keys", "create", "--user", "admin").stdout.strip()
    reader_key = run_cli(home, "keys", "create", "--user", "reader").stdout.strip()
    for name, path in models.items():
        run_cli(home, "create", name, "--from", str(path))
    return launch_server(home, admin_key, reader_key, **env)


def launch_server(home: Path, admin_key: str, reader_key: str, **env: str) -> Server:
    """Start `appliance serve` on an existing home (also used to restart after a crash)."""
    port = free_port()
    netguard_log = home / "netguard.log"
    netguard_log.touch()
    log_path = home / "server.log"
    server_env = cli_env(
        home,
        APPLIANCE_PORT=str(port),
        APPLIANCE_NETGUARD_LOG=str(netguard_log),
        PYTHONPATH=str(HERE / "netguard"),
        **env,
    )
    process = subprocess.Popen(
        [APPLIANCE, "serve"], env=server_env, stdout=log_path.open("ab"), stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    wait_until_serving(process, url, log_path)
    return Server(home, url, port, admin_key, reader_key, process, netguard_log, log_path)


def wait_until_serving(process: subprocess.Popen, url: str, log_path: Path) -> None:
    """Return once the server at `url` answers /api/version; AssertionError with its log if it exits or not."""
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited: {log_path.read_text()}")
        try:
            if httpx.get(f"{url}/api/version", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    process.kill()
    raise AssertionError(f"server did not answer at {url} in time: {log_path.read_text()}")


def end_process(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 30 s."""
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


def stop_server(server: Server) -> None:
    end_process(server.process)
    attempts = server.netguard_log.read_text()
    assert attempts == "", f"the server tried to reach the network:\n{attempts}"


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_gguf, tiny_long_gguf):
    srv = start_server(tmp_path_factory.mktemp("home"), {"tiny": tiny_gguf, "tiny-long": tiny_long_gguf})
    yield srv
    stop_server(srv)


@pytest.fixture
def ollama_client(server):
    import ollama

    return ollama.Client(host=server.url, headers=server.auth())


@pytest.fixture
def openai_client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.admin_key, max_retries=0)


@pytest.fixture
def fresh_home(tmp_path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    return home
