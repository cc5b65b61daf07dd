"""`appliance worker`: lends this machine's memory and compute to one paired coordinator.

Two processes. A child runs llama.cpp's own RPC server (`ggml_backend_rpc_start_server`). The RPC
protocol has no authentication or encryption and ggml listens on TCP only, so the child keeps it to
itself (`rpc.PrivateServer`): ggml only ever accepts connections the child made and checked, which
it hands to this process over a Unix socket pair. No other local process, whatever its user, gets
the RPC hello or ties up the server. In front of it this process serves TLS 1.3 on the address given
(`--listen HOST:PORT`), and what a connection may do depends on the ALPN protocol it negotiates:

- unpaired worker: only `appliance-pair/1`, the one-time-code exchange (`pairing.py`), on a
  self-signed bootstrap certificate. Nothing reaches ggml.
- paired worker: a client certificate chained to the pinned coordinator CA is required by the TLS
  handshake itself (an unpaired peer is refused before it can send a byte). Then
  `appliance-control/1` answers one JSON status request (version, devices, free memory, cap, busy),
  and `ggml-rpc` splices the connection to a new connection to the RPC server.

ggml's RPC server serves one client at a time: a second RPC connection waits a few seconds for the
first to end and is then refused (the coordinator's probe reports the worker busy first). The child
is restarted if it dies (an assertion in ggml ends it); it also dies with this process.
State lives in APPLIANCE_HOME/worker (keys 0600). `--reset-pairing` forgets the coordinator.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import re
import signal
import socket
import ssl
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.cluster import pairing, pki
from appliance.errors import ApplianceError

log = logging.getLogger(__name__)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2}
_UNITS |= {"g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}
SESSION_WAIT_S = 10.0  # how long a second RPC connection waits for the current one to end
_LINE_LIMIT = 1 << 20


def parse_size(text: str) -> int:
    """'16GiB', '16G', '512MiB', '1000000' -> bytes."""
    match = _SIZE.match(text)
    unit = (match.group(2) or "").lower() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 16GiB, 512MiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def split_address(address: str, default_port: int = 50052) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep:
        return address, default_port
    return host.strip("[]"), int(port)


class RpcStartFailed(ApplianceError):
    pass


class WorkerState:
    """What a worker remembers: its node id, the pending code's key, or the pinned coordinator CA."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.data: dict[str, Any] = {}
        if self._file.is_file():
            self.data = json.loads(self._file.read_text())

    @property
    def _file(self) -> Path:
        return self.directory / "state.json"

    def path(self, name: str) -> Path:
        return self.directory / name

    def save(self) -> None:
        pki.write_private(self._file, json.dumps(self.data, indent=2).encode())

    @property
    def node_id(self) -> str:
        if "node_id" not in self.data:
            self.data["node_id"] = uuid.uuid4().hex[:16]
            self.save()
        return self.data["node_id"]

    @property
    def paired(self) -> bool:
        return bool(self.data.get("paired")) and self.path("worker.pem").is_file()

    def reset(self) -> None:
        """Forget the coordinator (and this worker's identity): the next start shows a new code."""
        for name in ("worker.pem", "worker.key", "coordinator-ca.pem", "bootstrap.pem", "bootstrap.key"):
            self.path(name).unlink(missing_ok=True)
        self.data = {}
        self.save()

    def new_code(self) -> str:
        """A fresh one-time code for an unpaired worker (any earlier one stops working)."""
        key = pki.new_key()
        pki.write_private(self.path("bootstrap.key"), pki.key_pem(key))
        cert = pki.self_signed(f"unpaired appliance worker {self.node_id}", key)
        self.path("bootstrap.pem").write_bytes(cert)
        code = pairing.new_code()
        self.data.update(code_key=pairing.code_key(code, pki.pem_fingerprint(cert)).hex(), failures=0)
        self.save()
        return code

    def server_context(self) -> ssl.SSLContext:
        if self.paired:
            return pki.worker_server_context(
                self.path("worker.pem"), self.path("worker.key"), self.path("coordinator-ca.pem")
            )
        return pki.bootstrap_server_context(self.path("bootstrap.pem"), self.path("bootstrap.key"))


@dataclass
class Session:
    started: float = field(default_factory=time.time)
    bytes_in: int = 0
    bytes_out: int = 0
    ended: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {"started": self.started, "ended": self.ended, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out}


