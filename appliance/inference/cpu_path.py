"""Which CPU code path llama.cpp takes here, and the switch that keeps it from crashing on AMX CPUs.

llama.cpp can place weights in "extra" CPU buffer types that repack them for faster kernels: the AMX
buffer (built in when the compiler targets a CPU with AMX_INT8, i.e. Xeon Sapphire Rapids and later)
and the generic repack buffer (Q4_0, Q4_K, IQ4_NL, Q8_0 ... interleaved for AVX2/AVX-512/NEON). The AMX
one segfaults at the first decode of real quantized models (upstream llama.cpp #20824, Ollama #17006).
`llama_model_params.use_extra_bufts = False` avoids it, at the price of the generic repack too, so the
default (`auto`) turns extra buffers off only where this build reports AMX_INT8.

The RPC worker (`appliance worker`) is not concerned: ggml's RPC server allocates every tensor in the
device's default buffer type, never an extra one. The quantizer only reads and writes tensors.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

ExtraBuffers = Literal["auto", "on", "off"]
_FEATURE = re.compile(r"([A-Z0-9_]+) = 1")

LIKELY_AMX_CRASH = (
    "this build of llama.cpp uses AMX, whose weight-repacking buffers crash at the first decode "
    "(llama.cpp #20824): set APPLIANCE_CPU_EXTRA_BUFFERS=off (or auto) and retry"
)


def system_info() -> str:
    """llama.cpp's own system line (`CPU : SSE3 = 1 | AVX2 = 1 | AMX_INT8 = 1 | ...`) for this build."""
    import llama_cpp  # only where llama.cpp is used: runners, doctor, benchmarks

    return llama_cpp.llama_print_system_info().decode(errors="replace")


def features(info: str | None = None) -> set[str]:
    """The CPU features this build of llama.cpp was compiled for and found (`AVX2`, `AMX_INT8`, ...)."""
    return set(_FEATURE.findall(system_info() if info is None else info))


def extra_buffers_enabled(setting: ExtraBuffers, found: set[str] | None = None) -> bool:
    """Whether models are loaded with llama.cpp's extra (repacking) CPU buffer types."""
    if setting == "on":
        return True
    if setting == "off":
        return False
    return "AMX_INT8" not in (features() if found is None else found)


@dataclass(frozen=True)
class CpuPath:
    """What `appliance doctor` and `/api/ps` report about the CPU path."""

    features: tuple[str, ...]
    amx: bool
    extra_buffers: bool
    setting: str

    def describe(self) -> str:
        simd = [f for f in ("AVX512", "AVX2", "AVX", "NEON", "SVE") if f in self.features][:1] or ["no SIMD"]
        parts = [f"llama.cpp CPU path: {simd[0]}"]
        parts.append("AMX built in" if self.amx else "no AMX")
        if self.extra_buffers:
            parts.append("weight repacking on")
        elif self.amx and self.setting == "auto":
            parts.append("extra buffers off (AMX repack crash avoided; generic repack off too)")
        else:
            parts.append(f"extra buffers off (APPLIANCE_CPU_EXTRA_BUFFERS={self.setting})")
        return ", ".join(parts)


def current(setting: ExtraBuffers) -> CpuPath:
    found = features()
    return CpuPath(tuple(sorted(found)), "AMX_INT8" in found, extra_buffers_enabled(setting, found), setting)


@contextmanager
def model_params_with_extra_buffers(enabled: bool) -> Iterator[None]:
    """Make `llama_cpp.Llama(...)` load with `use_extra_bufts = enabled` (it has no argument for it).

    `Llama.__init__` takes its defaults from `llama_cpp.llama_cpp.llama_model_default_params()` at call
    time, so that function is wrapped for the duration of the load; runners are single-model processes.
    """
    import llama_cpp.llama_cpp as bindings

    original = bindings.llama_model_default_params

    def with_switch():
        params = original()
        params.use_extra_bufts = enabled
        return params

    bindings.llama_model_default_params = with_switch
    try:
        yield
    finally:
        bindings.llama_model_default_params = original
