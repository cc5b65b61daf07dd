"""Real PostgreSQL and Chroma servers for the tests that run against the scale-out stores.

Each is started privately in a temporary directory on a free loopback port: PostgreSQL from the Debian
package's binaries (`initdb` + `postgres`, as the `postgres` user when the tests run as root, since
PostgreSQL refuses to run as root), Chroma with the `chroma run` server that the chromadb package
installs. Every test then gets a database of its own on each (`new_database`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx

PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)  # Debian's layout, newest first
CHROMA = Path(sys.executable).with_name("chroma")


def postgres_bin() -> Path | None:
    """The directory holding `initdb` and `postgres`, or None where PostgreSQL is not installed."""
    for directory in PG_BIN_DIRS:
        if (directory / "initdb").is_file():
            return directory
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_postgres_user(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def _wait_ready(process: subprocess.Popen, log: Path, name: str, ready) -> None:
    """Wait up to a minute for `ready()`; a server that exits or never gets ready is an error, with its log."""
    deadline = time.time() + 60
    while not ready():
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited: {log.read_text()}")
        if time.time() > deadline:
            process.kill()
            raise RuntimeError(f"{name} did not get ready in time: {log.read_text()}")
        time.sleep(0.2)


@dataclass
class Service:
    url: str
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


@dataclass
class Postgres(Service):
    """`url` is the superuser's, on its default database."""

    directory: Path

    def new_database(self) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def start_postgres() -> Postgres:
    """initdb a cluster in a new directory under the system's temp directory (which the `postgres` user can
    reach, unlike pytest's private one when running as root) and start it on a free loopback port (trust
    auth, loopback only)."""
    import tempfile

    binaries = postgres_bin()
    if binaries is None:
        raise RuntimeError("PostgreSQL is not installed (Debian package 'postgresql')")
    directory = Path(tempfile.mkdtemp(prefix="appliance-test-pg-"))
    data = directory / "data"
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
    subprocess.run(
        _as_postgres_user([str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8"]),
        check=True,
        capture_output=True,
    )
    port = _free_port()
    log = directory / "postgres.log"
    command = [
        str(binaries / "postgres"),
        "-D",
        str(data),
        "-p",
        str(port),
        "-c",
        "listen_addresses=127.0.0.1",
        "-c",
        f"unix_socket_directories={directory}",
        "-c",
        "max_connections=300",
        "-c",
        "fsync=off",  # a throw-away test cluster
    ]
    process = subprocess.Popen(_as_postgres_user(command), stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    import psycopg

    def accepts_connections() -> bool:
        try:
            psycopg.connect(url, connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    _wait_ready(process, log, "PostgreSQL", accepts_connections)
    return Postgres(url, process, log, directory)


@dataclass
class Chroma(Service):
    def new_database(self) -> str:
        """A new Chroma database name on this server (the appliance creates it on first use)."""
        return f"t_{uuid.uuid4().hex[:16]}"


def start_chroma(directory: Path) -> Chroma:
    """`chroma run` with its data in `directory`, on a free loopback port."""
    if not CHROMA.is_file():
        raise RuntimeError(f"no `chroma` command beside {sys.executable}")
    directory.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = directory / "chroma.log"
    env = {**os.environ, "ANONYMIZED_TELEMETRY": "False"}
    process = subprocess.Popen(
        [str(CHROMA), "run", "--path", str(directory / "data"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return httpx.get(f"{url}/api/v2/heartbeat", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    _wait_ready(process, log, "chroma run", answers)
    return Chroma(url, process, log)
