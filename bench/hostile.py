"""Responsiveness under hostile requests: search latency while ten callers send costly templates and deep JSON.

    .venv/bin/python bench/hostile.py [--searches 60] [--hostile 10]

Starts `appliance serve` in a temporary home holding the sample hospital corpus, an admin, a reader and an
attacking reader (each with a key) and a tiny generated model. Then the reader runs --searches searches
(`/api/rag/search`) one after another, twice: alone (the baseline), and while --hostile callers each send,
again and again until the searches end, one of: a `/api/generate` whose template nests two 100,000-step
loops (from the admin's key, which may send templates: each render runs until its 1 s deadline), the same
from the attacker's key (refused, 403), and a body of JSON nested 50,000 deep from the attacker (400; the
attacker's own rate limit then answers 429). The red-team review hung every route with seven such
template requests. The table gives search p50/p95/max per phase and what the hostile requests got back.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from appliance.models.synthetic_gguf import TINY, write_gguf  # noqa: E402
from bench.load import server_env, start_server, stop_server  # noqa: E402

CORPUS = HERE.parent / "sample_corpus" / "hospital"
APPLIANCE = str(Path(sys.executable).parent / "appliance")
LOOP_BOMB = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
NESTED = b'{"model": "tiny", "options": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
QUERIES = [
    "how long are medical records kept",
    "hand hygiene before patient contact",
    "who may access a patient's chart",
    "night shift handover",
    "medication errors reporting",
    "visiting hours for the intensive care unit",
]


def _cli(home: Path, *args: str) -> str:
    import subprocess

    done = subprocess.run(
        [APPLIANCE, *args], env=server_env(home), capture_output=True, text=True, check=True, timeout=900
    )
    return done.stdout.strip()


def prepare(home: Path) -> dict[str, str]:
    """Keys by user name."""
    _cli(home, "ingest", str(CORPUS), "--collection", "hospital")
    for name, role in (("admin", "admin"), ("reader", "reader"), ("attacker", "reader")):
        _cli(home, "users", "add", name, "--role", role)
        if role == "reader":
            _cli(home, "grants", "add", "--collection", "hospital", "--user", name)
    _cli(home, "create", "tiny", "--from", str(write_gguf(home / "tiny.gguf", TINY, seed=1)))
    return {name: _cli(home, "keys", "create", "--user", name) for name in ("admin", "reader", "attacker")}


def searches(url: str, key: str, count: int) -> list[float]:
    took = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
        for index in range(count):
            started = time.perf_counter()
            response = client.post("/api/rag/search", json={"query": QUERIES[index % len(QUERIES)]})
            took.append(time.perf_counter() - started)
            response.raise_for_status()
    return took


def hostile(url: str, key: str, kind: str, stop: threading.Event, statuses: Counter) -> None:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
        while not stop.is_set():
            if kind == "nested":
                response = client.post("/api/chat", content=NESTED, headers={"Content-Type": "application/json"})
            else:
                body = {"model": "tiny", "prompt": "hi", "template": LOOP_BOMB, "stream": False}
                response = client.post("/api/generate", json=body)
            statuses[f"{kind} {response.status_code}"] += 1


def row(phase: str, took: list[float]) -> str:
    ordered = sorted(took)
    p95 = ordered[max(0, round(0.95 * len(ordered)) - 1)]
    p50, top = statistics.median(took), max(took)
    return f"| {phase} | {len(took)} | {p50 * 1000:.0f} | {p95 * 1000:.0f} | {top * 1000:.0f} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--searches", type=int, default=60)
    parser.add_argument("--hostile", type=int, default=10)
    parser.add_argument(
        "--kinds",
        nargs="+",
        default=["admin-template", "reader-template", "nested"],
        choices=["admin-template", "reader-template", "nested"],
        help="the hostile requests, dealt to the callers in turn",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        home = Path(directory)
        keys = prepare(home)
        process, url, _ = start_server(home)
        try:
            searches(url, keys["reader"], 5)  # warm: the embedder and the index copies are loaded
            baseline = searches(url, keys["reader"], args.searches)
            stop, statuses = threading.Event(), Counter()
            kinds = args.kinds
            callers = []
            for index in range(args.hostile):
                kind = kinds[index % len(kinds)]
                key = keys["admin"] if kind == "admin-template" else keys["attacker"]
                callers.append(threading.Thread(target=hostile, args=(url, key, kind, stop, statuses)))
            for caller in callers:
                caller.start()
            time.sleep(1.0)  # the hostile requests are in flight
            loaded = searches(url, keys["reader"], args.searches)
            stop.set()
            for caller in callers:
                caller.join()
        finally:
            stop_server(process)
    print("| phase | searches | p50 ms | p95 ms | max ms |")
    print("|---|---|---|---|---|")
    print(row("alone (baseline)", baseline))
    print(row(f"with {args.hostile} hostile callers", loaded))
    print("hostile requests answered: " + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
