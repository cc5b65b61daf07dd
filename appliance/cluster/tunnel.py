"""The runner's side of a sharded model: local tunnels to the workers, then ggml-rpc registration.

ggml's RPC client speaks plain TCP. In the runner process, each worker gets a listener on a random
loopback address (an ephemeral port) whose every connection is carried to the worker over mutual TLS
(ALPN `ggml-rpc`, the worker's certificate checked against our CA and its node id). Only connections
made by this process (ggml's client, the greeting) are carried: any other local process is closed
before a byte reaches a worker (see `_from_this_process`). The tunnels run on an asyncio loop in a
thread of their own; ggml's calls release the GIL, so they keep moving while the model computes.
They live and die with the runner: one runner per cluster layout, as RPC registrations cannot be
undone in a process.

Before registering, each worker is greeted through its tunnel with the RPC hello, with a timeout: an
unreachable, busy or incompatible worker is a clear load error. Afterwards, a worker whose connection
ends (it stopped, or its machine did) is reported on the runner's protocol as a `cluster_error`
event naming it, just before ggml's client aborts the runner; the server turns that into the error
of the requests in flight.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import secrets
import threading
from collections.abc import Callable
from typing import Any

from appliance.cluster import pki, rpc
from appliance.cluster.worker import _set_keepalive, splice, split_address

CONNECT_TIMEOUT_S = 10.0
HELLO_TIMEOUT_S = 20.0  # a worker still ending a previous session waits up to 10 s before serving us
WATCH_INTERVAL_S = 5.0  # how often a worker in use is checked (a TLS status ping), and its timeout
WATCH_MISSES = 3  # missed checks in a row before the worker counts as stopped

log = logging.getLogger(__name__)


class ClusterError(Exception):
    pass


class Tunnels:
    def __init__(self, workers: list[dict[str, Any]], tls: dict[str, str], on_error: Callable[[str], None]):
        self.workers = workers
        self.on_error = on_error
        self.closing = False
        self._tls = tls
        self.endpoints: list[str] = []
        self.servers: list[asyncio.Server] = []
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(self._start())
            except BaseException as exc:  # noqa: BLE001 - reported to the constructor
                failure.append(exc)
                started.set()
                return
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="cluster-tunnels", daemon=True)
        self.thread.start()
        started.wait()
        if failure:
            raise ClusterError(f"could not open the local tunnels: {failure[0]}")

    def _client_context(self, alpn: str):
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_verify_locations(cafile=self._tls["ca"])
        context.load_cert_chain(self._tls["cert"], self._tls["key"])
        context.set_alpn_protocols([alpn])
        return context

    async def _start(self) -> None:
        context = self._client_context(pki.ALPN_RPC)
        control = self._client_context(pki.ALPN_CONTROL)
        self._open: dict[str, set[asyncio.StreamWriter]] = {w["address"]: set() for w in self.workers}
        self._watchers = []
        # Not 127.0.0.1: another local process has to find the address first (the check below is what stops it).
        host = f"127.{secrets.randbelow(256)}.{secrets.randbelow(256)}.{1 + secrets.randbelow(254)}"
        for worker in self.workers:
            server = await asyncio.start_server(lambda r, w, worker=worker: self._carry(worker, context, r, w), host, 0)
            self.servers.append(server)
            port = server.sockets[0].getsockname()[1]
            self.endpoints.append(f"{host}:{port}")
            self._watchers.append(asyncio.get_running_loop().create_task(self._watch(worker, control)))

    async def _ping(self, worker: dict[str, Any], context) -> None:
        host, port = split_address(worker["address"])
        reader, writer = await asyncio.open_connection(
            host, port, ssl=context, server_hostname=pki.worker_hostname(worker["node_id"])
        )
        try:
            writer.write(b'{"op": "ping"}\n')
            await writer.drain()
            if b"pong" not in await reader.readline():
                raise ConnectionError("no pong")
        finally:
            writer.close()

    async def _watch(self, worker: dict[str, Any], control) -> None:
        """While ggml has a connection to the worker, check every few seconds that the worker answers.

        A worker that stops answering (its process stopped, its machine hung) while its kernel keeps
        the TCP connection alive would otherwise hold ggml's client forever: after WATCH_MISSES
        missed checks its connections are closed, which ends the runner with an error naming it.
        """
        address = worker["address"]
        misses = 0
        while not self.closing:
            await asyncio.sleep(WATCH_INTERVAL_S)
            if not self._open[address]:
                misses = 0
                continue
            try:
                await asyncio.wait_for(self._ping(worker, control), WATCH_INTERVAL_S)
                misses = 0
            except (OSError, TimeoutError, ValueError):
                misses += 1
            if misses >= WATCH_MISSES and not self.closing:
                self.on_error(
                    f"cluster worker {address} stopped answering ({misses} status checks in a row went unanswered)"
                )
                self.closing = True  # the runner ends now; the closed connections need no second report
                for writer in list(self._open[address]):
                    writer.close()

    async def _carry(self, worker: dict[str, Any], context, reader, writer) -> None:
        address = worker["address"]
        peer = writer.get_extra_info("peername")
        # Off the loop: reading /proc/net/tcp takes milliseconds, and the other tunnels keep carrying meanwhile.
        if peer is None or not await asyncio.to_thread(_from_this_process, peer, writer.get_extra_info("sockname")):
            log.warning(
                "refused a connection to the tunnel of cluster worker %s from another process (%s)", address, peer
            )
            writer.close()
            return
        host, port = split_address(address)
        try:
            remote_reader, remote_writer = await asyncio.wait_for(
                asyncio.open_connection(
                    host, port, ssl=context, server_hostname=pki.worker_hostname(worker["node_id"]), limit=1 << 20
                ),
                CONNECT_TIMEOUT_S,
            )
        except (OSError, TimeoutError) as exc:
            if not self.closing:
                self.on_error(f"cluster worker {address} is unreachable: {exc or type(exc).__name__}")
            writer.close()
            return
        _set_keepalive(remote_writer.get_extra_info("socket"))

        def ended(side: str) -> None:
            if side == "second" and not self.closing:
                self.on_error(f"cluster worker {address} closed the connection: it stopped or lost its network")

        self._open[address].add(writer)
        try:
            await splice(reader, writer, remote_reader, remote_writer, on_end=ended)
        finally:
            self._open[address].discard(writer)

    def greet(self) -> None:
        """The RPC hello through every tunnel, with a timeout; ClusterError naming the worker otherwise."""
        for worker, endpoint in zip(self.workers, self.endpoints, strict=True):
            host, port = split_address(endpoint)
            try:
                major, minor, patch = rpc.hello(host, port, HELLO_TIMEOUT_S)
            except (OSError, rpc.RpcError) as exc:
                raise ClusterError(
                    f"cluster worker {worker['address']} did not answer the RPC handshake "
                    f"({exc or type(exc).__name__}): is it running, and not serving another session?"
                ) from None
            if major != rpc.RPC_PROTO_MAJOR:
                raise ClusterError(
                    f"cluster worker {worker['address']} speaks ggml-rpc v{major}.{minor}.{patch}, "
                    f"this appliance v{rpc.RPC_PROTO_MAJOR}"
                )

    def close(self) -> None:
        self.closing = True
        self.loop.call_soon_threadsafe(self.loop.stop)


def _from_this_process(peer: tuple[str, int], listener: tuple[str, int]) -> bool:
    """Whether the connection that reached `listener` from `peer` was made by a socket of this process.

    The connecting end is the /proc/net/tcp entry from `peer` to `listener`; its inode must be one of
    this process's socket descriptors. The entry exists from connect() on and the descriptor from
    socket() on, so both are there once the connection is accepted: a missing one (its owner already
    closed it) is a refusal too. Entries without a socket (TIME_WAIT, orphans) show inode 0.
    """
    local, remote = rpc._table_address(peer), rpc._table_address(listener)
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table if f" {local} {remote} " in line]
    targets = {f"socket:[{row[9]}]" for row in rows if row[1] == local and row[2] == remote and row[9] != "0"}
    if not targets:
        return False
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") in targets:
                return True
        except OSError:  # closed meanwhile
            continue
    return False


def attach_workers(
    cluster: dict[str, Any], model_params, send: Callable[[dict[str, Any]], None]
) -> tuple[Tunnels, Any]:
    """Open tunnels, greet and register the workers, and set the split on `model_params`.

    Returns the tunnels and the ctypes arrays handed to llama.cpp (all must outlive the model).
    """
    import llama_cpp

    tunnels = Tunnels(
        cluster["workers"], cluster["tls"], lambda message: send({"event": "cluster_error", "message": message})
    )
    try:
        tunnels.greet()
        rpc.register_servers(tunnels.endpoints)
    except (ClusterError, rpc.RpcError):
        tunnels.close()
        raise
    n_devices = llama_cpp.llama_max_devices()
    if len(cluster["tensor_split"]) > n_devices:
        tunnels.close()
        raise ClusterError(f"the plan uses {len(cluster['tensor_split'])} devices; llama.cpp takes at most {n_devices}")
    split = (ctypes.c_float * n_devices)(*cluster["tensor_split"])
    model_params.tensor_split = split
    model_params.n_gpu_layers = int(cluster["n_gpu_layers"])
    overrides = _output_on_cpu()
    model_params.tensor_buft_overrides = ctypes.addressof(overrides)
    return tunnels, (split, overrides)


class _BufferOverride(ctypes.Structure):  # llama_model_tensor_buft_override
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


OUTPUT_TENSORS = rb"^(output|output_norm|token_embd)\.weight$"  # token_embd: the output of tied embeddings


def _output_on_cpu():
    """A NULL-terminated override list keeping the output layer's weights in local CPU memory."""
    cpu_buffer_type = rpc._function("ggml_backend_cpu_buffer_type", ctypes.c_void_p, [])()
    return (_BufferOverride * 2)(_BufferOverride(OUTPUT_TENSORS, cpu_buffer_type), _BufferOverride(None, None))
