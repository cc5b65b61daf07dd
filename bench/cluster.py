"""Sharding benchmark: generation tokens/s of one model local vs sharded across 2 and 3 loopback workers.

    .venv/bin/python bench/cluster.py [--gguf bench/out/bench-0.7b-q8_0.gguf] [--tokens 64] [--runs 3]
                                      [--json bench/out/cluster.json] [--label "no delay"]

Starts `appliance worker` on 127.0.0.2, .3, .4 (each in a home of its own), pairs them with a temporary
coordinator home through `appliance cluster pair` and the printed codes, starts `appliance serve` there,
and times greedy generations of the same prompt with the model local against `num_nodes 2`, then against
`num_nodes 3` (the plan keeps a share on the coordinator; `appliance ps` shows it): both loaded, runs
alternating so that the machine's drift hits both alike. Each figure is the median of --runs
generations of --tokens tokens after a warm-up, read from the server's own eval_count / eval_duration.
The added time per token per hop is (ms/token sharded - ms/token local) divided by the hops a token
makes (coordinator -> each worker in turn -> back: workers + 1).

All processes share this machine's cores, and a token visits the nodes one after another, so the
figures show the protocol's cost, not a speed-up. `--delay-ms D` puts a relay process in front of each
worker (on 127.0.0.5, .6, .7; pairing and all traffic go through it) that delivers every chunk D ms
after it arrived, in each direction: a link with D ms one-way latency (2D round trip), where `tc netem`
is not available (this machine's kernel has no sch_netem).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
APPLIANCE = str(Path(sys.executable).with_name("appliance"))
PROMPT = "Write a long story about a lighthouse keeper and the ships that pass."


def env_for(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APPLIANCE_", "OLLAMA_"))}
    return {**env, "APPLIANCE_HOME": str(home), "HF_HUB_OFFLINE": "1", **extra}


def cli(home: Path, *args: str) -> str:
    done = subprocess.run([APPLIANCE, *args], env=env_for(home), capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise SystemExit(f"appliance {' '.join(args)} failed: {done.stderr}")
    return done.stdout


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def start_worker(home: Path, host: str, threads: int) -> tuple[subprocess.Popen, str, str]:
    home.mkdir(parents=True, exist_ok=True)
    address = f"{host}:{free_port(host)}"
    process = subprocess.Popen(
        [APPLIANCE, "worker", "--listen", address, "--threads", str(threads)],
        env=env_for(home),
        stdout=subprocess.PIPE,
        stderr=(home / "worker.log").open("ab"),
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    code = ""
    deadline = time.time() + 120
    while time.time() < deadline:
        line = lines.get(timeout=120)
        if match := re.search(r"Pairing code \(one use\): (\S+)", line):
            code = match.group(1)
        if line.startswith("worker listening"):
            return process, address, code
    raise SystemExit("a worker did not start")


def relay_main(listen: str, target: str, delay_ms: float) -> None:
    """Forward TCP connections from `listen` to `target`, each chunk delivered `delay_ms` after it arrived."""
    import asyncio

    delay = delay_ms / 1000

    async def pump(reader, writer) -> None:
        loop = asyncio.get_running_loop()
        pending: asyncio.Queue = asyncio.Queue()

        async def deliver() -> None:
            while (item := await pending.get()) is not None:
                due, data = item
                await asyncio.sleep(max(0.0, due - loop.time()))
                writer.write(data)
                await writer.drain()
            writer.close()

        sender = asyncio.create_task(deliver())
        try:
            while data := await reader.read(1 << 16):
                pending.put_nowait((loop.time() + delay, data))
        except OSError:
            pass
        pending.put_nowait(None)
        await asyncio.gather(sender, return_exceptions=True)

    async def handle(reader, writer) -> None:
        host, port = target.rsplit(":", 1)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            writer.close()
            return
        await asyncio.gather(pump(reader, upstream_writer), pump(upstream_reader, writer), return_exceptions=True)

    async def serve() -> None:
        host, port = listen.rsplit(":", 1)
        server = await asyncio.start_server(handle, host, int(port))
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


def traffic(home: Path) -> dict[str, tuple[int, int]]:
    """Bytes each worker's current RPC session has carried (in, out), from `appliance cluster status`."""
    statuses = json.loads(cli(home, "cluster", "status", "--json"))
    return {
        s["address"]: (s["session"]["bytes_in"], s["session"]["bytes_out"])
        for s in statuses
        if s.get("session") and not s["session"].get("ended")
    }


