"""llama.cpp's RPC backend (ggml-rpc), reached through llama-cpp-python's own library handle.

Everything goes through `llama_cpp.llama_cpp._lib`, the handle llama-cpp-python loaded: a second
`ctypes.CDLL("libggml.so")` would be a second backend registry, and layers would silently stay on
the local CPU. The RPC functions are looked up in the RPC backend's registry, as llama.cpp's own
`--rpc` option and `rpc-server` do.

`hello` speaks the first message of the protocol from Python, with a timeout: an unreachable, busy
or incompatible worker becomes an exception here instead of an abort (ggml-rpc aborts its process
when a connection or handshake fails).

`PrivateServer` runs ggml's RPC server so that only its own process can connect to it (the protocol
has no authentication, and the server listens on TCP only and serves one client at a time).
"""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

RPC_PROTO_MAJOR = 7  # RPC_PROTO_MAJOR_VERSION of the ggml-rpc in llama-cpp-python 0.3.36
_CMD_HELLO = 14  # fixed by the protocol in every version
_CONN_CAPS = 24  # RPC_CONN_CAPS_SIZE: the hello request carries transport capabilities
DEVICE_CPU, DEVICE_GPU, DEVICE_IGPU, DEVICE_ACCEL = 0, 1, 2, 3


class RpcError(Exception):
    pass


def _lib():
    from llama_cpp import llama_cpp as binding

    return binding._lib


def _function(name: str, restype, argtypes):
    function = getattr(_lib(), name)
    function.restype = restype
    function.argtypes = argtypes
    return function


def _rpc_proc(name: bytes, prototype):
    registry = _function("ggml_backend_reg_by_name", ctypes.c_void_p, [ctypes.c_char_p])(b"RPC")
    if not registry:
        raise RpcError("this llama.cpp build has no RPC backend (build llama-cpp-python with -DGGML_RPC=on)")
    get_proc = _function("ggml_backend_reg_get_proc_address", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p])
    address = get_proc(registry, name)
    if not address:
        raise RpcError(f"the RPC backend does not export {name.decode()}")
    return prototype(address)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise RpcError("the connection closed during the RPC handshake")
        data += chunk
    return bytes(data)


def hello(host: str, port: int, timeout: float) -> tuple[int, int, int]:
    """The RPC server's protocol version (major, minor, patch); RpcError or OSError when it does not answer."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        return hello_on(sock, timeout)


def hello_on(sock: socket.socket, timeout: float) -> tuple[int, int, int]:
    """`hello` on a connection already open (the RPC server then serves nothing else on it)."""
    sock.settimeout(timeout)
    sock.sendall(bytes([_CMD_HELLO]) + struct.pack("<Q", _CONN_CAPS) + bytes(_CONN_CAPS))
    (size,) = struct.unpack("<Q", _recv_exact(sock, 8))
    if size != 4 + _CONN_CAPS:
        raise RpcError(f"unexpected RPC hello response ({size} bytes)")
    body = _recv_exact(sock, size)
    return body[0], body[1], body[2]


def register_servers(endpoints: list[str]) -> None:
    """Add RPC servers to llama.cpp's device list (before a model is loaded); cannot be undone in a process."""
    add_server = _rpc_proc(b"ggml_backend_rpc_add_server", ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p))
    register = _function("ggml_backend_register", None, [ctypes.c_void_p])
    for endpoint in endpoints:
        registry = add_server(endpoint.encode())
        if not registry:
            raise RpcError(f"the RPC server behind {endpoint} reports no devices")
        register(registry)


@dataclass
class Device:
    name: str
    description: str
    kind: int
    free: int
    total: int

    @property
    def is_cpu(self) -> bool:
        return self.kind in (DEVICE_CPU, DEVICE_ACCEL)


def _device_handles() -> list[int]:
    count = _function("ggml_backend_dev_count", ctypes.c_size_t, [])()
    get = _function("ggml_backend_dev_get", ctypes.c_void_p, [ctypes.c_size_t])
    return [get(i) for i in range(count)]


def _describe(handle: int) -> Device:
    name = _function("ggml_backend_dev_name", ctypes.c_char_p, [ctypes.c_void_p])(handle)
    description = _function("ggml_backend_dev_description", ctypes.c_char_p, [ctypes.c_void_p])(handle)
    kind = _function("ggml_backend_dev_type", ctypes.c_int, [ctypes.c_void_p])(handle)
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    memory = _function(
        "ggml_backend_dev_memory",
        None,
        [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)],
    )
    memory(handle, ctypes.byref(free), ctypes.byref(total))
    return Device((name or b"").decode(), (description or b"").decode(), kind, free.value, total.value)


