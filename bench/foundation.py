"""Foundation benchmark: what the server costs over calling the engines directly, on this machine.

    .venv/bin/python bench/foundation.py [--runs 3] [--tokens 128] [--texts 512]

Generates a 0.7B-shaped Q8_0 GGUF (random weights; throughput does not depend on their values), then
measures in one run, on the same machine:
  * streaming generation tokens/s through /api/chat vs llama-cpp-python `create_completion(stream=True)`
    in-process, with the same prompt, sampling options, thread count and context size;
  * time to first token through the server vs in-process (the overhead is the difference);
  * /api/embed texts/s (batches of 64) vs sentence-transformers `encode` in-process on the same texts.
Prints a table and writes bench/out/foundation.json. Record results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.embeddings import bundled_model_path  # noqa: E402
from appliance.inference.hardware import detect  # noqa: E402
from appliance.models.synthetic_gguf import BENCH_0_7B, CHATML_TEMPLATE, write_gguf  # noqa: E402
from appliance.models.template import render_chat  # noqa: E402

N_CTX = 2048
SENTENCE = "The retention period for adult medical records is ten years after the last episode of care. "


def prompt_text(run: int) -> str:
    """About 128 prompt tokens with the chat template (the synthetic vocabulary is nearly one token per byte)."""
    return f"Question {run:>2}: {SENTENCE}"


def sampling(seed: int) -> dict:
    return {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "repeat_penalty": 1.1, "seed": seed}


def bench_direct_generation(model: Path, threads: int, runs: int, tokens: int) -> list[dict]:
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(model),
        n_ctx=N_CTX,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        n_gpu_layers=0,
        verbose=False,
    )
    results = []
    for run in range(-1, runs):  # run -1 warms up
        prompt = render_chat(CHATML_TEMPLATE, [{"role": "user", "content": prompt_text(run)}])
        options = sampling(run + 100)
        started = time.perf_counter()
        stamps = []
        for _chunk in llm.create_completion(
            prompt,
            max_tokens=tokens,
            stream=True,
            temperature=options["temperature"],
            top_k=options["top_k"],
            top_p=options["top_p"],
            repeat_penalty=options["repeat_penalty"],
            seed=options["seed"],
        ):
            stamps.append(time.perf_counter())
        if run >= 0:
            results.append(
                {
                    "ttft_s": stamps[0] - started,
                    "tokens": len(stamps),
                    "tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
                }
            )
    del llm
    gc.collect()
    return results


def bench_server_generation(url: str, headers: dict, runs: int, tokens: int) -> list[dict]:
    results = []
    with httpx.Client(base_url=url, headers=headers, timeout=600) as client:
        for run in range(-1, runs):
            body = {
                "model": "bench",
                "messages": [{"role": "user", "content": prompt_text(run)}],
                "options": {**sampling(run + 100), "num_predict": tokens, "num_ctx": N_CTX},
            }
            started = time.perf_counter()
            stamps, final = [], {}
            with client.stream("POST", "/api/chat", json=body) as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    item = json.loads(line)
                    if item.get("done"):
                        final = item
                    elif item.get("message", {}).get("content"):
                        stamps.append(time.perf_counter())
            if run >= 0:
                results.append(
                    {
                        "ttft_s": stamps[0] - started,
                        "tokens": final["eval_count"],
                        "tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
                        "server_reported_tokens_per_s": final["eval_count"] / final["eval_duration"] * 1e9,
                    }
                )
    return results


def embedding_texts(count: int) -> list[str]:
    topics = ["discharge summary", "consent form", "lease agreement", "retention schedule", "incident report"]
    return [f"Document {i}: {topics[i % len(topics)]} section {i % 17} about {SENTENCE.lower()}" for i in range(count)]


def bench_direct_embeddings(texts: list[str], batch: int) -> float:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(bundled_model_path()), device="cpu", local_files_only=True)
    model.encode(texts[:batch], batch_size=batch, normalize_embeddings=True)
    started = time.perf_counter()
    for i in range(0, len(texts), batch):
        model.encode(texts[i : i + batch], batch_size=batch, normalize_embeddings=True, show_progress_bar=False)
    elapsed = time.perf_counter() - started
    del model
    gc.collect()
    return len(texts) / elapsed


def bench_server_embeddings(url: str, headers: dict, texts: list[str], batch: int) -> float:
    with httpx.Client(base_url=url, headers=headers, timeout=600) as client:
        client.post("/api/embed", json={"model": "all-minilm", "input": texts[:batch]}).raise_for_status()
        started = time.perf_counter()
        for i in range(0, len(texts), batch):
            client.post("/api/embed", json={"model": "all-minilm", "input": texts[i : i + batch]}).raise_for_status()
        return len(texts) / (time.perf_counter() - started)


def start_server(home: Path, model: Path, threads: int) -> tuple[subprocess.Popen, str, dict]:
    appliance = str(Path(sys.executable).with_name("appliance"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update(APPLIANCE_HOME=str(home), APPLIANCE_NUM_THREAD=str(threads), HF_HUB_OFFLINE="1")
    subprocess.run([appliance, "users", "add", "bench", "--role", "admin"], env=env, check=True, capture_output=True)
    key = subprocess.run(
        [appliance, "keys", "create", "--user", "bench"], env=env, check=True, capture_output=True, text=True
    ).stdout.strip()
    subprocess.run([appliance, "create", "bench", "--from", str(model)], env=env, check=True, capture_output=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env["APPLIANCE_PORT"] = str(port)
    process = subprocess.Popen([appliance, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/api/version", timeout=1).status_code == 200:
                return process, url, {"Authorization": f"Bearer {key}"}
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("server did not start")


def median(rows: list[dict], key: str) -> float:
    return statistics.median(row[key] for row in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    hardware = detect()
    threads = hardware.physical_cores
    model = args.out / "bench-0.7b-q8_0.gguf"
    if not model.exists():
        print("writing the 0.7B-shaped Q8_0 benchmark model ...", flush=True)
        write_gguf(model, BENCH_0_7B, quant="q8_0", seed=0, name="bench-0.7b")
    texts = embedding_texts(args.texts)

    print("measuring llama-cpp-python and sentence-transformers in-process ...", flush=True)
    direct_gen = bench_direct_generation(model, threads, args.runs, args.tokens)
    direct_embed = bench_direct_embeddings(texts, args.batch)

    print("measuring the same through the server ...", flush=True)
    home = Path(tempfile.mkdtemp(prefix="appliance-bench-"))
    process, url, headers = start_server(home, model, threads)
    try:
        server_gen = bench_server_generation(url, headers, args.runs, args.tokens)
        server_embed = bench_server_embeddings(url, headers, texts, args.batch)
    finally:
        process.terminate()
        process.wait(30)
        shutil.rmtree(home, ignore_errors=True)

    direct_tps, server_tps = median(direct_gen, "tokens_per_s"), median(server_gen, "tokens_per_s")
    direct_ttft, server_ttft = median(direct_gen, "ttft_s"), median(server_gen, "ttft_s")
    rows = [
        (
            "generation tokens/s (streaming)",
            f"{direct_tps:.1f}",
            f"{server_tps:.1f}",
            f"{server_tps / direct_tps:.3f}",
            ">= 0.95",
        ),
        (
            "time to first token (ms)",
            f"{direct_ttft * 1000:.0f}",
            f"{server_ttft * 1000:.0f}",
            f"+{(server_ttft - direct_ttft) * 1000:.0f} ms",
            "small",
        ),
        (
            f"embeddings texts/s (batches of {args.batch})",
            f"{direct_embed:.0f}",
            f"{server_embed:.0f}",
            f"{server_embed / direct_embed:.3f}",
            ">= 0.95",
        ),
    ]
    machine = (
        f"{platform.machine()}, {hardware.physical_cores} cores, {hardware.total_memory / 2**30:.0f} GiB, "
        f"{'GPU' if hardware.has_gpu else 'CPU only'}, Python {platform.python_version()}"
    )
    print(f"\nMachine: {machine}; {args.runs} runs (median), {args.tokens} tokens, {threads} threads\n")
    header = ("metric", "direct (baseline)", "via server", "server / direct", "goal")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    (args.out / "foundation.json").write_text(
        json.dumps(
            {
                "machine": machine,
                "threads": threads,
                "runs": args.runs,
                "tokens": args.tokens,
                "direct_generation": direct_gen,
                "server_generation": server_gen,
                "direct_embeddings_texts_per_s": direct_embed,
                "server_embeddings_texts_per_s": server_embed,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
