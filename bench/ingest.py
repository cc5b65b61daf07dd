"""Ingestion benchmark: our pipeline against a plain script doing the same work, on this machine.

    .venv/bin/python bench/ingest.py [--runs 3] [--small]

Generates a corpus in a temporary directory (multi-page PDFs, DOCX and HTML files of headed,
multi-paragraph text), then ingests it, alternating run by run:
  * baseline: a plain in-process loop, file by file: unstructured `partition(strategy="fast")`,
    `chunk_by_title`, sentence-transformers `encode` (bundled all-MiniLM-L6-v2), chromadb
    `PersistentClient(...).add`;
  * ours: `Ingestor.ingest_many` (what `appliance ingest` runs) into a fresh APPLIANCE_HOME.
Pages = PDF pages + 1 per DOCX/HTML file. Reports pages/s end to end and the seconds spent in
parse / chunk / embed / index on each side (ours overlaps them, so its stages add up to more than
its wall time). Prints a table and writes bench/out/ingest.json. Record results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.config import Settings  # noqa: E402
from appliance.inference.hardware import detect  # noqa: E402
from appliance.retrieval.embeddings import SentenceEmbedder, bundled_model_path  # noqa: E402
from ingest.partition import prepare_offline  # noqa: E402

STAGES = ("parse", "chunk", "embed", "index")
MAX_CHARS, OVERLAP = 1000, 150  # our chunker's defaults; the baseline's chunk_by_title gets the same

_SUBJECTS = [
    "the ward clerk", "the admitting consultant", "the pharmacist", "the duty solicitor", "the records officer",
    "the infection control nurse", "the supervising partner", "the discharge coordinator", "each custodian",
    "the clinical lead", "the trainee", "the data protection officer",
]  # fmt: skip
_VERBS = [
    "reviews", "records", "confirms", "escalates", "documents", "signs off", "checks", "archives", "reconciles",
    "notifies the family about", "discloses", "preserves",
]  # fmt: skip
_OBJECTS = [
    "the medication list", "every consent form", "the retention schedule", "the litigation hold",
    "the discharge summary", "all correspondence with the other side", "the incident report",
    "the allergy record", "the transfer letter", "the engagement letter", "the chain of custody log",
    "the privilege review",
]  # fmt: skip
_WHEN = [
    "within 24 hours of admission", "before the end of each shift", "at least once a week",
    "before any disclosure is made", "when the matter closes", "after every transfer between wards",
    "as soon as a complaint is received", "ten years after the last episode of care",
]  # fmt: skip
_TOPICS = [
    "Admission", "Medication reconciliation", "Discharge", "Retention", "Disclosure", "Consent",
    "Incident reporting", "Litigation hold", "Transfers", "Audit", "Escalation", "Privilege",
]  # fmt: skip


def _sentence(rng: random.Random) -> str:
    text = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_WHEN)}"
    if rng.random() < 0.4:
        text += f", and {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
    return text[0].upper() + text[1:] + "."


def _paragraph(rng: random.Random) -> str:
    return " ".join(_sentence(rng) for _ in range(rng.randint(4, 8)))


def _sections(rng: random.Random, count: int) -> list[tuple[str, list[str]]]:
    return [(rng.choice(_TOPICS), [_paragraph(rng) for _ in range(rng.randint(2, 3))]) for _ in range(count)]


def write_pdf(path: Path, rng: random.Random, pages: int) -> None:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_auto_page_break(False)
    for page in range(1, pages + 1):
        pdf.add_page()
        pdf.set_font("helvetica", "B", 14)
        pdf.cell(0, 10, f"{rng.choice(_TOPICS)} procedure, part {page}", new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("helvetica", size=10)
        for _ in range(4):  # about 2,500 characters, one page
            pdf.multi_cell(0, 5, _paragraph(rng), new_x="LMARGIN", new_y="NEXT")
            pdf.ln(3)
    pdf.output(str(path))


def write_docx(path: Path, rng: random.Random) -> None:
    import docx

    document = docx.Document()
    document.add_heading(f"{rng.choice(_TOPICS)} policy", 1)
    for heading, paragraphs in _sections(rng, 2):
        document.add_heading(heading, 2)
        for paragraph in paragraphs:
            document.add_paragraph(paragraph)
    document.save(path)


def write_html(path: Path, rng: random.Random) -> None:
    body = [f"<h1>{rng.choice(_TOPICS)} guidance</h1>"]
    for heading, paragraphs in _sections(rng, 2):
        body.append(f"<h2>{heading}</h2>")
        body.extend(f"<p>{paragraph}</p>" for paragraph in paragraphs)
    path.write_text(f"<!doctype html><html><head><title>Guidance</title></head><body>{''.join(body)}</body></html>")


def write_corpus(folder: Path, pdfs: int, pdf_pages: int, docx: int, html: int) -> tuple[list[Path], int]:
    """The corpus's files and its page count (PDF pages + 1 per other file)."""
    rng = random.Random(7)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(pdfs):
        write_pdf(folder / f"procedure-{i:03}.pdf", rng, pdf_pages)
        files.append(folder / f"procedure-{i:03}.pdf")
    for i in range(docx):
        write_docx(folder / f"policy-{i:03}.docx", rng)
        files.append(folder / f"policy-{i:03}.docx")
    for i in range(html):
        write_html(folder / f"guidance-{i:03}.html", rng)
        files.append(folder / f"guidance-{i:03}.html")
    rng.shuffle(files)  # formats mixed, as a real folder would be
    return files, pdfs * pdf_pages + docx + html


