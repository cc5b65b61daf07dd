"""What this machine offers a runner: CPU cores, memory, and CUDA devices when llama.cpp can use them."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass, field

import psutil

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hardware:
    physical_cores: int
    total_memory: int
    available_memory: int
    gpu_free_memory: list[int] = field(default_factory=list)  # bytes per CUDA device

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpu_free_memory)


def _usable_cores() -> int:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or usable
    return max(1, min(usable, physical))


def _cuda_free_memory() -> list[int]:
    """Free memory per NVIDIA GPU, only when the llama.cpp build can offload to a GPU."""
    try:
        import llama_cpp

        if not llama_cpp.llama_supports_gpu_offload():
            return []
    except Exception:
        return []
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return [int(line.strip()) * 1024 * 1024 for line in out.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.warning("could not query GPU memory: %s", exc)
        return []


def detect() -> Hardware:
    memory = psutil.virtual_memory()
    return Hardware(
        physical_cores=_usable_cores(),
        total_memory=memory.total,
        available_memory=memory.available,
        gpu_free_memory=_cuda_free_memory(),
    )


def gpu_layers_for(hardware: Hardware, model_bytes: int, n_layers: int, requested: int) -> int:
    """Layers to offload: the request's/setting's number, else as many as fit in free GPU memory."""
    if requested >= 0:
        return requested
    if not hardware.has_gpu or n_layers <= 0:
        return 0
    usable = int(max(hardware.gpu_free_memory) * 0.9) - 512 * 1024 * 1024  # headroom for KV cache/scratch
    if usable >= model_bytes:
        return n_layers + 1  # every layer plus the output layer
    return max(0, int(n_layers * usable / max(model_bytes, 1)))
