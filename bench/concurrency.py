"""Concurrency benchmark ("Many users at once"): many streaming clients through /api/chat vs llama_cpp.server.

    .venv/bin/pip install sse-starlette starlette-context   # once: llama_cpp.server's extras (benchmark only)
    .venv/bin/python bench/concurrency.py [--levels 1,4,8,16] [--requests 32] [--parallel 16]
        [--gguf bench/out/bench-0.7b-q8_0.gguf] [--batched-bench /path/to/llama-batched-bench]
    .venv/bin/python bench/concurrency.py --batched-bench /path/to/llama-batched-bench --batched-bench-only

Generates (or reuses, `--gguf`) the 0.7B-shaped Q8_0 GGUF with random weights (throughput does not depend on
their values) and serves it twice, on the same machine, with the same context per sequence and thread count:
  * ours: `appliance serve` in a temporary APPLIANCE_HOME with the file imported as model `bench`,
    APPLIANCE_NUM_PARALLEL = `--parallel` (default: the largest level), per-user rate limit off;
  * the baseline: `python -m llama_cpp.server --model FILE` (one request at a time), with
    `--interrupt_requests false` so that a new request waits instead of cutting off the running stream,
    and `--logits_all false` (its default computes the logits of every prompt token; our runner does not).
At each level of N concurrent clients (1, 4, 8, 16), N clients send streaming chat requests back to back:
each client does max(2, ceil(requests / N)) requests (default 32 per level: 32 x 1, 8 x 4, 4 x 8, 2 x 16).
The baseline and ours take turns level by level, with the same prompts and seeds. Each request has a distinct
prompt of exactly `--prompt-tokens` (128) tokens after the chat template (counted with the model's own
vocabulary) and asks for `--tokens` (64) tokens, with the same sampling on both sides (temperature 0.8,
top_k 40, top_p 0.9, min_p 0, repeat_penalty 1.1, seed per request). Neither API can ignore end-of-sequence,
so the script counts requests that ended short of 64 tokens (random weights rarely end early).

Per request: time to first token (the first chunk with content), tokens generated (ours: eval_count of the
final line; baseline: 64 when finish_reason is "length", else the content chunks received) and whether the
stream ended properly (ours: a final `done` line; baseline: a chunk with a finish_reason) -- one that did not,
or failed, is counted as cut off. Per level: aggregate generated tokens/s = all tokens generated / wall time
from the first request sent to the last stream ended; p95 time to first token over all requests.

`--batched-bench PATH` also runs llama.cpp's own `llama-batched-bench` on the same file (-npp 128 -ntg 64
-npl <levels>, same threads, -fa off as llama-cpp-python): the ceiling of batched over serial throughput. Its
"S vs 1" (equal to generated tokens over its whole time, B x TG / T, against B = 1) is the figure to hold our
"ours / baseline" tokens/s against. It runs all prompts, then all generation; a server that mixes new prompts
into running generation steps can come out slightly above it. Build it outside the repo from the llama.cpp
vendored in the llama-cpp-python sdist:
    pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d /tmp/lcp; tar xzf ... ; cd ...
    cmake -S vendor/llama.cpp -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF
    cmake --build build --target llama-batched-bench -j2        # -> build/bin/llama-batched-bench
Prints a table and writes bench/out/concurrency.json (server logs: bench/out/concurrency-*.log).
The default run takes about 14 minutes on 2 cores (about 8 of them the baseline).
Record results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.inference.hardware import detect  # noqa: E402
from appliance.models.synthetic_gguf import BENCH_0_7B, write_gguf  # noqa: E402
from appliance.models.template import render_chat  # noqa: E402

MODEL_NAME = "bench"
FILLER = (
    "The retention period for adult medical records is ten years after the last episode of care. "
    "A lease may be terminated by either party with three months of written notice. "
    "Consent forms are kept with the discharge summary and reviewed by the records officer each quarter. "
    "An incident report names the ward, the time, the people present and the immediate actions taken. "
    "Invoices for legal services are itemised by matter, by fee earner and by the hour. "
)
SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0, "repeat_penalty": 1.1}
console = Console(width=None if sys.stdout.isatty() else 200)


# --- prompts -----------------------------------------------------------------------------------------------
class PromptMaker:
    """Distinct user messages whose chat-templated prompt is exactly `target` tokens in the model's vocabulary."""

    def __init__(self, model: Path, target: int):
        import llama_cpp

        self.vocab = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
        metadata = self.vocab.metadata
        self.template = metadata.get("tokenizer.chat_template")
        self.add_bos = str(metadata.get("tokenizer.ggml.add_bos_token", "true")).lower() == "true"
        self.bos = self._token_text(metadata.get("tokenizer.ggml.bos_token_id"))
        self.eos = self._token_text(metadata.get("tokenizer.ggml.eos_token_id"))
        self.target = target

    def _token_text(self, token_id: str | None) -> str:
        if token_id is None:
            return ""
        return self.vocab.detokenize([int(token_id)], special=True).decode("utf-8", errors="replace")

    def count(self, content: str) -> int:
        prompt = render_chat(
            self.template, [{"role": "user", "content": content}], bos_token=self.bos, eos_token=self.eos
        )
        return len(self.vocab.tokenize(prompt.encode(), add_bos=self.add_bos, special=True))

    def message(self, uid: int) -> tuple[str, int]:
        """The message for request `uid` and its prompt's token count (the target unless the vocabulary
        cannot hit it exactly)."""
        sentences = [sentence.strip().rstrip(".") for sentence in FILLER.split(". ") if sentence.strip()]
        turn = uid % len(sentences)
        text = ". ".join(sentences[turn:] + sentences[:turn]) + ". "
        # A label that differs from the previous request's in its first character: no prompt shares more than
        # the template's opening with the one before it (llama.cpp reuses a cached prefix).
        source = f"{(uid * 7919) % 100_000:05d}. " + text * (1 + 8 * self.target // len(text))
        length = self.target
        for _ in range(6):  # close in proportionally, then one character at a time
            tokens = self.count(source[:length])
            if tokens == self.target:
                return source[:length], tokens
            length = max(1, length + (self.target - tokens))
        while length > 1 and self.count(source[:length]) > self.target:
            length -= 1
        while self.count(source[: length + 1]) <= self.target:
            length += 1
        tokens = self.count(source[:length])
        if tokens > self.target:
            raise SystemExit(f"cannot build a {self.target}-token prompt: the chat template alone is longer")
        return source[:length], tokens


# --- one request ---------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    side: str
    clients: int
    uid: int
    ttft_s: float | None = None  # first chunk with content
    total_s: float = 0.0
    tokens: int = 0  # generated tokens
    finished: bool = False  # the stream ended with its final event
    finish_reason: str | None = None
    prompt_tokens: int | None = None  # as reported by the server (ours only)
    error: str | None = None

    @property
    def cut_off(self) -> bool:
        return not self.finished

    def short(self, wanted: int) -> bool:
        return self.finished and self.tokens < wanted


async def ours_request(client: httpx.AsyncClient, outcome: Outcome, content: str, seed: int, args) -> None:
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": content}],
        "stream": True,
        "keep_alive": -1,
        "options": {**SAMPLING, "seed": seed, "num_predict": args.tokens, "num_ctx": args.ctx},
    }
    started = time.perf_counter()
    chunks = 0
    try:
        async with client.stream("POST", "/api/chat", json=body) as response:
            if response.status_code != 200:
                outcome.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                item = json.loads(line)
                if "error" in item:
                    outcome.error = str(item["error"])[:200]
                    break
                if item.get("done"):
                    outcome.finished = True
                    outcome.finish_reason = item.get("done_reason")
                    outcome.tokens = int(item.get("eval_count", chunks))
                    outcome.prompt_tokens = item.get("prompt_eval_count")
                    break
                if item.get("message", {}).get("content"):
                    chunks += 1
                    if outcome.ttft_s is None:
                        outcome.ttft_s = time.perf_counter() - started
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        outcome.total_s = time.perf_counter() - started
        if not outcome.finished:
            outcome.tokens = chunks


