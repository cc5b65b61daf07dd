"""How a model's layers are split across this machine and paired workers.

llama.cpp places a model this way once RPC servers are registered: the token embeddings stay on the
local CPU, the first `n_layer + 1 - n_gpu_layers` layers too, and the remaining layers go to the
registered devices (RPC devices first, in registration order) in contiguous runs whose lengths follow
`tensor_split`. Each layer's KV cache lives with the layer. The output layer would go to the last
device; the runner pins its weights to the local CPU instead (a tensor override), so a token's logits
(n_vocab floats: 500 KiB for a 128k vocabulary) never cross the network, only its hidden state.

The plan gives every node a contiguous run of layers in proportion to its free memory (the local
node's free memory is the appliance's budget less the models in use), never more than fits (weights
plus KV cache plus a compute-buffer allowance), and at least one layer to each worker chosen. When the
nodes together cannot hold the model it is refused with the figures. The `tensor_split` it gives is
exact: boundaries sit half a layer inside each run, so llama.cpp's rounding cannot move a layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from appliance.errors import InsufficientMemory

GiB = 1 << 30
LOCAL_OVERHEAD = 64 << 20  # compute buffers and the runner itself, as the scheduler's size estimate
WORKER_OVERHEAD = 128 << 20  # the least compute-buffer allowance of a worker
_BLOCK = re.compile(r"^blk\.(\d+)\.")


def gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n < 10 * GiB else f"{n / GiB:.1f} GiB"


@dataclass
class ModelShape:
    n_layers: int
    layer_bytes: list[int]  # weights of each repeating layer
    input_bytes: int  # token embeddings (always local)
    output_bytes: int  # output norm and projection (kept on this machine)
    kv_bytes_per_layer: int  # K and V of one layer for every sequence of the context
    n_embd: int = 0

    @property
    def compute_bytes(self) -> int:
        """Compute buffers of a node: about 16 activation tensors of a 512-token batch (f32)."""
        return 16 * 512 * self.n_embd * 4

    def layer_cost(self, i: int) -> int:
        return self.layer_bytes[i] + self.kv_bytes_per_layer

    @property
    def total(self) -> int:
        return sum(self.layer_cost(i) for i in range(self.n_layers)) + self.input_bytes + self.output_bytes


def model_shape(info, n_ctx: int, n_parallel: int) -> ModelShape:
    """The sizes that matter for a split, from a GGUF's tensor table (`gguf_info.GGUFInfo`)."""
    n_layers = int(info.arch_value("block_count", 0) or 0)
    n_embd = int(info.arch_value("embedding_length", 0) or 0)
    n_head = int(info.arch_value("attention.head_count", 1) or 1)
    n_head_kv = int(info.arch_value("attention.head_count_kv", n_head) or n_head)
    layer_bytes = [0] * n_layers
    input_bytes = output_bytes = 0
    names = {t.name for t in info.tensors}
    for tensor in info.tensors:
        match = _BLOCK.match(tensor.name)
        if match and int(match.group(1)) < n_layers:
            layer_bytes[int(match.group(1))] += tensor.n_bytes
        elif tensor.name.startswith("token_embd"):
            input_bytes += tensor.n_bytes
            if tensor.name == "token_embd.weight" and "output.weight" not in names:
                output_bytes += tensor.n_bytes  # tied embeddings: the output device gets its own copy
        else:
            output_bytes += tensor.n_bytes
    kv = n_ctx * max(1, n_parallel) * (n_embd // max(n_head, 1) * n_head_kv) * 2 * 2  # K and V, f16
    return ModelShape(n_layers, layer_bytes, input_bytes, output_bytes, kv, n_embd)


@dataclass
class Capacity:
    name: str  # "local" or the worker's address
    free: int  # bytes this node may use for the model
    devices: list[int] = field(default_factory=lambda: [1])  # relative free memory of each device (workers)
    local: bool = False


@dataclass
class Share:
    node: str
    first_layer: int
    n_layers: int
    bytes: int
    free: int
    output: bool = False

    def as_json(self) -> dict[str, Any]:
        last = self.first_layer + self.n_layers - 1
        return {
            "node": self.node,
            "layers": [self.first_layer, last] if self.n_layers else [],
            "n_layers": self.n_layers,
            "output": self.output,
            "bytes": self.bytes,
            "free": self.free,
        }


@dataclass
class Plan:
    shares: list[Share]
    n_gpu_layers: int  # what llama.cpp is given: the layers (and output) not kept on the local CPU
    tensor_split: list[float]  # one entry per registered RPC device, in registration order
    total_bytes: int

    @property
    def local_bytes(self) -> int:
        return sum(s.bytes for s in self.shares if s.node == "local")

    def as_json(self) -> dict[str, Any]:
        return {
            "nodes": [s.as_json() for s in self.shares],
            "n_gpu_layers": self.n_gpu_layers,
            "tensor_split": self.tensor_split,
            "total_bytes": self.total_bytes,
        }


def _fixed(node: Capacity, shape: ModelShape) -> int:
    if node.local:
        return shape.input_bytes + shape.output_bytes + max(LOCAL_OVERHEAD, shape.compute_bytes)
    return max(WORKER_OVERHEAD, shape.compute_bytes)


def plan_layers(shape: ModelShape, nodes: list[Capacity]) -> Plan:
    """Split `shape` over `nodes` (the local node first, if any, then workers); InsufficientMemory if it cannot."""
    if shape.n_layers <= 0:
        raise InsufficientMemory("the model has no repeating layers to split")
    workers = [n for n in nodes if not n.local]
    if not workers:
        raise InsufficientMemory("no usable worker to shard the model across")
    if len(workers) > shape.n_layers:
        raise InsufficientMemory(f"the model has {shape.n_layers} layers: too few for {len(workers)} workers")
    worst = max(shape.layer_cost(i) for i in range(shape.n_layers))
    room = [max(0, n.free - _fixed(n, shape)) for n in nodes]
    caps = [r // worst for r in room]
    free_total = sum(n.free for n in nodes)
    summary = ", ".join(f"{n.name} {gib(n.free)}" for n in nodes)
    if sum(caps) < shape.n_layers:
        needed = sum(shape.layer_cost(i) for i in range(shape.n_layers)) + sum(_fixed(n, shape) for n in nodes)
        raise InsufficientMemory(
            f"the model does not fit: it needs about {gib(needed)} (weights, KV cache for the context asked "
            f"and compute buffers), the nodes have {gib(free_total)} free ({summary})"
        )
    for node, cap in zip(nodes, caps, strict=True):
        if not node.local and cap < 1:
            raise InsufficientMemory(
                f"worker {node.name} has room for no layer ({gib(node.free)} free, a layer needs {gib(worst)})"
            )
    counts = _proportional(shape.n_layers, room, caps, [0 if n.local else 1 for n in nodes])
    shares: list[Share] = []
    first = 0
    for node, count in zip(nodes, counts, strict=True):
        used = sum(shape.layer_cost(i) for i in range(first, first + count)) + _fixed(node, shape)
        if used > node.free:  # only the local node's fixed part can get here (caps leave room for layers)
            raise InsufficientMemory(
                f"{node.name} cannot hold its share ({gib(used)}, embeddings and output included, "
                f"of {gib(node.free)} free)"
            )
        shares.append(Share(node.name, first, count, used, node.free, output=node.local))
        first += count
    local_layers = sum(s.n_layers for s, n in zip(shares, nodes, strict=True) if n.local)
    device_counts: list[int] = []
    for share, node in zip(shares, nodes, strict=True):
        if not node.local:
            device_counts += _proportional(share.n_layers, node.devices, [share.n_layers] * len(node.devices), None)
    remote = shape.n_layers - local_layers
    return Plan(shares, remote + 1, exact_split(device_counts, remote), sum(s.bytes for s in shares))


def _proportional(total: int, weights: list[int], caps: list[int], minimums: list[int] | None) -> list[int]:
    """Integers summing to `total`, near `weights`' proportions, within [minimum, cap] (largest remainder)."""
    minimums = minimums or [0] * len(weights)
    weight_sum = sum(weights) or 1
    exact = [total * w / weight_sum for w in weights]
    counts = [min(cap, max(low, int(x))) for x, cap, low in zip(exact, caps, minimums, strict=True)]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    while sum(counts) < total:
        spare = [i for i in order if counts[i] < caps[i]]
        if not spare:
            break
        best = max(spare, key=lambda i: (exact[i] - counts[i], caps[i] - counts[i]))
        counts[best] += 1
    while sum(counts) > total:
        over = [i for i in range(len(counts)) if counts[i] > minimums[i]]
        worst = max(over, key=lambda i: counts[i] - exact[i])
        counts[worst] -= 1
    return counts


def exact_split(device_counts: list[int], remote_layers: int) -> list[float]:
    """`tensor_split` values that make llama.cpp give device k exactly device_counts[k] layers (+ output last)."""
    split = [0.0] * len(device_counts)
    positive = [k for k, c in enumerate(device_counts) if c > 0]
    done, previous = 0, 0.0
    for k in positive:
        done += device_counts[k]
        boundary = 1.0 if k == positive[-1] else (done - 0.5) / (remote_layers + 1)
        split[k] = boundary - previous
        previous = boundary
    return split


def layers_by_device(split: list[float], n_layers: int, local_layers: int) -> list[int]:
    """What llama.cpp does with a split (its `load_tensors` rule), for checking plans: layers per device."""
    act = n_layers + 1 - local_layers
    total = sum(split)
    bounds, running = [], 0.0
    for value in split:
        running += value
        bounds.append(running / total)
    counts = [0] * len(split)
    for il in range(local_layers, n_layers + 1):
        position = (il - local_layers) / act
        device = next(k for k, b in enumerate(bounds) if b > position)
        if il < n_layers:
            counts[device] += 1
    return counts