def _set_keepalive(sock: socket.socket | None) -> None:
    """Notice a vanished peer machine within about 20 s instead of waiting forever on a dead connection.

    Keepalive covers an idle connection; TCP_USER_TIMEOUT covers data the peer never acknowledges.
    """
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 3)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 20_000)


async def splice(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    reader2: asyncio.StreamReader,
    writer2: asyncio.StreamWriter,
    session: Session | None = None,
    on_end: Callable[[str], None] | None = None,
) -> str:
    """Copy bytes both ways until either side ends; returns which side ended first ("first"/"second").

    `on_end` hears which side ended before both are closed (the tunnel reports a lost worker with it).
    """

    async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, inbound: bool) -> str:
        """Returns the side whose end stopped the copy: EOF or an error reading, or an error writing."""
        source_side, sink_side = ("first", "second") if inbound else ("second", "first")
        while True:
            try:
                data = await source.read(1 << 16)
            except (OSError, ssl.SSLError):
                return source_side
            if not data:
                return source_side
            if session is not None:
                if inbound:
                    session.bytes_in += len(data)
                else:
                    session.bytes_out += len(data)
            try:
                sink.write(data)
                await sink.drain()
            except (OSError, ssl.SSLError):
                return sink_side

    forward = asyncio.ensure_future(pump(reader, writer2, True))
    backward = asyncio.ensure_future(pump(reader2, writer, False))
    ended = "first"
    try:
        done, _ = await asyncio.wait({forward, backward}, return_when=asyncio.FIRST_COMPLETED)
        sides = {task.result() for task in done if not task.cancelled() and task.exception() is None}
        ended = "second" if "second" in sides else "first"
        if on_end is not None:
            on_end(ended)
    finally:
        for task in (forward, backward):
            task.cancel()
        for stream in (writer, writer2):
            stream.close()
        await asyncio.gather(forward, backward, return_exceptions=True)
    return ended


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _child_ready(control: socket.socket, timeout: float) -> list[int] | None:
    """The RPC server's protocol version, which the child sends once its server is closed to others."""
    control.settimeout(timeout)
    try:
        version = control.recv(3)
    except OSError:
        return None
    return list(version) if len(version) == 3 else None


