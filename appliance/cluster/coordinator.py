"""The coordinator's side of the cluster: paired workers, pairing, probing, and shard configurations.

Paired workers are kept in APPLIANCE_HOME/cluster/nodes.json next to the CA (`pki.py`). A probe
opens a mutual-TLS control connection with a timeout and asks for the worker's status; a worker
that is unreachable, busy, or runs another llama.cpp is reported with the reason and never handed to
llama.cpp (whose RPC client aborts its process on such a worker).
"""

from __future__ import annotations

import json
import socket
import ssl
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from appliance.cluster import pairing, pki, rpc
from appliance.cluster.plan import Capacity, Plan, model_shape, plan_layers
from appliance.cluster.worker import split_address
from appliance.errors import ApplianceError, BadRequest, Conflict, Forbidden, InsufficientMemory, NotFound

PROBE_TIMEOUT_S = 5.0


@dataclass
class Node:
    address: str  # host:port of the worker's TLS listener
    node_id: str
    paired_at: float


@dataclass
class NodeStatus:
    address: str
    node_id: str
    reachable: bool = False
    error: str | None = None
    latency_ms: float | None = None
    version: str | None = None
    llama_cpp_python: str | None = None
    rpc_proto: list[int] | None = None
    devices: list[dict[str, Any]] = field(default_factory=list)
    free_memory: int = 0
    max_memory: int | None = None
    busy: bool = False
    session: dict[str, Any] | None = None

    @property
    def problem(self) -> str | None:
        """Why this worker cannot take layers now, or None."""
        if not self.reachable:
            return f"unreachable: {self.error}"
        if self.rpc_proto is None:
            return "its llama.cpp RPC server is not running"
        if self.rpc_proto[0] != rpc.RPC_PROTO_MAJOR:
            return f"its ggml-rpc protocol is v{self.rpc_proto[0]}, this appliance speaks v{rpc.RPC_PROTO_MAJOR}"
        mine = _llama_cpp_version()
        if self.llama_cpp_python != mine:
            return f"it runs llama-cpp-python {self.llama_cpp_python}, this appliance {mine}"
        if self.busy:
            return "busy: another session is using it"
        return None

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "usable": self.problem is None, "problem": self.problem}


def _llama_cpp_version() -> str:
    try:
        return metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        return "unknown"


def _lines(tls: ssl.SSLSocket):
    reader = tls.makefile("rb")

    def exchange(message: dict[str, Any]) -> dict[str, Any]:
        tls.sendall((json.dumps(message) + "\n").encode())
        line = reader.readline(1 << 20)
        if not line:
            raise ConnectionError("the worker closed the connection")
        answer = json.loads(line)
        if not isinstance(answer, dict):
            raise ValueError("the worker's answer is not a JSON object")
        return answer

    return exchange