def timed(http: httpx.Client, model: str, tokens: int) -> dict[str, float]:
    options = {"temperature": 0, "repeat_penalty": 1.0, "num_predict": tokens, "seed": 1}
    body = http.post("/api/generate", json={"model": model, "prompt": PROMPT, "stream": False, "options": options})
    body.raise_for_status()
    result = body.json()
    return {
        "eval_tokens_per_s": result["eval_count"] / (result["eval_duration"] / 1e9),
        "eval_count": result["eval_count"],
        "load_s": result.get("load_duration", 0) / 1e9,
        "text": result["response"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", default=str(ROOT / "bench" / "out" / "bench-0.7b-q8_0.gguf"))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="threads of the runner (and of each worker)")
    parser.add_argument("--worker-threads", type=int, default=0, help="threads of each worker (default: --threads)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--label", default="loopback", help="what this run measures")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay added in front of each worker")
    parser.add_argument("--relay", nargs=3, metavar=("LISTEN", "TARGET", "DELAY_MS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.relay:
        relay_main(args.relay[0], args.relay[1], float(args.relay[2]))
        return 0

    root = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    home = root / "coordinator"
    workers = []
    server = None
    try:
        cli(home, "users", "add", "admin", "--role", "admin")
        key = cli(home, "keys", "create", "--user", "admin").strip()
        cli(home, "create", "bench", "--from", args.gguf)
        for n in (2, 3):
            (root / f"Modelfile{n}").write_text(f"FROM {args.gguf}\nPARAMETER num_nodes {n}\n")
            cli(home, "create", f"bench-{n}", "-f", str(root / f"Modelfile{n}"))
        for i, host in enumerate(("127.0.0.2", "127.0.0.3", "127.0.0.4")):
            process, address, code = start_worker(root / f"worker{i}", host, args.worker_threads or args.threads)
            workers.append(process)
            if args.delay_ms:
                relay_address = f"127.0.0.{5 + i}:{free_port(f'127.0.0.{5 + i}')}"
                relay = subprocess.Popen(
                    [sys.executable, __file__, "--relay", relay_address, address, str(args.delay_ms)],
                    start_new_session=True,
                )
                workers.append(relay)
                time.sleep(1)
                address = relay_address
            cli(home, "cluster", "pair", address, "--code", code)
        port = free_port("127.0.0.1")
        server = subprocess.Popen(
            [APPLIANCE, "serve"],
            env=env_for(
                home,
                APPLIANCE_PORT=str(port),
                APPLIANCE_NUM_PARALLEL="1",
                APPLIANCE_NUM_CTX="1024",
                APPLIANCE_NUM_THREAD=str(args.threads),
                APPLIANCE_MAX_LOADED_MODELS="2",
            ),
            stdout=(root / "server.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{url}/api/version", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        results: dict[str, dict] = {}
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=1200) as http:
            for model, n_workers in (("bench-2", 2), ("bench-3", 3)):
                # Local and sharded loaded side by side, runs alternating, so drift hits both alike.
                timed(http, "bench", 4)
                load_s = timed(http, model, 4)["load_s"]
                placement = next(m for m in http.get("/api/ps").json()["models"] if m["name"].startswith(model + ":"))
                local_runs, runs = [], []
                before = traffic(home)
                for _ in range(args.runs):
                    local_runs.append(timed(http, "bench", args.tokens))
                    runs.append(timed(http, model, args.tokens))
                after = traffic(home)
                tokens = sum(r["eval_count"] + 1 for r in runs)  # + the prompt's last token, decoded again
                moved = {a: (after[a][0] - before[a][0], after[a][1] - before[a][1]) for a in after if a in before}
                local_rate = statistics.median(r["eval_tokens_per_s"] for r in local_runs)
                eval_rate = statistics.median(r["eval_tokens_per_s"] for r in runs)
                results[model] = {
                    "workers": n_workers,
                    "sharded_load_s": round(load_s, 2),  # the workers' layers cross the tunnels here
                    "local_tokens_per_s": round(local_rate, 2),
                    "sharded_tokens_per_s": round(eval_rate, 2),
                    "local_ms_per_token": round(1000 / local_rate, 2),
                    "sharded_ms_per_token": round(1000 / eval_rate, 2),
                    # a token crosses workers + 1 links: to each worker in turn, then back to the coordinator
                    "added_ms_per_token_per_hop": round((1000 / eval_rate - 1000 / local_rate) / (n_workers + 1), 2),
                    "nodes": [
                        {"node": n["node"], "layers": n["layers"]}
                        for n in (placement.get("cluster") or {}).get("nodes", [])
                    ],
                    "kib_per_token_per_worker": {
                        a: {"to_worker": round(i / tokens / 1024, 1), "from_worker": round(o / tokens / 1024, 1)}
                        for a, (i, o) in moved.items()
                        if i or o
                    },
                    "same_text_as_local": all(r["text"] == local_runs[0]["text"] for r in runs + local_runs),
                    "text": runs[0]["text"],
                }
        for r in results.values():
            r.pop("text")
        report = {
            "label": args.label,
            "gguf": Path(args.gguf).name,
            "tokens": args.tokens,
            "runs": args.runs,
            "threads": args.threads,
            "worker_threads": args.worker_threads or args.threads,
            "delay_ms_one_way": args.delay_ms,
            "cores": os.cpu_count(),
            "run_id": secrets.token_hex(4),
            "results": results,
        }
        print(json.dumps(report, indent=2))
        if args.json:
            path = Path(args.json)
            previous = json.loads(path.read_text()) if path.is_file() else []
            path.write_text(json.dumps([*previous, report] if isinstance(previous, list) else [report], indent=2))
        return 0
    finally:
        if server is not None:
            server.terminate()
            server.wait(60)
        for process in workers:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(30)


if __name__ == "__main__":
    sys.exit(main())