async def baseline_request(client: httpx.AsyncClient, outcome: Outcome, content: str, seed: int, args) -> None:
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": content}],
        "stream": True,
        "max_tokens": args.tokens,
        "seed": seed,
        **SAMPLING,
    }
    started = time.perf_counter()
    chunks = 0
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                outcome.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators and ": ping" comments
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                item = json.loads(data)
                choice = (item.get("choices") or [{}])[0]
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    if outcome.ttft_s is None:
                        outcome.ttft_s = time.perf_counter() - started
                if choice.get("finish_reason"):
                    outcome.finished = True
                    outcome.finish_reason = choice["finish_reason"]
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        outcome.total_s = time.perf_counter() - started
        # "length" means max_tokens were generated; a chunk can carry several tokens' text (held-back UTF-8).
        outcome.tokens = args.tokens if outcome.finish_reason == "length" else chunks


# --- one level -----------------------------------------------------------------------------------------------
def p95(values: list[float]) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[94]


async def run_level(side: str, url: str, headers: dict, clients: int, work: list[list[tuple]], args) -> dict:
    """`clients` clients, each sending its list of (uid, content, seed) back to back."""
    request = ours_request if side == "ours" else baseline_request
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    timeout = httpx.Timeout(args.request_timeout, connect=30)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, limits=limits) as client:

        async def one_client(jobs: list[tuple]) -> None:
            for uid, content, seed in jobs:
                outcome = Outcome(side=side, clients=clients, uid=uid)
                outcomes.append(outcome)
                await request(client, outcome, content, seed, args)

        started = time.perf_counter()
        await asyncio.gather(*(one_client(jobs) for jobs in work))
        wall = time.perf_counter() - started
    ttfts = [o.ttft_s for o in outcomes if o.ttft_s is not None]
    tokens = sum(o.tokens for o in outcomes)
    prompt_tokens = [o.prompt_tokens for o in outcomes if o.prompt_tokens]
    return {
        "side": side,
        "clients": clients,
        "requests": len(outcomes),
        "wall_s": wall,
        "generated_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
        "ttft_p95_s": p95(ttfts),
        "ttft_max_s": max(ttfts) if ttfts else None,
        "cut_off": sum(o.cut_off for o in outcomes),
        "short": sum(o.short(args.tokens) for o in outcomes),
        "errors": sorted({o.error for o in outcomes if o.error}),
        "server_prompt_tokens": sorted(set(prompt_tokens)),
        "outcomes": [asdict(o) for o in outcomes],
    }


