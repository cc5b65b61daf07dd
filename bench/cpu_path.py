"""CPU path benchmark: llama.cpp tokens/s with its extra CPU buffer types (weight repacking) on versus off.

    .venv/bin/python bench/cpu_path.py --models MODEL.gguf [MODEL.gguf ...] [--requantize q4_0 q4_k_m q8_0]
                                       [--runs 3] [--threads 2]

llama.cpp can load weights into "extra" CPU buffer types that repack them for faster kernels (Q4_0, Q4_K,
IQ4_NL, Q8_0 ... on AVX2/AVX-512/NEON, and the AMX buffer where built in). The appliance turns them off
(`use_extra_bufts = False`) on CPUs with AMX_INT8, because the AMX repack crashes (llama.cpp #20824); this
measures what that costs on this machine.

For each model and each setting (extra buffers on, off), each run is a fresh child process (a crash loses
only that run, and nothing of one load leaks into the next; runs alternate between models and settings so
that drift in the machine's load hits all alike). A run loads the model (n_ctx 2048, --threads threads),
evaluates a warm-up, then times:

- prompt processing: one `Llama.eval` of a 512-token prompt (fixed English text, repeated), tokens/s;
- generation: 64 greedy tokens after that prompt, one `Llama.eval` per token, tokens/s.

The table shows the median of --runs runs, the best run (which is what a busy machine disturbs least),
the median tokens per CPU-second of the child (process time; with --threads 1 it hardly depends on what
else the machine runs, while with more threads it counts OpenMP's spinning too), and in its note how many
MiB llama.cpp put in the repack buffer (from its load log), whether a child crashed, and whether the
greedy tokens differ between on and off. On a shared machine prefer --threads 1: with 2 threads on 2 busy
cores, OpenMP's barriers wait on descheduled threads and runs vary tenfold.
--requantize also measures copies of each model re-quantized (allow_requantize) with the project's
quantizer into a temporary directory.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT_TOKENS = 512
GEN_TOKENS = 64
N_CTX = 2048
TEXT = (
    "The lighthouse stood at the end of a long spit of rock, and every evening the keeper climbed its ninety "
    "steps to light the lamp. Ships passed in the dark: fishing boats heading home, freighters bound for the "
    "southern ports, and now and then a sailing yacht whose crew waved at the tower as if it could wave back. "
)
REPACK_LOG = re.compile(r"CPU_REPACK model buffer size\s*=\s*([0-9.]+) MiB")


def child(model: str, extra: bool, threads: int) -> dict:
    """One run in this process: load, warm up, time prompt processing and generation."""
    import llama_cpp
    import numpy as np

    from appliance.inference.cpu_path import model_params_with_extra_buffers

    log: list[str] = []

    @llama_cpp.llama_log_callback
    def keep(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        log.append(text.decode(errors="replace"))

    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    with model_params_with_extra_buffers(extra):
        llm = llama_cpp.Llama(model_path=model, n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads, verbose=False)
    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))  # Llama may have installed its own
    text_tokens = llm.tokenize(TEXT.encode(), add_bos=False)
    prompt = (text_tokens * (PROMPT_TOKENS // len(text_tokens) + 1))[:PROMPT_TOKENS]
    n_vocab = llm.n_vocab()

    def next_token() -> int:
        logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.ctypeslib.as_array(logits, shape=(n_vocab,)).argmax())

    llm.reset()
    llm.eval(prompt[:32])  # warm-up: first-use allocations, caches
    llm.reset()
    start, cpu = time.perf_counter(), time.process_time()
    llm.eval(prompt)
    prompt_s, prompt_cpu = time.perf_counter() - start, time.process_time() - cpu
    generated = []
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(GEN_TOKENS):
        token = next_token()
        generated.append(token)
        llm.eval([token])
    gen_s, gen_cpu = time.perf_counter() - start, time.process_time() - cpu
    llm.close()
    llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, ctypes.c_void_p(0))  # before `keep` goes
    repack = [float(m) for m in REPACK_LOG.findall("".join(log))]
    return {
        "prompt_tps": PROMPT_TOKENS / prompt_s,
        "gen_tps": GEN_TOKENS / gen_s,
        "prompt_cpu_tps": PROMPT_TOKENS / prompt_cpu,
        "gen_cpu_tps": GEN_TOKENS / gen_cpu,
        "repack_mib": sum(repack),
        "tokens": generated,
    }


def measure(model: Path, extra: bool, threads: int) -> dict:
    """One run in a fresh child process; {"error": ...} if it died or failed."""
    cmd = [sys.executable, __file__, "--child", str(model), "on" if extra else "off", "--threads", str(threads)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    if done.returncode < 0:
        return {"error": f"crashed: {signal.Signals(-done.returncode).name}"}
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"failed ({done.returncode}): {tail[:120]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def requantize(source: Path, quant: str, directory: Path) -> Path:
    """`source` re-quantized to `quant` by the project's quantizer (allow_requantize on)."""
    from appliance.models.quantize import target_file_type

    target = directory / f"{source.stem}.{quant.upper()}.gguf"
    cmd = [sys.executable, "-m", "appliance.models.quantize", str(source), str(target)]
    subprocess.run([*cmd, str(target_file_type(quant)), "0", "1"], check=True, capture_output=True, timeout=3600)
    return target


