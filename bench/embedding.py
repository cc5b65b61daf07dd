"""Embedding backends beside the torch baseline, in one run on this machine.

    .venv/bin/python bench/embedding.py [--backends torch onnx onnx-int8] [--rounds 3] [--questions 200]
                                        [--no-quality] [--scifact ../shared/eval/scifact] [--scifact-limit 300]

For each backend of `APPLIANCE_EMBEDDING_BACKEND` (through `SentenceEmbedder`, as the appliance calls it) and
for sentence-transformers' own `encode` (the baseline, torch fp32, called directly):
  * chunks/s: 256 chunks of ~200 tokens (1,000 characters, the ingestor's chunk size, cut from the sample
    corpus's text) in batches of 16, as ingestion embeds them, on the default threads; the rounds alternate
    between backends, best round shown; the cosine of each of these vectors with torch's;
  * one question's embedding, p50/p95 ms: the golden questions one at a time (one thread, as a question runs);
  * quality: cosine of each sample corpus chunk's vector with torch's (as indexed), and hit@5 of the golden
    questions (hybrid and dense) from `appliance eval`'s code, each backend indexing the sample corpus in a
    home of its own;
  * with --scifact: nDCG@10 (dense, hybrid) on SciFact `test` (the first --scifact-limit queries; the whole
    corpus is indexed every time, which takes minutes).
Prints a table and writes bench/out/embedding.json. Record results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.config import EmbeddingSettings, Settings  # noqa: E402
from appliance.operations import evaluation  # noqa: E402
from appliance.retrieval.embeddings import SentenceEmbedder, bundled_model_path, prepare_offline_hub  # noqa: E402

log = logging.getLogger("bench.embedding")
QUESTIONS = ROOT / "sample_corpus" / "questions.yaml"
BATCH = 16  # ingest.pipeline.EMBED_BATCH


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return f"{platform.processor()}, {os.cpu_count()} cores"


def settings_for(backend: str, home: Path) -> Settings:
    return Settings(home=home, embeddings=EmbeddingSettings(embedding_backend=backend))


def quality(backends: list[str], work: Path) -> tuple[dict, dict[str, dict[str, np.ndarray]], dict[str, str]]:
    """hit@k per backend (golden questions), every chunk's vector per backend, and the chunks' texts."""
    report, vectors, texts = {}, {}, {}
    for backend in backends:
        home = work / f"eval-{backend}"
        result = evaluation.evaluate_questions(QUESTIONS, settings_for(backend, home), keep=home)
        report[backend] = {m: result["metrics"][m] for m in ("hybrid", "dense")}
        with sqlite3.connect(home / "appliance.db") as db:
            rows = db.execute("SELECT c.id, c.text, v.vector FROM chunk c JOIN chunkvector v ON v.chunk_id = c.id")
            vectors[backend] = {}
            for chunk_id, text, vector in rows:
                vectors[backend][chunk_id] = np.frombuffer(vector, dtype=np.float32)
                texts[chunk_id] = text
        log.info("%s: %d chunks, hybrid hit@5 %.3f", backend, len(vectors[backend]), report[backend]["hybrid"]["hit@5"])
    return report, vectors, texts


def cosines(vectors: dict[str, dict[str, np.ndarray]], backend: str) -> dict:
    shared = sorted(set(vectors[backend]) & set(vectors["torch"]))
    values = np.array([float(vectors[backend][c] @ vectors["torch"][c]) for c in shared])
    return {"chunks": len(shared), "mean": float(values.mean()), "min": float(values.min())}


def long_chunks(texts: list[str], count: int, size: int = 1000) -> list[str]:
    """`count` pieces of about `size` characters, cut at spaces from the texts read in turn (then again)."""
    words = " ".join(texts).split()
    pieces, start = [], 0
    while len(pieces) < count:
        piece = []
        while sum(len(w) + 1 for w in piece) < size:
            piece.append(words[start % len(words)])
            start += 1
        pieces.append(" ".join(piece))
    return pieces


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def speed(backends: list[str], chunks: list[str], questions: list[str], rounds: int, home: Path) -> dict:
    """Rounds alternate between the embedders, so that the machine's other load falls on each alike."""
    from sentence_transformers import SentenceTransformer

    embedders = {}
    for backend in backends:
        started = time.perf_counter()
        embedder = SentenceEmbedder(EmbeddingSettings(embedding_backend=backend), home=home)
        embedder.load()
        embedders[backend] = embedder
        log.info("%s loaded (with any export) in %.1f s", backend, time.perf_counter() - started)
    direct = SentenceTransformer(str(bundled_model_path()), device="cpu", local_files_only=True)
    runs = {"sentence-transformers (direct)": [], **{b: [] for b in backends}}
    latencies: dict[str, list[float]] = {b: [] for b in backends}
    vectors: dict[str, np.ndarray] = {}
    for embedder in embedders.values():  # warm-up
        embedder.encode(chunks[:BATCH], batch_size=BATCH)
        embedder.encode(questions[:5])
    direct.encode(chunks[:BATCH], batch_size=BATCH, show_progress_bar=False)
    for number in range(rounds):
        started = time.perf_counter()
        direct.encode(chunks, batch_size=BATCH, normalize_embeddings=True, show_progress_bar=False)
        runs["sentence-transformers (direct)"].append(len(chunks) / (time.perf_counter() - started))
        for backend, embedder in embedders.items():
            started = time.perf_counter()
            vectors[backend] = embedder.encode(chunks, batch_size=BATCH).vectors
            runs[backend].append(len(chunks) / (time.perf_counter() - started))
            for question in questions:
                started = time.perf_counter()
                embedder.encode([question])
                latencies[backend].append((time.perf_counter() - started) * 1000)
        log.info("round %d: %s", number + 1, {k: round(v[-1], 1) for k, v in runs.items()})
    result = {
        name: {"chunks_per_s": max(values), "rounds": [round(v, 1) for v in values]} for name, values in runs.items()
    }
    for backend, values in latencies.items():
        result[backend]["question_p50_ms"] = statistics.median(values)
        result[backend]["question_p95_ms"] = percentile(values, 0.95)
        long = (vectors[backend] * vectors["torch"]).sum(axis=1)
        result[backend]["cosine_long_chunks"] = {"mean": float(long.mean()), "min": float(long.min())}
    return result