# --- servers -------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(process: subprocess.Popen, url: str, headers: dict, what: str, log: Path) -> None:
    for _ in range(1500):
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with {process.returncode}; see {log}")
        try:
            if httpx.get(url, headers=headers, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{what} did not start; see {log}")


def start_ours(home: Path, model: Path, args, log: Path) -> tuple[subprocess.Popen, str, dict]:
    appliance = str(Path(sys.executable).with_name("appliance"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update(
        APPLIANCE_HOME=str(home),
        APPLIANCE_NUM_THREAD=str(args.threads),
        APPLIANCE_NUM_CTX=str(args.ctx),
        APPLIANCE_NUM_PARALLEL=str(args.parallel),
        APPLIANCE_API_RATE_LIMIT="",
        APPLIANCE_KEEP_ALIVE="-1",
        HF_HUB_OFFLINE="1",
    )
    subprocess.run([appliance, "users", "add", "bench", "--role", "admin"], env=env, check=True, capture_output=True)
    key = subprocess.run(
        [appliance, "keys", "create", "--user", "bench"], env=env, check=True, capture_output=True, text=True
    ).stdout.strip()
    subprocess.run([appliance, "create", MODEL_NAME, "--from", str(model)], env=env, check=True, capture_output=True)
    port = free_port()
    env["APPLIANCE_PORT"] = str(port)
    with log.open("wb") as sink:
        process = subprocess.Popen([appliance, "serve"], env=env, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {key}"}
    wait_ready(process, url + "/api/version", headers, "appliance serve", log)
    return process, url, headers


def start_baseline(model: Path, args, log: Path) -> tuple[subprocess.Popen, str, dict]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model),
        "--model_alias",
        MODEL_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(args.ctx),
        "--n_batch",
        "512",
        "--n_threads",
        str(args.threads),
        "--n_threads_batch",
        str(args.threads),
        "--n_gpu_layers",
        "0",
        "--interrupt_requests",
        "false",
        "--logits_all",
        "false",
    ]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_ready(process, url + "/v1/models", {}, "llama_cpp.server", log)
    return process, url, {}


def stop(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


# --- llama-batched-bench -------------------------------------------------------------------------------------
def batched_bench(binary: Path, model: Path, levels: list[int], args) -> dict:
    context = max(levels) * (args.prompt_tokens + args.tokens) + 64
    command = [
        str(binary),
        *("-m", str(model), "-c", str(context), "-b", "2048", "-ub", "512"),
        *("-npp", str(args.prompt_tokens), "-ntg", str(args.tokens), "-npl", ",".join(map(str, levels))),
        *("-t", str(args.threads), "-tb", str(args.threads), "-ngl", "0", "-fa", args.flash_attn),
    ]
    console.print(f"running {' '.join(command)}")
    result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise SystemExit(f"llama-batched-bench failed ({result.returncode}):\n{result.stderr[-3000:]}")
    header: list[str] | None = None
    rows = []
    output = result.stdout + "\n" + result.stderr  # its table is logged to stdout, its loading chatter to stderr
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if "S_TG t/s" in cells:
            header = cells
        elif header and len(cells) == len(header) and re.fullmatch(r"\d+", cells[0]):
            row = dict(zip(header, (float(c) for c in cells), strict=True))
            rows.append(
                {
                    "parallel": int(row["B"]),
                    "pp": int(row["PP"]),
                    "tg": int(row["TG"]),
                    "s_pp": row["S_PP t/s"],
                    "s_tg": row["S_TG t/s"],
                    "s_total": row["S t/s"],
                    "t_total_s": row["T s"],
                    # generated tokens over the whole time, prompts included: what our aggregate tokens/s measures
                    "generated_per_s": row["B"] * row["TG"] / row["T s"],
                }
            )
    if not rows:
        raise SystemExit(f"no table in llama-batched-bench's output:\n{output[-3000:]}")
    serial = next((r for r in rows if r["parallel"] == 1), rows[0])
    for row in rows:
        row["s_tg_ratio"] = row["s_tg"] / serial["s_tg"]
        row["s_total_ratio"] = row["s_total"] / serial["s_total"]
        row["generated_ratio"] = row["generated_per_s"] / serial["generated_per_s"]
    table = [line for line in output.splitlines() if line.startswith(("|", "main:"))]
    return {"command": command, "rows": rows, "output": table}


# --- report --------------------------------------------------------------------------------------------------
def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def report(levels: list[int], results: dict, ceiling: dict | None) -> list[str]:
    columns = [
        "clients",
        "baseline tok/s",
        "ours tok/s",
        "ours / baseline",
        "baseline p95 TTFT ms",
        "ours p95 TTFT ms",
        "ours / baseline",
        "cut off (base / ours)",
        "short (base / ours)",
    ]
    if ceiling:
        columns += ["batched-bench S_TG vs 1", "batched-bench S vs 1 (ceiling)"]
    rows = []
    for n in levels:
        base, ours = results.get(("baseline", n)), results.get(("ours", n))
        row = [
            str(n),
            f"{base['tokens_per_s']:.1f}" if base else "-",
            f"{ours['tokens_per_s']:.1f}" if ours else "-",
            ratio(ours and ours["tokens_per_s"], base and base["tokens_per_s"]),
            ms(base and base["ttft_p95_s"]),
            ms(ours and ours["ttft_p95_s"]),
            ratio(ours and ours["ttft_p95_s"], base and base["ttft_p95_s"]),
            f"{base['cut_off'] if base else '-'} / {ours['cut_off'] if ours else '-'}",
            f"{base['short'] if base else '-'} / {ours['short'] if ours else '-'}",
        ]
        if ceiling:
            match = next((r for r in ceiling["rows"] if r["parallel"] == n), None)
            row += [f"{match['s_tg_ratio']:.2f}x", f"{match['s_total_ratio']:.2f}x"] if match else ["-", "-"]
        rows.append(row)
    table = Table(title="Concurrent streaming clients: aggregate generated tokens/s and p95 time to first token")
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    markdown = ["| " + " | ".join(columns) + " |", "|" + "|".join("---:" for _ in columns) + "|"]
    markdown += ["| " + " | ".join(row) + " |" for row in rows]
    return markdown


def ceiling_report(ceiling: dict) -> list[str]:
    columns = [
        "parallel sequences",
        "S_PP t/s",
        "S_TG t/s",
        "S_TG vs 1",
        "S t/s (total)",
        "S vs 1",
        "generated t/s (B x TG / T)",
    ]
    table = Table(title="llama-batched-bench (the ceiling)")
    for column in columns:
        table.add_column(column, justify="right")
    rows = [
        [
            str(r["parallel"]),
            f"{r['s_pp']:.1f}",
            f"{r['s_tg']:.1f}",
            f"{r['s_tg_ratio']:.2f}x",
            f"{r['s_total']:.1f}",
            f"{r['s_total_ratio']:.2f}x",
            f"{r['generated_per_s']:.1f}",
        ]
        for r in ceiling["rows"]
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    markdown = ["| " + " | ".join(columns) + " |", "|" + "|".join("---:" for _ in columns) + "|"]
    return markdown + ["| " + " | ".join(row) + " |" for row in rows]


def goal_at(clients: int, results: dict) -> dict | None:
    """The issue's goal: >= 1.4x the baseline's aggregate tokens/s, p95 TTFT <= 0.5x the baseline's, no cut-off."""
    base, ours = results.get(("baseline", clients)), results.get(("ours", clients))
    if not base or not ours or not ours["ttft_p95_s"] or not base["ttft_p95_s"]:
        return None
    throughput = ours["tokens_per_s"] / base["tokens_per_s"]
    ttft = ours["ttft_p95_s"] / base["ttft_p95_s"]
    met = throughput >= 1.4 and ttft <= 0.5 and ours["cut_off"] == 0
    summary = (
        f"Goal at {clients} clients (>= 1.4x tokens/s, p95 TTFT <= 0.5x, no stream cut off): "
        f"{throughput:.2f}x, {ttft:.2f}x, {ours['cut_off']} cut off -> {'met' if met else 'NOT met'}"
    )
    return {
        "tokens_per_s_ratio": throughput,
        "ttft_p95_ratio": ttft,
        "cut_off": ours["cut_off"],
        "met": met,
        "summary": summary,
    }


# --- main ----------------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1,4,8,16", help="concurrent clients per level, comma-separated")
    parser.add_argument("--requests", type=int, default=32, help="requests per level (each client: at least 2)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt tokens after the chat template")
    parser.add_argument("--ctx", type=int, default=512, help="context per sequence, both servers")
    parser.add_argument("--threads", type=int, default=2, help="threads, both servers (and llama-batched-bench)")
    parser.add_argument("--parallel", type=int, default=0, help="APPLIANCE_NUM_PARALLEL; 0: the largest level")
    parser.add_argument("--gguf", type=Path, help="benchmark GGUF to reuse (default: generate/reuse in --out)")
    parser.add_argument("--batched-bench", type=Path, help="path of llama.cpp's llama-batched-bench: run it too")
    parser.add_argument("--batched-bench-only", action="store_true", help="run only llama-batched-bench")
    parser.add_argument(
        "--flash-attn",
        choices=["off", "on", "auto"],
        default="off",
        help="llama-batched-bench's -fa (off: as llama-cpp-python's Llama(flash_attn=False) default)",
    )
    parser.add_argument("--only", choices=["baseline", "ours"], help="serve only one side")
    parser.add_argument("--request-timeout", type=float, default=900.0, help="seconds one request may take")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()
    levels = sorted({int(n) for n in args.levels.split(",")})
    args.parallel = args.parallel or max(levels)
    if args.prompt_tokens + args.tokens > args.ctx:
        parser.error("--ctx must hold --prompt-tokens + --tokens")
    if args.batched_bench_only and not args.batched_bench:
        parser.error("--batched-bench-only needs --batched-bench PATH")
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.gguf or args.out / "bench-0.7b-q8_0.gguf"
    if not model.exists():
        if args.gguf:
            parser.error(f"{model} does not exist")
        console.print("writing the 0.7B-shaped Q8_0 benchmark model ...")
        write_gguf(model, BENCH_0_7B, quant="q8_0", seed=0, name="bench-0.7b")
    hardware = detect()
    machine = (
        f"{platform.machine()}, {hardware.physical_cores} cores, {hardware.total_memory / 2**30:.0f} GiB, "
        f"{'GPU' if hardware.has_gpu else 'CPU only'}, Python {platform.python_version()}"
    )
    load = os.getloadavg()
    console.print(f"machine: {machine}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")

    ceiling = batched_bench(args.batched_bench, model, levels, args) if args.batched_bench else None
    results: dict[tuple[str, int], dict] = {}
    prompt_tokens = None
    if not args.batched_bench_only:
        sides = [args.only] if args.only else ["baseline", "ours"]
        maker = PromptMaker(model, args.prompt_tokens)
        work_by_level, uid = {}, 0
        for n in levels:
            per_client = max(2, math.ceil(args.requests / n))
            work = []
            for _ in range(n):
                jobs = []
                for _ in range(per_client):
                    content, count = maker.message(uid)
                    jobs.append((uid, content, 1000 + uid))
                    prompt_tokens = count if prompt_tokens is None else min(prompt_tokens, count)
                    uid += 1
                work.append(jobs)
            work_by_level[n] = work
        del maker
        console.print(f"{uid} requests per side; prompts of {prompt_tokens} tokens (chat template included)")

        home = Path(tempfile.mkdtemp(prefix="appliance-bench-"))
        servers: dict[str, tuple[subprocess.Popen, str, dict]] = {}
        try:
            console.print("starting the servers ...")
            if "baseline" in sides:
                servers["baseline"] = start_baseline(model, args, args.out / "concurrency-llama-cpp-server.log")
            if "ours" in sides:
                servers["ours"] = start_ours(home, model, args, args.out / "concurrency-appliance.log")
            for side, (_, url, headers) in servers.items():  # load the model and warm up
                warm = asyncio.run(run_level(side, url, headers, 1, [[(-1, "Hello.", 1)]], args))
                if warm["cut_off"]:
                    raise SystemExit(f"{side}: the warm-up request failed: {warm['errors']}")
            # The baseline and ours take turns level by level, so drift in the machine's speed affects both.
            for n in levels:
                for side in sides:
                    process, url, headers = servers[side]
                    per_client = len(work_by_level[n][0])
                    console.print(f"{side}: {n} clients x {per_client} requests ...")
                    result = asyncio.run(run_level(side, url, headers, n, work_by_level[n], args))
                    results[(side, n)] = result
                    console.print(
                        f"  {result['tokens_per_s']:.1f} tok/s, p95 TTFT {ms(result['ttft_p95_s'])} ms, "
                        f"cut off {result['cut_off']}, short {result['short']}"
                        + (f", errors {result['errors']}" if result["errors"] else "")
                    )
                    if process.poll() is not None:
                        raise SystemExit(f"{side} server exited with {process.returncode}")
        finally:
            for process, _, _ in servers.values():
                stop(process)
            shutil.rmtree(home, ignore_errors=True)

    prompt = f"{prompt_tokens}-token prompts" if results else f"{args.prompt_tokens}-token prompts (batched-bench)"
    console.print(
        f"\nMachine: {machine}; {prompt}, {args.tokens} generated tokens per request, {args.threads} threads, "
        f"context {args.ctx} per sequence, APPLIANCE_NUM_PARALLEL={args.parallel}\n"
    )
    markdown = report(levels, results, ceiling) if results else []
    if ceiling:
        markdown += ([""] if markdown else []) + ceiling_report(ceiling)
    goal = goal_at(8, results)
    if goal:
        console.print(goal["summary"])
    if markdown:
        print("\nMarkdown:\n" + "\n".join(markdown), flush=True)
    (args.out / "concurrency.json").write_text(
        json.dumps(
            {
                "machine": machine,
                "load_average_at_start": load,
                "model": str(model),
                "levels": levels,
                "requests_per_level": args.requests,
                "prompt_tokens": prompt_tokens,
                "tokens": args.tokens,
                "ctx_per_sequence": args.ctx,
                "threads": args.threads,
                "num_parallel": args.parallel,
                "sampling": SAMPLING,
                "levels_results": [results[key] for key in sorted(results, key=lambda k: (k[1], k[0]))],
                "goal_at_8_clients": goal,
                "load_average_at_end": os.getloadavg(),
                "batched_bench": ceiling,
                "markdown": markdown,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
