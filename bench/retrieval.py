"""Retrieval latency: `Retriever.search` for an ACL-restricted user, at 10k and 100k chunks, on this machine.

    .venv/bin/python bench/retrieval.py [--sizes 10000 100000] [--queries 300]

Builds, for each size, a throw-away home (SQLite + FTS5 + Chroma) of synthetic chunks: text drawn from
a Zipf-distributed vocabulary, random unit vectors (384 dimensions, as MiniLM's) for speed, inserted
through `ChunkIndex.add` in documents of 50 chunks spread over 8 collections with mixed ACLs
(collection readers, a group, single users). The caller is a reader with a group grant on three
collections, membership of two groups, and a wall on a fourth. Queries (3-8 vocabulary words) are
embedded with the real bundled MiniLM. First the in-memory copies are read (vectors, then the BM25 index:
seconds taken and resident memory added, measured). Then per query, in one alternating loop:
  * access:   `rbac.access_for` (runs on every request);
  * search:   `Retriever.search(top_k=6)` with that access and the default settings (the permitted documents
    read once + query embedding + the access-masked exact vector scan + the access-masked in-memory BM25,
    near-universal words left out + fusion + reading the hits);
  * search_fts: the same with `APPLIANCE_KEYWORD_SEARCH=fts` (BM25 from FTS5 joined to the permitted documents);
  * baseline: the same query embedding + a plain Chroma query (no filter) + a plain FTS5 MATCH of every query
    word (no ACL join), the same candidate counts;
  * the parts on their own: `permitted_documents`; the embedding; the vector search (the default exact scan
    of the in-memory copy, and Chroma's own `where` query as `APPLIANCE_VECTOR_SEARCH=chroma` runs it); BM25
    from the in-memory index (given the permitted documents, as `search` gives them) and from FTS5.
Then `--writes` documents are added one at a time, and as many removed, each write followed by bringing
both in-memory copies up to date, as the first query after it does (ms: p50, max).
Prints p50/p95 (ms) and writes bench/out/retrieval.json. Record results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.access.rbac import access_for, add_collection, add_grant, add_group, add_member, add_wall  # noqa: E402
from appliance.access.users import Principal, add_user  # noqa: E402
from appliance.config import Settings  # noqa: E402
from appliance.db import FTS_TABLE, Document  # noqa: E402
from appliance.retrieval import keyword_search, vector_search  # noqa: E402
from appliance.retrieval.index import ChunkIndex  # noqa: E402
from appliance.retrieval.retrieve import Retriever, fts_query  # noqa: E402
from appliance.services import Services  # noqa: E402
from ingest.chunking import Chunk as Piece  # noqa: E402
from ingest.pipeline import chunk_rows  # noqa: E402

CHUNKS_PER_DOCUMENT = 50
COLLECTIONS = [f"c{n}" for n in range(8)]
DIMENSIONS = 384
NAMES = (
    "access",
    "permitted",
    "embed",
    "dense_memory",
    "dense_chroma",
    "keyword_memory",
    "keyword_fts",
    "search",
    "search_fts",
    "baseline",
)
SYLLABLES = ["ka", "lo", "mi", "re", "su", "ta", "ne", "vo", "pi", "da", "go", "chi", "ran", "tel", "mor", "sin"]


def vocabulary(size: int, rng: random.Random) -> list[str]:
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))))
    return sorted(words)


def sampler(words: list[str], rng: random.Random):
    weights = [1 / (rank + 1) for rank in range(len(words))]  # Zipf

    def sample(count: int) -> list[str]:
        return rng.choices(words, weights=weights, k=count)

    return sample


def acl_for(document: int, collection: str) -> list[str]:
    kind = document % 5
    if kind == 3:
        return ["group:oncology"]
    if kind == 4:
        return [f"user:someone{document % 7}"]
    return [f"collection:{collection}"]


def build(services: Services, size: int, sample, rng: np.random.Generator) -> float:
    """Fill the home's index; seconds taken. The embedder is opened first, on the empty index, as a server opens
    it at its start: the backend of a new index ('auto': int8), which every write is then checked against."""
    index = services.index
    services.embedder  # noqa: B018 (opened for its effect)
    started = time.perf_counter()
    for number in range(size // CHUNKS_PER_DOCUMENT):
        add_document(index, number, sample, rng)
    return time.perf_counter() - started


def add_document(index: ChunkIndex, number: int, sample, rng: np.random.Generator) -> str:
    """Index synthetic document `number` (CHUNKS_PER_DOCUMENT chunks, random unit vectors); its id."""
    collection = COLLECTIONS[number % len(COLLECTIONS)]
    texts = [" ".join(sample(int(rng.integers(60, 160)))) for _ in range(CHUNKS_PER_DOCUMENT)]
    full, pieces, position = "", [], 0
    for i, text in enumerate(texts):
        pieces.append(Piece(i, text, position, position + len(text), None, [f"Section {i}"]))
        full += text + "\n\n"
        position += len(text) + 2
    document_id = f"{number:064x}"
    document = Document(
        id=document_id,
        collection=collection,
        source=f"synthetic-{number}",
        filename=f"synthetic-{number}.txt",
        kind="txt",
        size=len(full),
        acl=acl_for(number, collection),
    )
    vectors = rng.standard_normal((CHUNKS_PER_DOCUMENT, DIMENSIONS)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index.add(document, full, chunk_rows(document_id, pieces), vectors)
    return document_id


def measure_patches(index: ChunkIndex, retriever: Retriever, size: int, sample, rng, writes: int) -> dict:
    """What the first query after a write pays to bring the copies up to date: `writes` documents added one at
    a time, then `writes` removed, each followed by reading both copies (ms: p50 / max). Twice: as configured,
    and with every write folded into the main postings / matrix at once (the baseline: how both copies were
    patched before recent segments and dead rows)."""
    times: dict[str, list[float]] = {}
    first = size // CHUNKS_PER_DOCUMENT
    copies = (keyword_search, vector_search)
    shares = [(copy.RECENT_SHARE, copy.DEAD_SHARE) for copy in copies]
    for label, fold in (("", False), ("folded_", True)):
        for copy, (recent, dead) in zip(copies, shares, strict=True):
            copy.RECENT_SHARE, copy.DEAD_SHARE = (0.0, 0.0) if fold else (recent, dead)
        for number in range(first, first + writes):
            add_document(index, number, sample, rng)
            times.setdefault(f"{label}add_keyword", []).append(timed(retriever.keywords.current))
            times.setdefault(f"{label}add_vector", []).append(timed(retriever.mirror.current))
        for number in range(first - writes, first):
            index.remove(f"{number:064x}")
            times.setdefault(f"{label}remove_keyword", []).append(timed(retriever.keywords.current))
            times.setdefault(f"{label}remove_vector", []).append(timed(retriever.mirror.current))
        first += writes
    for copy, (recent, dead) in zip(copies, shares, strict=True):
        copy.RECENT_SHARE, copy.DEAD_SHARE = recent, dead
    return {name: [round(statistics.median(v), 1), round(max(v), 1)] for name, v in times.items()}


def make_user(engine) -> Principal:
    """A reader: group grant on c0-c2 (via 'staff'), member of 'oncology' too, walled off c3."""
    user = add_user(engine, "reader", "reader")
    for name in COLLECTIONS:
        add_collection(engine, name)
    add_group(engine, "staff")
    add_group(engine, "oncology")
    add_member(engine, "staff", "reader")
    add_member(engine, "oncology", "reader")
    for name in COLLECTIONS[:3]:
        add_grant(engine, name, group="staff")
    add_wall(engine, COLLECTIONS[3], user="reader")
    return Principal(user_id=user.id, name=user.name, role=user.role)


def baseline(retriever: Retriever, query: str, settings) -> None:
    """Embedding + an unfiltered Chroma query + an FTS5 MATCH with no ACL join: what the filter costs over."""
    from sqlalchemy import text as sql

    vector = retriever.embedder.encode([query]).vectors[0]
    retriever.index.vectors.query(
        query_embeddings=[vector.tolist()], n_results=settings.dense_candidates, include=["distances"]
    )
    statement = sql(
        f"SELECT chunk_id FROM {FTS_TABLE} WHERE {FTS_TABLE} MATCH :match ORDER BY rank LIMIT :limit"  # noqa: S608
    )
    with retriever.index.engine.connect() as connection:
        connection.execute(statement, {"match": fts_query(query), "limit": settings.keyword_candidates}).fetchall()


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return (time.perf_counter() - started) * 1000


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def measure(size: int, queries: int, out: Path, seed: int, writes: int) -> dict:
    rng = random.Random(seed)
    sample = sampler(vocabulary(5000, rng), rng)
    with (
        tempfile.TemporaryDirectory(prefix="appliance-bench-retrieval-") as scratch,
        Services(Settings(home=Path(scratch))) as services,
    ):
        settings, index = services.settings, services.index
        print(f"{size} chunks: building ...", flush=True)
        build_s = build(services, size, sample, np.random.default_rng(seed))
        principal = make_user(index.engine)
        retriever = services.retriever  # the default; beside it the same index searched as other settings say
        in_chroma = Retriever(
            index, retriever.embedder, settings.retrieval.model_copy(update={"vector_search": "chroma"})
        )
        in_fts = Retriever(index, retriever.embedder, settings.retrieval.model_copy(update={"keyword_search": "fts"}))
        loads = {
            "vector_copy": read_copy(lambda: retriever.mirror.current()),
            "keyword_index": read_copy(lambda: retriever.keywords.current()),
        }
        snapshot = retriever.keywords.current()
        loads["keyword_index"].update(
            arrays_mb=round(snapshot.nbytes / 1e6, 1),
            terms=len(snapshot.vocabulary.terms),
            postings=len(snapshot.main.rows) + len(snapshot.recent.rows),
        )
        print(f"{size} chunks: copies read {loads}", flush=True)
        questions = [" ".join(sample(rng.randint(3, 8))) for _ in range(queries + 10)]
        access = access_for(index.engine, principal)
        for question in questions[:10]:  # warm-up: model load, caches
            retriever.search(question, access)
            in_fts.search(question, access)
            baseline(retriever, question, settings.retrieval)
        rows: dict[str, list[float]] = {k: [] for k in NAMES}
        scope = sorted(access.collections - access.walled)
        results = 0
        dense, keyword = settings.retrieval.dense_candidates, settings.retrieval.keyword_candidates
        load_before = os.getloadavg()
        for question in questions[10:]:
            rows["access"].append(timed(lambda: access_for(index.engine, principal)))
            started = time.perf_counter()
            results += len(retriever.search(question, access))
            rows["search"].append((time.perf_counter() - started) * 1000)
            rows["search_fts"].append(timed(lambda q=question: in_fts.search(q, access)))
            rows["baseline"].append(timed(lambda q=question: baseline(retriever, q, settings.retrieval)))
            permitted = retriever.permitted_documents(access, scope)
            rows["permitted"].append(timed(lambda: retriever.permitted_documents(access, scope)))
            vector = retriever.embedder.encode([question]).vectors[0]
            rows["embed"].append(timed(lambda q=question: retriever.embedder.encode([q])))
            rows["dense_memory"].append(
                timed(lambda v=vector, p=permitted: retriever.dense_search(v, access, scope, dense, permitted=p))
            )
            rows["dense_chroma"].append(timed(lambda v=vector: in_chroma.dense_search(v, access, scope, dense)))
            rows["keyword_memory"].append(
                timed(lambda q=question, p=permitted: retriever.keyword_search(q, access, scope, keyword, permitted=p))
            )
            rows["keyword_fts"].append(timed(lambda q=question: in_fts.keyword_search(q, access, scope, keyword)))
        patches = measure_patches(index, retriever, size, sample, np.random.default_rng(seed + 1), writes)
        readable = sum(1 for n in range(size // CHUNKS_PER_DOCUMENT) if _readable(n, access))
        return {
            "chunks": size,
            "documents": size // CHUNKS_PER_DOCUMENT,
            "readable_documents": readable,
            "build_s": round(build_s, 1),
            "loads": loads,
            "load_average": {"before_queries": _rounded(load_before), "after_queries": _rounded(os.getloadavg())},
            "queries": queries,
            "mean_hits": results / queries,
            "patches_ms_p50_max": patches,
            **{
                name: {"p50_ms": round(statistics.median(values), 2), "p95_ms": round(percentile(values, 0.95), 2)}
                for name, values in rows.items()
            },
        }


def read_copy(read) -> dict:
    """Seconds an in-memory copy takes to read, and the resident memory it adds (MB)."""
    process = psutil.Process()
    before = process.memory_info().rss
    started = time.perf_counter()
    read()
    return {
        "seconds": round(time.perf_counter() - started, 2),
        "rss_mb": round((process.memory_info().rss - before) / 1e6),
    }


def _rounded(values) -> list[float]:
    return [round(v, 2) for v in values]


def _readable(number: int, access) -> bool:
    collection = COLLECTIONS[number % len(COLLECTIONS)]
    return access.can_read(collection, acl_for(number, collection))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--writes", type=int, default=40, help="documents added, then removed, one at a time")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = [measure(size, args.queries, args.out, args.seed, args.writes) for size in args.sizes]
    print(f"\n{'chunks':>8} {'readable docs':>14} " + " ".join(f"{n:>22}" for n in NAMES))
    print(f"{'':>8} {'':>14} " + " ".join(f"{'p50 / p95 ms':>22}" for _ in NAMES))
    for row in results:
        cells = " ".join(f"{row[n]['p50_ms']:>10.2f} / {row[n]['p95_ms']:<9.2f}" for n in NAMES)
        print(f"{row['chunks']:>8} {row['readable_documents']:>6}/{row['documents']:<7} {cells}")
    for row in results:
        print(f"{row['chunks']:>8} copies read: {row['loads']}; load average (1, 5, 15 min): {row['load_average']}")
        print(f"{row['chunks']:>8} first query after one write, copies brought up to date (ms p50, max): ", end="")
        print(row["patches_ms_p50_max"])
    machine = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    report = {"machine": machine, "results": results}
    (args.out / "retrieval.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