def quant_name(path: Path) -> str:
    from gguf import GGUFReader, LlamaFileType

    field = GGUFReader(str(path)).fields.get("general.file_type")
    if field is None:
        return "?"
    return LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_").removeprefix("ALL_")


def cell(results: list[dict], key: str, pick=statistics.median) -> str:
    values = [r[key] for r in results if "error" not in r]
    return f"{pick(values):.1f}" if values else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", type=Path, default=[])
    parser.add_argument("--requantize", nargs="*", default=[], help="also measure copies in these types, e.g. q4_0")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "ON_OFF"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1] == "on", args.threads)))
        return 0

    from appliance.inference import cpu_path

    info = cpu_path.system_info().strip()
    print(f"llama.cpp system info: `{info}`\n")
    print(f"AMX_INT8: {'yes' if 'AMX_INT8' in cpu_path.features(info) else 'no'}\n")
    with tempfile.TemporaryDirectory(prefix="cpu-path-") as scratch:
        labels: dict[Path, str] = {}  # a re-quantized copy is shown under its source's file name
        for model in args.models:
            labels[model] = model.name
            labels |= {requantize(model, quant, Path(scratch)): model.name for quant in args.requantize}
        models = list(labels)
        results: dict[tuple[Path, bool], list[dict]] = {(m, e): [] for m in models for e in (True, False)}
        for run in range(args.runs):
            for model in models:
                for extra in (True, False) if run % 2 == 0 else (False, True):
                    result = measure(model, extra, args.threads)
                    results[model, extra].append(result)
                    shown = result.get("error") or f"{result['prompt_tps']:.1f} / {result['gen_tps']:.1f} tok/s"
                    print(f"run {run + 1} {model.name} {'on' if extra else 'off'}: {shown}", file=sys.stderr)
        header = (
            "| model | quant | extra buffers | prompt tok/s | gen tok/s | prompt best | gen best | prompt tok/CPU-s"
        )
        print(header + " | gen tok/CPU-s | note |")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
        for model in models:
            name, quant = labels[model], quant_name(model)
            off_tokens = {tuple(r["tokens"]) for r in results[model, False] if "error" not in r}
            for extra in (True, False):
                runs = results[model, extra]
                notes = sorted({r["error"] for r in runs if "error" in r})
                ok = [r for r in runs if "error" not in r]
                if ok and max(r["repack_mib"] for r in ok):
                    notes.append(f"repacked {max(r['repack_mib'] for r in ok):.1f} MiB")
                if extra and off_tokens and {tuple(r["tokens"]) for r in ok} - off_tokens:
                    notes.append("greedy tokens differ from off")
                if len(ok) != len(runs):
                    notes.append(f"{len(ok)}/{len(runs)} runs ok")
                row = [name, quant, "on" if extra else "off", cell(runs, "prompt_tps"), cell(runs, "gen_tps")]
                row += [cell(runs, "prompt_tps", max), cell(runs, "gen_tps", max)]
                row += [cell(runs, "prompt_cpu_tps"), cell(runs, "gen_cpu_tps")]
                print("| " + " | ".join([*row, "; ".join(notes)]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