def scifact(backends: list[str], path: Path, limit: int | None, work: Path) -> dict:
    dataset = evaluation.load_beir(path, "test")
    report = {}
    for backend in backends:
        started = time.perf_counter()
        result = evaluation.evaluate_beir(dataset, settings_for(backend, work / f"scifact-{backend}"), limit=limit)
        report[backend] = {
            "queries": result["queries"],
            "dense_ndcg@10": result["metrics"]["dense"]["ndcg@10"],
            "hybrid_ndcg@10": result["metrics"]["hybrid"]["ndcg@10"],
            "seconds": round(time.perf_counter() - started),
        }
        log.info("scifact %s: %s", backend, report[backend])
    return report


def table(report: dict) -> str:
    speed_rows, quality_rows = report["speed"], report.get("quality", {})
    baseline = speed_rows["sentence-transformers (direct)"]["chunks_per_s"]
    lines = [
        "| embedder | chunks/s | × baseline | question p50 ms | question p95 ms | cosine vs torch, ~200-token "
        "chunks (mean / min) | cosine vs torch, corpus chunks (mean / min) | hit@5 hybrid | hit@5 dense |",
        "|---|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    for name, row in speed_rows.items():
        cells = [name, f"{row['chunks_per_s']:.1f}", f"{row['chunks_per_s'] / baseline:.2f}"]
        if "question_p50_ms" in row:
            long = row["cosine_long_chunks"]
            cells += [f"{row['question_p50_ms']:.1f}", f"{row['question_p95_ms']:.1f}"]
            cells.append(f"{long['mean']:.4f} / {long['min']:.4f}" if name != "torch" else "")
        else:
            cells += ["", "", ""]
        cosine = report.get("cosine", {}).get(name)
        cells.append(f"{cosine['mean']:.4f} / {cosine['min']:.4f}" if cosine else "")
        hits = quality_rows.get(name)
        cells += [f"{hits['hybrid']['hit@5']:.3f}", f"{hits['dense']['hit@5']:.3f}"] if hits else ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    for backend, row in report.get("scifact", {}).items():
        lines.append(
            f"\nSciFact test ({row['queries']} queries), {backend}: nDCG@10 dense {row['dense_ndcg@10']:.3f}, "
            f"hybrid {row['hybrid_ndcg@10']:.3f} ({row['seconds']} s)"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["torch", "onnx", "onnx-int8"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--questions", type=int, default=200, help="question embeddings timed per round")
    parser.add_argument("--no-quality", action="store_true", help="skip the sample corpus (then no cosine/hit@5)")
    parser.add_argument("--scifact", type=Path, help="BEIR SciFact folder: also score nDCG@10 on its test split")
    parser.add_argument("--scifact-limit", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    prepare_offline_hub()
    backends = ["torch", *[b for b in args.backends if b != "torch"]]
    report: dict = {"cpu": cpu_name(), "load_before": os.getloadavg(), "batch": BATCH}
    with tempfile.TemporaryDirectory(prefix="bench-embedding-") as scratch:
        work = Path(scratch)
        if args.no_quality:
            texts = {p.name: p.read_text(errors="ignore") for p in (ROOT / "sample_corpus").rglob("*.md")}
        else:
            report["quality"], vectors, texts = quality(backends, work)
            report["cosine"] = {b: cosines(vectors, b) for b in backends if b != "torch"}
        chunks = long_chunks(list(texts.values()), 256)
        questions = [q["question"] for q in evaluation.load_questions(QUESTIONS)]
        questions = (questions * (1 + args.questions // len(questions)))[: args.questions]
        tokens = SentenceEmbedder(EmbeddingSettings()).encode(chunks).prompt_tokens / len(chunks)
        report["chunks"] = {"count": len(chunks), "mean_tokens": round(tokens, 1)}
        report["speed"] = speed(backends, chunks, questions, args.rounds, work / "home")
        if args.scifact:
            report["scifact"] = scifact(backends, args.scifact, args.scifact_limit, work)
    report["load_after"] = os.getloadavg()
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "embedding.json").write_text(json.dumps(report, indent=2))
    print(f"{report['cpu']}; {report['chunks']['count']} chunks of {report['chunks']['mean_tokens']} tokens on average")
    print(f"load average before {report['load_before']}, after {report['load_after']}")
    print(table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