class Worker:
    def __init__(
        self,
        state: WorkerState,
        host: str,
        port: int,
        max_memory: int | None = None,
        threads: int = 0,
        devices: list[str] | None = None,
        on_event: Callable[[str], None] | None = None,
    ):
        self.state = state
        self.host, self.port = host, port
        self.max_memory = max_memory
        self.threads = threads or max(1, len(os.sched_getaffinity(0)))
        self.device_names = devices or []
        self.on_event = on_event or (lambda message: log.info("%s", message))
        self.rpc_version: list[int] | None = None
        self.child: asyncio.subprocess.Process | None = None
        self._child_control: socket.socket | None = None  # to the child: asks it for connections to its server
        self._ready = asyncio.Event()
        self._session_lock = asyncio.Lock()
        self.session: Session | None = None
        self._server: asyncio.Server | None = None
        self._stopping = False

    # --- the private RPC server -------------------------------------------------------------------
    async def _supervise(self) -> None:
        failures = 0
        while not self._stopping:
            control, child_end = socket.socketpair()
            env = dict(os.environ, GGML_RPC_NO_RDMA="1")
            try:
                self.child = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "appliance.cluster.worker",
                    "--rpc-child",
                    str(child_end.fileno()),
                    str(self.threads),
                    *self.device_names,
                    stdout=sys.stderr.fileno(),
                    env=env,
                    pass_fds=(child_end.fileno(),),
                    preexec_fn=_die_with_parent,
                )
            finally:
                child_end.close()
            self.rpc_version = await asyncio.to_thread(_child_ready, control, 120)
            if not self.rpc_version:
                if self.child.returncode is None:
                    self.child.kill()
                failures += 1
                if failures >= 3:
                    control.close()
                    raise RpcStartFailed("the llama.cpp RPC server did not start three times; its errors are above")
            else:
                failures = 0
                self._child_control = control
                self._ready.set()
                self.on_event(
                    f"llama.cpp RPC server v{'.'.join(map(str, self.rpc_version))} ready, "
                    "reachable only through this worker"
                )
            code = await self.child.wait()
            self._ready.clear()
            self._child_control = None
            control.close()
            if not self._stopping:
                self.on_event(f"the llama.cpp RPC server exited ({code}); restarting it")
                await asyncio.sleep(1)

    # --- TLS front ---------------------------------------------------------------------------------
    async def _listen(self) -> None:
        if self._server is not None:
            self._server.close()
        self._server = await asyncio.start_server(
            self._handle,
            self.host,
            self.port,
            ssl=self.state.server_context(),
            limit=_LINE_LIMIT,
            ssl_handshake_timeout=10,
        )

    async def run(self, on_listening: Callable[[], None] | None = None) -> None:
        supervisor = asyncio.create_task(self._supervise())
        try:
            ready = asyncio.create_task(self._ready.wait())
            await asyncio.wait({ready, supervisor}, timeout=400, return_when=asyncio.FIRST_COMPLETED)
            if supervisor.done():
                ready.cancel()
                supervisor.result()  # raises RpcStartFailed
            if not ready.done():
                raise RpcStartFailed("the llama.cpp RPC server did not answer within 400 s")
            await self._listen()
            if on_listening:
                on_listening()
            await supervisor
        finally:
            self._stopping = True
            if self._server is not None:
                self._server.close()
            if self.child is not None and self.child.returncode is None:
                self.child.kill()
                await self.child.wait()
            supervisor.cancel()
            await asyncio.gather(supervisor, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        protocol = ssl_object.selected_alpn_protocol() if ssl_object else None
        peer = writer.get_extra_info("peername")
        try:
            if protocol == pki.ALPN_PAIR and not self.state.paired:
                await self._pair(reader, writer)
            elif protocol == pki.ALPN_CONTROL and self.state.paired:
                await self._control(reader, writer)
            elif protocol == pki.ALPN_RPC and self.state.paired:
                await self._rpc(reader, writer)
            else:
                log.warning("refused a connection from %s (protocol %s)", peer, protocol)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError, ssl.SSLError) as exc:
            log.warning("connection from %s ended: %s", peer, exc)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _send(self, writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
        writer.write((json.dumps(message) + "\n").encode())
        await writer.drain()

    async def _receive(self, reader: asyncio.StreamReader) -> dict[str, Any]:
        line = await asyncio.wait_for(reader.readline(), 30)
        message = json.loads(line or b"{}")
        if not isinstance(message, dict):
            raise ValueError("not a JSON object")
        return message

    async def _pair(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        state = self.state
        request = await self._receive(reader)
        key_hex = state.data.get("code_key")
        if not key_hex:
            await self._send(writer, {"error": "this worker has no valid pairing code; restart it for a new one"})
            return
        key = bytes.fromhex(key_hex)
        ca_pem = str(request.get("ca", ""))
        bootstrap_fp = pki.pem_fingerprint(state.path("bootstrap.pem").read_bytes())
        if request.get("op") != "pair" or not pairing.verify(
            key, request.get("proof"), "coordinator", ca_pem, bootstrap_fp
        ):
            state.data["failures"] = int(state.data.get("failures", 0)) + 1
            if state.data["failures"] >= pairing.MAX_FAILURES:
                state.data.pop("code_key", None)
                self.on_event("too many wrong pairing codes: the code is void; restart the worker for a new one")
            state.save()
            await asyncio.sleep(1)
            await self._send(writer, {"error": "wrong pairing code"})
            return
        ca = x509.load_pem_x509_certificate(ca_pem.encode())
        worker_key = pki.new_key()
        csr = pki.certificate_request(worker_key, state.node_id).decode()
        await self._send(
            writer, {"node_id": state.node_id, "csr": csr, "proof": pairing.proof(key, "worker", ca_pem, csr)}
        )
        answer = await self._receive(reader)
        cert_pem = str(answer.get("certificate", "")).encode()
        cert = x509.load_pem_x509_certificate(cert_pem)
        cert.verify_directly_issued_by(ca)
        mine = worker_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        theirs = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if mine != theirs:
            raise ValueError("the signed certificate is not for this worker's key")
        pki.write_private(state.path("worker.key"), pki.key_pem(worker_key))
        state.path("worker.pem").write_bytes(cert_pem)
        state.path("coordinator-ca.pem").write_bytes(ca_pem.encode())
        state.data.update(paired=True, coordinator_ca=pki.pem_fingerprint(ca_pem.encode()), paired_at=time.time())
        state.data.pop("code_key", None)
        state.save()
        await self._send(writer, {"ok": True, "node_id": state.node_id})
        self.on_event(f"paired with the coordinator whose CA fingerprint is {state.data['coordinator_ca'][:16]}")
        await self._listen()  # from now on: mutual TLS only

    def status(self) -> dict[str, Any]:
        import llama_cpp
        import psutil

        from appliance.cluster import rpc

        devices = []
        for device in rpc.serving_devices(self.device_names or None):
            free = psutil.virtual_memory().available if device.is_cpu else device.free
            devices.append(
                {"name": device.name, "description": device.description, "free": free, "total": device.total}
            )
        free = sum(d["free"] for d in devices)
        if self.max_memory is not None:
            free = min(free, self.max_memory)
        return {
            "node_id": self.state.node_id,
            "version": __version__,
            "llama_cpp_python": llama_cpp.__version__,
            "rpc_proto": self.rpc_version,
            "rpc_ready": self._ready.is_set(),
            "devices": devices,
            "free_memory": free,
            "max_memory": self.max_memory,
            "threads": self.threads,
            "busy": self._session_lock.locked(),
            "session": self.session.as_json() if self.session else None,
        }

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            line = await asyncio.wait_for(reader.readline(), 30)
            if not line:
                return
            request = json.loads(line)
            op = request.get("op") if isinstance(request, dict) else None
            if op == "status":
                await self._send(writer, await asyncio.to_thread(self.status))
            elif op == "ping":
                await self._send(writer, {"pong": True})
            else:
                await self._send(writer, {"error": f"unknown operation {op!r}"})

    async def _rpc(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _set_keepalive(writer.get_extra_info("socket"))
        try:
            await asyncio.wait_for(self._session_lock.acquire(), SESSION_WAIT_S)
        except TimeoutError:
            log.warning("refused an RPC connection: another session is active")
            return
        try:
            if not self._ready.is_set():
                await asyncio.wait_for(self._ready.wait(), 30)
            connection = await asyncio.to_thread(self._rpc_connection)
            local_reader, local_writer = await asyncio.open_connection(sock=connection)
            self.session = Session()
            log.info("RPC session started")
            ended = await splice(reader, writer, local_reader, local_writer, self.session)
            self.session.ended = time.time()
            log.info(
                "RPC session ended by the %s (%d bytes in, %d out)",
                "coordinator" if ended == "first" else "RPC server",
                self.session.bytes_in,
                self.session.bytes_out,
            )
        finally:
            self._session_lock.release()

    def _rpc_connection(self) -> socket.socket:
        """A new connection to the RPC server, made by the child: only the child's connections get in."""
        control = self._child_control
        if control is None:
            raise ConnectionError("the llama.cpp RPC server is restarting")
        try:
            control.settimeout(40)  # the child waits up to 30 s for ggml to end the previous session
            control.sendall(b"c")
            message, fds, _, _ = socket.recv_fds(control, 1, 1)
        except OSError as exc:
            raise ConnectionError(f"the llama.cpp RPC server did not answer: {exc}") from None
        if message != b"c" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise ConnectionError("the llama.cpp RPC server gave no connection")
        return socket.socket(fileno=fds[0])


def _rpc_child(argv: list[str]) -> int:
    """The child process: ggml's RPC server, closed to everyone; hands connections to it to the parent.

    `argv`: this process's end of the control socket pair, the thread count, device names. Each byte b"c"
    from the parent is answered with b"c" and a new connected socket (or b"e" without one).
    """
    from appliance.cluster import rpc

    control = socket.socket(fileno=int(argv[0]))
    threads, devices = int(argv[1]), argv[2:]
    server = rpc.PrivateServer(threads, devices or None)
    try:
        version = server.start()
    except (OSError, rpc.RpcError) as exc:
        log.error("the llama.cpp RPC server could not start: %s", exc)
        return 1
    control.sendall(bytes(version))
    while control.recv(1) == b"c":
        try:
            connection = server.connect()
        except (OSError, rpc.RpcError) as exc:
            log.error("could not connect to the llama.cpp RPC server: %s", exc)
            control.sendall(b"e")
            continue
        with connection:
            socket.send_fds(control, [b"c"], [connection.fileno()])
    return 0  # the worker closed its end


def main_event_loop(worker: Worker, on_listening: Callable[[], None]) -> None:
    """Run the worker until SIGINT/SIGTERM."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await worker.run(on_listening)

    asyncio.run(run())


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rpc-child":
        code = _rpc_child(sys.argv[2:])
        sys.stderr.flush()
        os._exit(code)  # not sys.exit: ggml's thread is still inside its server; skip the interpreter's teardown
    sys.exit("usage: appliance worker --listen HOST:PORT")