class Baseline:
    """The plain script: one file after the other, every library called the obvious way."""

    def __init__(self):
        prepare_offline()  # the spaCy stand-in and no network, as for our pipeline
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(bundled_model_path()), device="cpu", local_files_only=True)

    def run(self, files: list[Path], store: Path) -> dict:
        import chromadb
        from chromadb.config import Settings as ChromaSettings
        from unstructured.chunking.title import chunk_by_title
        from unstructured.partition.auto import partition

        client = chromadb.PersistentClient(path=str(store), settings=ChromaSettings(anonymized_telemetry=False))
        collection = client.get_or_create_collection("chunks", embedding_function=None)
        seconds = dict.fromkeys(STAGES, 0.0)
        chunks = 0
        started = time.perf_counter()
        for number, path in enumerate(files):
            mark = time.perf_counter()
            elements = partition(filename=str(path), strategy="fast", languages=["eng"])
            seconds["parse"] += time.perf_counter() - mark
            mark = time.perf_counter()
            pieces = [c.text for c in chunk_by_title(elements, max_characters=MAX_CHARS, overlap=OVERLAP)]
            seconds["chunk"] += time.perf_counter() - mark
            mark = time.perf_counter()
            vectors = self.model.encode(pieces, normalize_embeddings=True, show_progress_bar=False)
            seconds["embed"] += time.perf_counter() - mark
            mark = time.perf_counter()
            collection.add(
                ids=[f"{number}:{i}" for i in range(len(pieces))],
                embeddings=vectors,
                documents=pieces,
                metadatas=[{"source": str(path)} for _ in pieces],
            )
            seconds["index"] += time.perf_counter() - mark
            chunks += len(pieces)
        return {"wall_s": time.perf_counter() - started, "chunks": chunks, **seconds}


