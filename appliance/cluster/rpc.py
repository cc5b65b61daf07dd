"""llama.cpp's RPC backend (ggml-rpc), reached through llama-cpp-python's own library handle.

Everything goes through `llama_cpp.llama_cpp._lib`, the handle llama-cpp-python loaded: a second
`ctypes.CDLL("libggml.so")` would be a second backend registry, and layers would silently stay on
the local CPU. The RPC functions are looked up in the RPC backend's registry, as llama.cpp's own
`--rpc` option and `rpc-server` do.

`hello` speaks the first message of the protocol from Python, with a timeout: an unreachable, busy
or incompatible worker becomes an exception here instead of an abort (ggml-rpc aborts its process
when a connection or handshake fails).
"""

from __future__ import annotations

import ctypes
import socket
import struct
from dataclasses import dataclass

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
