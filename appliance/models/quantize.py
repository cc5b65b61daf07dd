"""Re-quantizing a GGUF through llama.cpp's own quantizer (`llama_model_quantize`).

The quantizer runs in a child process (`python -m appliance.models.quantize SRC DST TYPE`) so that a
failure inside llama.cpp can never take the server down.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gguf import LlamaFileType

from appliance.errors import BadRequest

SOURCE_TYPES = ("F32", "F16", "BF16", "Q8_0")
# Already 4- or 5-bit: re-quantizing them works (llama.cpp's allow_requantize) but adds a second rounding,
# e.g. to bring the bundled Q4_1 model into a type whose kernels are faster on some CPU (Q4_0, Q4_K_M).
REQUANTIZE_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")


def target_file_type(name: str) -> int:
    """`q4_K_M` -> llama.cpp's file type number; raises BadRequest for unknown names."""
    wanted = name.strip().upper()
    for member in LlamaFileType:
        if member.name.removeprefix("MOSTLY_").removeprefix("ALL_") == wanted and member.name != "GUESSED":
            return int(member)
    choices = ", ".join(m.name.removeprefix("MOSTLY_").lower() for m in LlamaFileType if m.name.startswith("MOSTLY_"))
    raise BadRequest(f"unknown quantization type '{name}' (choose from {choices})")


def quantize_file(source: Path, target: Path, quantization: str, source_type: str, threads: int = 0) -> None:
    file_type = target_file_type(quantization)
    if source_type.upper() not in SOURCE_TYPES + REQUANTIZE_TYPES:
        raise BadRequest(f"only F32, F16, BF16, Q8_0 and 4/5/6-bit models can be quantized (this one is {source_type})")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "appliance.models.quantize",
            str(source),
            str(target),
            str(file_type),
            str(threads),
            "0" if source_type.upper() in ("F32", "F16", "BF16") else "1",
        ],
        capture_output=True,
        text=True,
        timeout=24 * 3600,
    )
    if result.returncode != 0 or not target.is_file():
        target.unlink(missing_ok=True)
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise BadRequest(f"quantization to {quantization} failed: {detail}")


def _main(argv: list[str]) -> int:
    import llama_cpp

    source, target, file_type, threads, requantize = argv
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(file_type)
    params.nthread = int(threads)
    params.allow_requantize = requantize == "1"
    status = llama_cpp.llama_model_quantize(source.encode(), target.encode(), params)
    if status != 0:
        print(f"llama_model_quantize returned {status}", file=sys.stderr)
    return 0 if status == 0 else 1


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