class Ours:
    """`Ingestor.ingest_many`, as `appliance ingest` runs it, into a fresh home each run."""

    def __init__(self):
        self.embedder = SentenceEmbedder(Settings().embeddings)
        self.embedder.load()  # both sides start with the model loaded

    def run(self, files: list[Path], home: Path) -> dict:
        from appliance.services import Services

        services = Services(Settings(home=home), embedder=self.embedder)  # the home wired as `appliance ingest`'s
        ingestor = services.ingestor
        try:
            ingestor.warm_up()  # parser processes started and their imports done, as in a long-lived server
            started = time.perf_counter()
            many = ingestor.ingest_many([(path, str(path)) for path in files], "bench", ["collection:bench"])
            results = [result for file_results in many for result in file_results]
            wall = time.perf_counter() - started
        finally:
            services.close()  # the parser processes
        failed = [r for r in results if r.status == "failed"]
        if failed:
            raise SystemExit(f"our pipeline failed on {failed[0].source}: {failed[0].reason}")
        seconds = {stage: ingestor.timings.get(stage, 0.0) for stage in STAGES}
        return {"wall_s": wall, "chunks": sum(r.chunks for r in results), **seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="a quick check: 30 PDF pages, 20 other files")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["HF_HUB_OFFLINE"] = "1"
    # As `appliance ingest` sets it; both sides share this process and so this setting (see the docs).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    hardware = detect()
    scratch = Path(tempfile.mkdtemp(prefix="appliance-bench-ingest-"))
    try:
        shape = (6, 5, 10, 10) if args.small else (40, 5, 50, 50)
        files, pages = write_corpus(scratch / "corpus", *shape)
        print(f"corpus: {len(files)} files, {pages} pages; loading both sides ...", flush=True)
        baseline, ours = Baseline(), Ours()
        # Warm-up on a few files, so that neither side pays its first imports inside a timed run.
        baseline.run(files[:4], scratch / "warm-baseline")
        ours.run(files[:4], scratch / "warm-ours")
        # Runs alternate (baseline, ours, baseline, ...) so that drift in a shared machine's speed hits both.
        base_runs, our_runs = [], []
        for run in range(args.runs):
            base_runs.append(baseline.run(files, scratch / f"baseline-{run}"))
            our_runs.append(ours.run(files, scratch / f"ours-{run}"))
            print(
                f"run {run + 1}/{args.runs}: baseline {pages / base_runs[-1]['wall_s']:.2f} pages/s, "
                f"ours {pages / our_runs[-1]['wall_s']:.2f} pages/s",
                flush=True,
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    def med(rows: list[dict], key: str) -> float:
        return statistics.median(row[key] for row in rows)

    base_rate = statistics.median(pages / r["wall_s"] for r in base_runs)
    our_rate = statistics.median(pages / r["wall_s"] for r in our_runs)
    rows = [("pages/s end to end", f"{base_rate:.2f}", f"{our_rate:.2f}", f"{our_rate / base_rate:.2f}", ">= 1.5")]
    rows.append(("wall time (s)", f"{med(base_runs, 'wall_s'):.1f}", f"{med(our_runs, 'wall_s'):.1f}", "", ""))
    for stage in STAGES:
        rows.append((f"{stage} (s)", f"{med(base_runs, stage):.1f}", f"{med(our_runs, stage):.1f}", "", ""))
    rows.append(("chunks", str(base_runs[0]["chunks"]), str(our_runs[0]["chunks"]), "", ""))
    machine = (
        f"{platform.machine()}, {hardware.physical_cores} cores, {hardware.total_memory / 2**30:.0f} GiB, "
        f"{'GPU' if hardware.has_gpu else 'CPU only'}, Python {platform.python_version()}"
    )
    print(f"\nMachine: {machine}; {len(files)} files, {pages} pages; {args.runs} runs (median)\n")
    header = ("metric", "plain script (baseline)", "appliance ingest", "ours / baseline", "goal")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    paired = [b["wall_s"] / o["wall_s"] for b, o in zip(base_runs, our_runs, strict=True)]
    print(
        f"\nours / baseline run by run (back to back): {', '.join(f'{r:.2f}' for r in paired)}; "
        f"median {statistics.median(paired):.2f}"
    )
    print(
        "per run, pages/s: baseline "
        + ", ".join(f"{pages / r['wall_s']:.2f}" for r in base_runs)
        + "; ours "
        + ", ".join(f"{pages / r['wall_s']:.2f}" for r in our_runs)
    )
    (args.out / "ingest.json").write_text(
        json.dumps(
            {"machine": machine, "files": len(files), "pages": pages, "baseline": base_runs, "ours": our_runs},
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
