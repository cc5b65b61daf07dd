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

from appliance.inference.hardware import detect  # noqa: E402
from appliance.models.synthetic_gguf import BENCH_0_7B, CHATML_TEMPLATE, write_gguf  # noqa: E402
from appliance.models.template import render_chat  # noqa: E402
from appliance.retrieval.embeddings import bundled_model_path  # noqa: E402

N_CTX = 2048
SENTENCE = "The retention period for adult medical records is ten years after the last episode of care. "


def prompt_text(run: int) -> str:
    """About 128 prompt tokens with the chat template (the synthetic vocabulary is nearly one token per byte)."""
    return f"Question {run:>2}: {SENTENCE}"


def sampling(seed: int) -> dict:
    return {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "repeat_penalty": 1.1, "seed": seed}


class DirectGeneration:
    """llama-cpp-python in this process: the baseline the server is compared with."""

    def __init__(self, model: Path, threads: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(
            model_path=str(model),
            n_ctx=N_CTX,
            n_batch=512,
            n_threads=threads,
            n_threads_batch=threads,
            n_gpu_layers=0,
            verbose=False,
        )

    def run(self, run: int, tokens: int) -> dict:
        prompt = render_chat(CHATML_TEMPLATE, [{"role": "user", "content": prompt_text(run)}])
        options = sampling(run + 100)
        started = time.perf_counter()
        stamps = []
        for chunk in self.llm.create_completion(
            prompt,
            max_tokens=tokens,
            stream=True,
            temperature=options["temperature"],
            top_k=options["top_k"],
            top_p=options["top_p"],
            repeat_penalty=options["repeat_penalty"],
            seed=options["seed"],
        ):
            if chunk["choices"][0]["text"]:  # visible text only, as the server streams it
                stamps.append(time.perf_counter())
        return {
            "ttft_s": stamps[0] - started,
            "tokens": len(stamps),
            "tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
        }


def server_generation(client: httpx.Client, run: int, tokens: int) -> dict:
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
    return {
        "ttft_s": stamps[0] - started,
        "tokens": final["eval_count"],
        "prompt_tokens": final["prompt_eval_count"],
        "tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
        "server_reported_tokens_per_s": final["eval_count"] / final["eval_duration"] * 1e9,
    }


def embedding_texts(count: int) -> list[str]:
    topics = ["discharge summary", "consent form", "lease agreement", "retention schedule", "incident report"]
    return [f"Document {i}: {topics[i % len(topics)]} section {i % 17} about {SENTENCE.lower()}" for i in range(count)]


def embeddings_round(model, client: httpx.Client, texts: list[str], batch: int) -> tuple[float, float]:
    """texts/s in-process and through /api/embed, alternating batch by batch so both see the same machine."""
    direct_s = server_s = 0.0
    for i in range(0, len(texts), batch):
        chunk = texts[i : i + batch]
        started = time.perf_counter()
        model.encode(chunk, batch_size=batch, normalize_embeddings=True, show_progress_bar=False)
        direct_s += time.perf_counter() - started
        started = time.perf_counter()
        client.post("/api/embed", json={"model": "all-minilm", "input": chunk}).raise_for_status()
        server_s += time.perf_counter() - started
    return len(texts) / direct_s, len(texts) / server_s


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

    # Both sides stay loaded and runs alternate (direct, server, direct, ...; embeddings batch by batch),
    # so that drift in a shared machine's speed affects both alike; medians are reported.
    print("loading the model in-process and in the server ...", flush=True)
    home = Path(tempfile.mkdtemp(prefix="appliance-bench-"))
    process, url, headers = start_server(home, model, threads)
    try:
        direct = DirectGeneration(model, threads)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        embedder = SentenceTransformer(str(bundled_model_path()), device="cpu", local_files_only=True)
        with httpx.Client(base_url=url, headers=headers, timeout=600) as client:
            direct.run(-1, 8)
            server_generation(client, -1, 8)
            embeddings_round(embedder, client, texts[: args.batch], args.batch)
            direct_gen, server_gen, direct_embed, server_embed = [], [], [], []
            for run in range(args.runs):
                print(f"run {run + 1}/{args.runs}", flush=True)
                direct_gen.append(direct.run(run, args.tokens))
                server_gen.append(server_generation(client, run, args.tokens))
                direct_rate, server_rate = embeddings_round(embedder, client, texts, args.batch)
                direct_embed.append(direct_rate)
                server_embed.append(server_rate)
    finally:
        process.terminate()
        process.wait(30)
        shutil.rmtree(home, ignore_errors=True)

    direct_tps, server_tps = median(direct_gen, "tokens_per_s"), median(server_gen, "tokens_per_s")
    direct_ttft, server_ttft = median(direct_gen, "ttft_s"), median(server_gen, "ttft_s")
    direct_embed_tps, server_embed_tps = statistics.median(direct_embed), statistics.median(server_embed)
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
            f"{(server_ttft - direct_ttft) * 1000:+.0f} ms",
            "small",
        ),
        (
            f"embeddings texts/s (batches of {args.batch})",
            f"{direct_embed_tps:.0f}",
            f"{server_embed_tps:.0f}",
            f"{server_embed_tps / direct_embed_tps:.3f}",
            ">= 0.95",
        ),
    ]
    machine = (
        f"{platform.machine()}, {hardware.physical_cores} cores, {hardware.total_memory / 2**30:.0f} GiB, "
        f"{'GPU' if hardware.has_gpu else 'CPU only'}, Python {platform.python_version()}"
    )
    prompt_tokens = server_gen[0]["prompt_tokens"]
    print(
        f"\nMachine: {machine}; {args.runs} runs (median), {prompt_tokens}-token prompts, {args.tokens} generated "
        f"tokens, {threads} threads\n"
    )
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