def _serving_handles(names: list[str] | None) -> list[int]:
    """The devices a worker serves, chosen like llama.cpp's rpc-server: named ones, else GPUs, else the CPU."""
    handles = _device_handles()
    if names:
        chosen = [h for h in handles if _describe(h).name in names]
        missing = set(names) - {_describe(h).name for h in chosen}
        if missing:
            available = ", ".join(_describe(h).name for h in handles)
            raise RpcError(f"unknown device(s) {', '.join(sorted(missing))}; available: {available}")
        return chosen
    accelerators = [h for h in handles if not _describe(h).is_cpu]
    if accelerators:
        return accelerators
    return [h for h in handles if _describe(h).kind == DEVICE_CPU][:1]


def serving_devices(names: list[str] | None = None) -> list[Device]:
    return [_describe(h) for h in _serving_handles(names)]


def start_server(endpoint: str, n_threads: int, names: list[str] | None = None) -> None:
    """Run ggml's RPC server on `endpoint` (host:port) with the chosen devices; blocks for good."""
    handles = _serving_handles(names)
    if not handles:
        raise RpcError("no device to serve")
    start = _rpc_proc(
        b"ggml_backend_rpc_start_server",
        ctypes.CFUNCTYPE(
            None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)
        ),
    )
    array = (ctypes.c_void_p * len(handles))(*handles)
    start(endpoint.encode(), None, n_threads, len(handles), array)


# --- a server only this process can reach --------------------------------------------------------
_ACCEPTED = b"Accepted client connection"  # what ggml's server prints on stdout for each client
_TCP_LISTEN = 0x0A  # the state column of /proc/net/tcp