class Cluster:
    def __init__(self, directory: Path):
        self.directory = directory
        self.ca = pki.CertificateAuthority(directory)

    @property
    def _nodes_file(self) -> Path:
        return self.directory / "nodes.json"

    def nodes(self) -> list[Node]:
        if not self._nodes_file.is_file():
            return []
        return [Node(**item) for item in json.loads(self._nodes_file.read_text())]

    def _save(self, nodes: list[Node]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._nodes_file.write_text(json.dumps([asdict(n) for n in nodes], indent=2))

    def node(self, address: str) -> Node:
        for node in self.nodes():
            if node.address == address:
                return node
        raise NotFound(f"no paired worker at {address}")

    def tls_paths(self) -> dict[str, str]:
        self.ca.ensure()
        return {"ca": str(self.ca.ca_path), "cert": str(self.ca.cert_path), "key": str(self.ca.key_path)}

    # --- pairing ---------------------------------------------------------------------------------
    def pair(self, address: str, code: str, timeout: float = 15.0) -> NodeStatus:
        """Pair with the worker at `address` using the code its console shows; returns its first status."""
        if len(pairing.normalize(code)) != pairing.CODE_LENGTH:
            raise BadRequest(f"a pairing code has {pairing.CODE_LENGTH} letters and digits (XXXX-XXXX-XXXX)")
        self.ca.ensure()
        host, port = split_address(address)
        address = f"{host}:{port}"
        ca_pem = self.ca.ca_path.read_text()
        try:
            with (
                socket.create_connection((host, port), timeout=timeout) as raw,
                pki.pairing_client_context().wrap_socket(raw, server_hostname=host) as tls,
            ):
                exchange = _lines(tls)
                if tls.selected_alpn_protocol() != pki.ALPN_PAIR:
                    raise Conflict(_already_paired(address))
                bootstrap = pki.fingerprint(tls.getpeercert(binary_form=True))
                key = pairing.code_key(code, bootstrap)
                offer = exchange(
                    {"op": "pair", "ca": ca_pem, "proof": pairing.proof(key, "coordinator", ca_pem, bootstrap)}
                )
                if "error" in offer:
                    raise Forbidden(f"the worker at {address} refused to pair: {offer['error']}")
                csr, node_id = str(offer.get("csr", "")), str(offer.get("node_id", ""))
                if not node_id.isalnum() or not pairing.verify(key, offer.get("proof"), "worker", ca_pem, csr):
                    raise Forbidden(
                        f"the worker at {address} did not prove it knows the code: not the machine you meant, "
                        "or something between the two machines; nothing was paired"
                    )
                certificate = self.ca.sign_worker(csr.encode(), node_id).decode()
                done = exchange({"op": "certificate", "certificate": certificate})
                if not done.get("ok"):
                    raise Forbidden(f"the worker at {address} did not accept its certificate: {done.get('error')}")
        except ssl.SSLError as exc:
            raise Conflict(f"{_already_paired(address)} ({exc.reason or exc})") from None
        except (OSError, ValueError) as exc:
            raise ApplianceError(f"could not pair with {address}: {exc}") from None
        nodes = [n for n in self.nodes() if n.address != address and n.node_id != node_id]
        node = Node(address=address, node_id=node_id, paired_at=time.time())
        self._save([*nodes, node])
        status = self.probe(node)
        for _ in range(20):  # the worker restarts its listener in mutual-TLS mode
            if status.reachable:
                break
            time.sleep(0.25)
            status = self.probe(node)
        return status

    def unpair(self, address: str) -> None:
        node = self.node(address)
        self._save([n for n in self.nodes() if n.node_id != node.node_id])

    # --- probing ---------------------------------------------------------------------------------
    def connect(self, node: Node, alpn: str, timeout: float) -> ssl.SSLSocket:
        host, port = split_address(node.address)
        raw = socket.create_connection((host, port), timeout=timeout)
        try:
            return self.ca.client_context(alpn).wrap_socket(raw, server_hostname=pki.worker_hostname(node.node_id))
        except BaseException:
            raw.close()
            raise

    def probe(self, node: Node, timeout: float = PROBE_TIMEOUT_S) -> NodeStatus:
        status = NodeStatus(address=node.address, node_id=node.node_id)
        try:
            with self.connect(node, pki.ALPN_CONTROL, timeout) as tls:
                exchange = _lines(tls)
                rtts = []
                for _ in range(3):
                    started = time.perf_counter()
                    exchange({"op": "ping"})
                    rtts.append((time.perf_counter() - started) * 1000)
                answer = exchange({"op": "status"})
        except ssl.SSLCertVerificationError as exc:
            status.error = f"its certificate is not the one issued at pairing ({exc.verify_message})"
            return status
        except ssl.SSLError as exc:
            status.error = f"TLS refused ({exc.reason or exc}): was the worker reset? pair it again"
            return status
        except (OSError, ValueError, ConnectionError) as exc:
            status.error = str(exc) or type(exc).__name__
            return status
        status.reachable = True
        status.latency_ms = round(statistics.median(rtts), 3)
        for key in ("version", "llama_cpp_python", "rpc_proto", "devices", "max_memory", "busy", "session"):
            setattr(status, key, answer.get(key))
        status.devices = status.devices or []
        status.free_memory = int(answer.get("free_memory") or 0)
        return status

    def probe_all(self, timeout: float = PROBE_TIMEOUT_S) -> list[NodeStatus]:
        nodes = self.nodes()
        if not nodes:
            return []
        with ThreadPoolExecutor(max_workers=min(16, len(nodes))) as pool:
            return list(pool.map(lambda n: self.probe(n, timeout), nodes))

    # --- sharding --------------------------------------------------------------------------------
    def plan(
        self,
        info,
        n_ctx: int,
        n_parallel: int,
        local_free: int | None,
        num_nodes: int = 0,
        statuses: list[NodeStatus] | None = None,
    ) -> tuple[Plan, list[NodeStatus]]:
        """Probe the workers and split the model over this machine (`local_free` bytes) and the usable ones."""
        statuses = self.probe_all() if statuses is None else statuses
        if not statuses:
            raise InsufficientMemory(
                "no worker is paired (pair one with `appliance cluster pair HOST:PORT --code CODE`)"
            )
        usable = [s for s in statuses if s.problem is None]
        unusable = "; ".join(f"{s.address} {s.problem}" for s in statuses if s.problem)
        if num_nodes:
            if len(usable) < num_nodes:
                raise InsufficientMemory(
                    f"num_nodes {num_nodes}: only {len(usable)} of the {len(statuses)} paired workers can be used"
                    + (f" ({unusable})" if unusable else "")
                )
            chosen = {s.address for s in sorted(usable, key=lambda s: -s.free_memory)[:num_nodes]}
            usable = [s for s in usable if s.address in chosen]
        if not usable:
            raise InsufficientMemory(f"no paired worker can be used ({unusable})")
        nodes = [Capacity("local", local_free, local=True)] if local_free and local_free > 0 else []
        for status in usable:
            devices = [max(1, int(d.get("free") or 0)) for d in status.devices] or [1]
            nodes.append(Capacity(status.address, status.free_memory, devices=devices))
        try:
            plan = plan_layers(model_shape(info, n_ctx, n_parallel), nodes)
        except InsufficientMemory as exc:
            raise InsufficientMemory(exc.message + (f"; unusable workers: {unusable}" if unusable else "")) from None
        return plan, usable

    def shard_config(self, plan: Plan, usable: list[NodeStatus]) -> dict[str, Any]:
        """What the runner needs to reach the workers of `plan` and place the layers."""
        by_address = {s.address: s for s in usable}
        workers = [{"address": s.node, "node_id": by_address[s.node].node_id} for s in plan.shares if s.node != "local"]
        return {
            "workers": workers,
            "tls": self.tls_paths(),
            "n_gpu_layers": plan.n_gpu_layers,
            "tensor_split": plan.tensor_split,
            "placement": plan.as_json()["nodes"],
        }


def _already_paired(address: str) -> str:
    return (
        f"the worker at {address} is not waiting to be paired (it is paired already); "
        "run `appliance worker --reset-pairing` on it for a new code"
    )