def _own_socket(match) -> int | None:
    """The descriptor of the first socket of this process for which `match(socket)` holds, or None."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            with socket.socket(fileno=os.dup(fd)) as sock:
                if match(sock):
                    return fd
        except OSError:  # closed meanwhile, not an IP socket, or not connected
            continue
    return None


def _others_on(address: tuple[str, int], mine: tuple[str, int]) -> int:
    """How many TCP connections, half-open ones included, reach `address` from anywhere but `mine`."""
    local, remote = _table_address(address), _table_address(mine)
    with open("/proc/net/tcp") as table:
        rows = [line.split()[1:4] for line in table if f" {local} " in line]  # a quick filter, then exactly
    return sum(1 for row in rows if row[0] == local and int(row[2], 16) != _TCP_LISTEN and row[1] != remote)


def _table_address(address: tuple[str, int]) -> str:
    """`address` as /proc/net/tcp writes it (the IPv4 address as a native-endian hex word)."""
    (word,) = struct.unpack("=I", socket.inet_aton(address[0]))
    return f"{word:08X}:{address[1]:04X}"


def _read_available(fd: int) -> bytes:
    os.set_blocking(fd, False)
    data = bytearray()
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return bytes(data)
        if not chunk:
            return bytes(data)
        data += chunk


def _queued(listener: socket.socket) -> int:
    """Connections waiting for accept() on `listener` (tcpi_unacked, on a listening socket)."""
    return struct.unpack_from("=I", listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104), 24)[0]


def _private_listener(host: str) -> tuple[socket.socket, socket.socket]:
    """A listening socket whose accept queue holds one connection of ours at its head, and that connection.

    The listener is open to anyone for the moment it takes to connect; /proc/net/tcp then shows whether
    anyone else (even half-open) got there first. If so it is thrown away and another is made. Whatever
    arrives later queues behind ours (with backlog 0 the kernel drops it: the queue is full).
    """
    for _ in range(5):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind((host, 0))
            listener.listen(0)
            client.settimeout(5.0)
            client.connect(listener.getsockname())
            client.settimeout(None)
            deadline = time.monotonic() + 5.0
            while _queued(listener) < 1 and time.monotonic() < deadline:
                time.sleep(0.0005)
            if _queued(listener) == 1 and _others_on(listener.getsockname(), client.getsockname()) == 0:
                return listener, client
            log.warning("another local process connected to the RPC server's new socket; making another")
        except OSError as exc:
            log.warning("could not connect to the RPC server's new socket: %s", exc)
        listener.close()
        client.close()
    raise RpcError("no connection to the RPC server could be made without another local process sharing it")


class PrivateServer:
    """ggml's RPC server in this process, reachable only through the connections `connect` hands out.

    ggml listens on TCP only (no Unix socket), accepts whoever comes first, and calls accept() again as
    soon as a client leaves. So: it listens on a random loopback address, this process connects the
    moment it does, and the hello on that connection plus ggml's count of clients show that nobody else
    got in first. From then on ggml's listening descriptor always holds (swapped in with dup2) a socket
    whose accept queue starts with a connection of ours, checked to be the only one that reached it; it
    is swapped for the next such socket before the connection ggml took is handed out, so before that
    connection can end and ggml can accept again. No other local process, whatever its user, gets a
    hello or the server's one client slot. Linux only (/proc).
    """

    def __init__(self, n_threads: int, names: list[str] | None = None):
        self.n_threads, self.names = n_threads, names
        self._host = ""  # a random loopback address, for all its sockets
        self._descriptor = -1  # ggml's listening descriptor
        self._listener: socket.socket | None = None  # the socket behind it now
        self._pending: socket.socket | None = None  # our connection at the head of its queue

    def start(self, timeout: float = 120.0) -> tuple[int, int, int]:
        """Start ggml's server and close it to everyone else; returns its protocol version."""
        host = self._host = f"127.{secrets.randbelow(256)}.{secrets.randbelow(256)}.{1 + secrets.randbelow(254)}"
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as free:
            free.bind((host, 0))
            port = free.getsockname()[1]
        output, write_end = os.pipe()
        os.dup2(write_end, 1)  # ggml prints a line on stdout for each client it accepts: count them
        os.close(write_end)
        thread = threading.Thread(target=self._serve, args=(f"{host}:{port}",), name="ggml-rpc", daemon=True)
        thread.start()
        try:
            probe = self._first_connection((host, port), thread, timeout)
            with probe:
                try:
                    version = hello_on(probe, 5.0)
                except TimeoutError:
                    raise RpcError(
                        "the RPC server did not answer this worker's probe: another local process connected first"
                    ) from None
                # ggml flushed its "accepted" lines before it read this hello: they are all in the pipe now.
                printed = _read_available(output)
                os.dup2(2, 1)
                os.write(2, printed)
                accepted = printed.count(_ACCEPTED)
                if accepted != 1:
                    raise RpcError(
                        f"{accepted} clients reached the RPC server as it started, where only this worker's "
                        "probe should have: another local process is connecting to it"
                    )
                descriptor = _own_socket(
                    lambda sock: (
                        sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) and sock.getsockname() == (host, port)
                    )
                )
                if descriptor is None:
                    raise RpcError("the RPC server's listening socket was not found")
                self._descriptor = descriptor
                # ggml serves the probe, not in accept(): its own listening socket (and whatever queued
                # on it) closes here, and when the probe ends it accepts our pending connection.
                self._swap()
        finally:
            os.dup2(2, 1)
            os.close(output)
        return version

    def _serve(self, endpoint: str) -> None:
        try:
            start_server(endpoint, self.n_threads, self.names)
        except RpcError as exc:
            log.error("%s", exc)

    def _first_connection(self, address: tuple[str, int], thread: threading.Thread, timeout: float) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return socket.create_connection(address, timeout=10.0)
            except ConnectionRefusedError:
                if not thread.is_alive() or time.monotonic() > deadline:
                    raise RpcError("the llama.cpp RPC server did not start listening") from None
                time.sleep(0.0002)  # connect the moment it listens: the window for anyone else is this short

    def _swap(self) -> None:
        """Put a new listening socket, our connection at the head of its queue, behind ggml's descriptor."""
        listener, client = _private_listener(self._host)
        os.dup2(listener.fileno(), self._descriptor)
        if self._listener is not None:
            self._listener.close()  # anyone who queued on it since ggml's last accept() is reset
        self._listener, self._pending = listener, client

    def connect(self, timeout: float = 30.0) -> socket.socket:
        """A connection ggml is serving (once the one before it has ended); nobody else can take its place."""
        if self._pending is None:
            raise RpcError("the RPC server has not started")
        peer = self._pending.getsockname()
        deadline = time.monotonic() + timeout
        while _own_socket(lambda sock: sock.getpeername() == peer) is None:  # ggml's end, once it accepted
            if time.monotonic() > deadline:
                raise RpcError("the RPC server did not take the next connection (is it still ending the last one?)")
            time.sleep(0.001)
        taken = self._pending
        self._swap()  # before `taken` can end, ggml's next accept() already has our next connection waiting
        return taken
