"""Retrieval quality, measured: `appliance eval` on a BEIR dataset or on the sample corpus's golden questions.

Everything is indexed into a throw-away home in a temporary directory (its own SQLite and Chroma; the
user's index is never touched), then every question goes through the real `Retriever` with the
operator's access. One question gives three chunk rankings — vector, BM25 and their fusion as `search`
computes it — each collapsed to a document ranking (a document ranks where its best chunk ranks).

Metrics follow BEIR (pytrec_eval / trec_eval): nDCG@10 with graded, linear gains (the qrels score) and
the ideal ordering of all judged-relevant documents; recall@k over all relevant documents (score > 0);
MRR@10 the reciprocal rank of the first relevant document in the top 10; each averaged over queries.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from appliance.config import Settings
from appliance.errors import BadRequest

log = logging.getLogger(__name__)

METHODS = ("dense", "bm25", "hybrid")
BEIR_METRICS = ("ndcg@10", "recall@10", "recall@100", "mrr@10")
QUESTION_METRICS = ("hit@1", "hit@5", "mrr@10")
COLLECTION = "eval"
DEEP_CANDIDATES = 300  # chunks asked of each single search, so that 100 distinct documents can be ranked
EMBED_BATCH = 256  # chunks embedded per call while indexing

# A progress callback: (description, done, total).
Progress = Callable[[str, int, int], None]


def _quiet(description: str, done: int, total: int) -> None:
    return None


# --- metrics -------------------------------------------------------------------------------------
def ndcg_at(ranked: list[str], relevance: dict[str, int], k: int = 10) -> float:
    """nDCG@k with linear gains (trec_eval's ndcg_cut): sum rel / log2(rank + 1), over the ideal order."""
    dcg = sum(relevance.get(doc, 0) / math.log2(rank + 1) for rank, doc in enumerate(ranked[:k], start=1))
    ideal = sorted((g for g in relevance.values() if g > 0), reverse=True)[:k]
    idcg = sum(gain / math.log2(rank + 1) for rank, gain in enumerate(ideal, start=1))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at(ranked: list[str], relevance: dict[str, int], k: int) -> float:
    relevant = {doc for doc, gain in relevance.items() if gain > 0}
    return len(relevant.intersection(ranked[:k])) / len(relevant) if relevant else 0.0


def mrr_at(ranked: list[str], relevance: dict[str, int], k: int = 10) -> float:
    for rank, doc in enumerate(ranked[:k], start=1):
        if relevance.get(doc, 0) > 0:
            return 1.0 / rank
    return 0.0


def beir_metrics(ranked: list[str], relevance: dict[str, int]) -> dict[str, float]:
    return {
        "ndcg@10": ndcg_at(ranked, relevance, 10),
        "recall@10": recall_at(ranked, relevance, 10),
        "recall@100": recall_at(ranked, relevance, 100),
        "mrr@10": mrr_at(ranked, relevance, 10),
    }


def question_metrics(ranked: list[str], expected: str) -> dict[str, float]:
    return {
        "hit@1": float(expected in ranked[:1]),
        "hit@5": float(expected in ranked[:5]),
        "mrr@10": mrr_at(ranked, {expected: 1}, 10),
    }


def collapse(chunk_ids: list[str], document_of: Callable[[str], str | None]) -> list[str]:
    """A chunk ranking as a document ranking: each document where its best chunk is, once."""
    seen: dict[str, None] = {}
    for chunk_id in chunk_ids:
        document = document_of(chunk_id)
        if document is not None and document not in seen:
            seen[document] = None
    return list(seen)


def mean(rows: list[dict[str, float]], names: tuple[str, ...]) -> dict[str, float]:
    return {name: (sum(row[name] for row in rows) / len(rows) if rows else 0.0) for name in names}


# --- the BEIR format -----------------------------------------------------------------------------
@dataclass
class BeirDataset:
    name: str
    corpus: dict[str, tuple[str, str]]  # doc id -> (title, text)
    queries: dict[str, str]  # query id -> text, only those judged in the split, in qrels order
    qrels: dict[str, dict[str, int]]  # query id -> doc id -> graded relevance
    warnings: list[str] = field(default_factory=list)


def _jsonl(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    if not path.is_file():
        raise BadRequest(f"{path.name} not found in {path.parent} (a BEIR dataset has corpus.jsonl and queries.jsonl)")
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadRequest(f"{path.name} line {number}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise BadRequest(f"{path.name} line {number}: expected a JSON object")
            for key in required:
                if not isinstance(row.get(key), str | int) or isinstance(row.get(key), bool):
                    raise BadRequest(f"{path.name} line {number}: '{key}' is missing or not a string")
            yield number, row


def load_beir(directory: Path, split: str = "test") -> BeirDataset:
    """Read `corpus.jsonl`, `queries.jsonl` and `qrels/<split>.tsv`; every problem is a BadRequest naming
    the file and line."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise BadRequest(f"dataset directory {directory} not found")
    if not split or "/" in split or split.startswith("."):
        raise BadRequest(f"invalid split name '{split}'")
    qrels_path = directory / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        available = (
            sorted(p.stem for p in (directory / "qrels").glob("*.tsv")) if (directory / "qrels").is_dir() else []
        )
        hint = f" (splits here: {', '.join(available)})" if available else ""
        raise BadRequest(f"qrels/{split}.tsv not found in {directory}{hint}")
    corpus: dict[str, tuple[str, str]] = {}
    for number, row in _jsonl(directory / "corpus.jsonl", ("_id", "text")):
        title = row.get("title") or ""
        if not isinstance(title, str):
            raise BadRequest(f"corpus.jsonl line {number}: 'title' is not a string")
        doc_id = str(row["_id"])
        if doc_id in corpus:
            raise BadRequest(f"corpus.jsonl line {number}: document '{doc_id}' appears twice")
        corpus[doc_id] = (title.strip(), str(row["text"]).strip())
    if not corpus:
        raise BadRequest("corpus.jsonl holds no documents")
    all_queries = {str(row["_id"]): str(row["text"]) for _, row in _jsonl(directory / "queries.jsonl", ("_id", "text"))}
    qrels: dict[str, dict[str, int]] = {}
    with qrels_path.open(encoding="utf-8", newline="") as handle:
        for number, fields in enumerate(csv.reader(handle, delimiter="\t"), start=1):
            if not fields or not "".join(fields).strip():
                continue
            if number == 1 and fields[0].strip().lower() in ("query-id", "query_id", "qid"):
                continue  # the header
            if len(fields) != 3:
                raise BadRequest(
                    f"qrels/{split}.tsv line {number}: expected query-id, corpus-id, score (tab-separated)"
                )
            query_id, doc_id, raw_score = (f.strip() for f in fields)
            try:
                score = int(raw_score)
            except ValueError:
                raise BadRequest(f"qrels/{split}.tsv line {number}: score '{raw_score}' is not an integer") from None
            if query_id not in all_queries:
                raise BadRequest(f"qrels/{split}.tsv line {number}: query '{query_id}' is not in queries.jsonl")
            qrels.setdefault(query_id, {})[doc_id] = score
    qrels = {q: judged for q, judged in qrels.items() if any(score > 0 for score in judged.values())}
    if not qrels:
        raise BadRequest(f"qrels/{split}.tsv judges no document relevant to any query")
    warnings = []
    unknown = {doc for judged in qrels.values() for doc in judged if doc not in corpus}
    if unknown:
        warnings.append(f"qrels/{split}.tsv names {len(unknown)} documents that are not in corpus.jsonl")
    return BeirDataset(directory.name, corpus, {q: all_queries[q] for q in qrels}, qrels, warnings)


# --- a throw-away index --------------------------------------------------------------------------
@contextmanager
def throwaway_home(settings: Settings, keep: Path | None = None) -> Iterator[Settings]:
    """Settings like the user's (models, retrieval, ingest) but with a home of their own in a temporary
    directory and SQLite in it; removed afterwards unless `keep` names a directory to use instead."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield _home_settings(settings, keep)
        return
    with tempfile.TemporaryDirectory(prefix="appliance-eval-") as scratch:
        yield _home_settings(settings, Path(scratch))


def _home_settings(settings: Settings, home: Path) -> Settings:
    # The user's ONNX export of the embedding model is reused (checked before it is loaded), not made again.
    exports = settings.embeddings.embedding_export_dir or str(settings.home / "embeddings")
    embeddings = settings.embeddings.model_copy(update={"embedding_export_dir": exports})
    scoped = settings.model_copy(
        update={"home": home.resolve(), "database_url": "", "chroma_url": "", "embeddings": embeddings}
    )
    scoped.ensure_dirs()
    return scoped


def open_retriever(settings: Settings):
    from appliance.db import create_db_engine
    from appliance.embeddings import open_embedder
    from appliance.index import ChunkIndex, open_vector_store
    from appliance.retrieve import Retriever

    index = ChunkIndex(create_db_engine(settings.resolved_database_url), open_vector_store(settings))
    return Retriever(index, open_embedder(settings, index), settings.retrieval)


def document_key(doc_id: str) -> str:
    """The appliance document id for a corpus id (hex, fixed length, whatever the corpus id holds)."""
    return hashlib.sha256(doc_id.encode()).hexdigest()


def index_corpus(retriever, corpus: dict[str, tuple[str, str]], progress: Progress = _quiet) -> int:
    """Each corpus document as a Document (title as heading + text, chunked by `chunk_document`), embedded
    in batches and added through `ChunkIndex.add`. Returns the number of chunks."""
    from appliance.db import Document
    from ingest.chunking import chunk_document
    from ingest.partition import Element
    from ingest.pipeline import chunk_rows

    pending: list[tuple[Document, str, list]] = []
    total_chunks = done = 0

    def flush() -> None:
        nonlocal total_chunks
        texts = [chunk.text for _, _, chunks in pending for chunk in chunks]
        vectors = retriever.embedder.encode(texts).vectors if texts else []
        offset = 0
        for document, text, chunks in pending:
            retriever.index.add(document, text, chunks, vectors[offset : offset + len(chunks)])
            offset += len(chunks)
        total_chunks += offset
        pending.clear()

    for doc_id, (title, body) in corpus.items():
        elements = []
        if title:
            elements.append(Element(text=title, category="Title", headings=[title]))
        if body:
            elements.append(Element(text=body, category="NarrativeText", headings=[title] if title else []))
        text, pieces = chunk_document(elements) if elements else ("", [])
        key = document_key(doc_id)
        document = Document(
            id=key,
            collection=COLLECTION,
            source=doc_id[:1024],
            filename=(title or doc_id)[:255],
            kind="txt",
            size=len(text.encode()),
            acl=[f"collection:{COLLECTION}"],
        )
        pending.append((document, text, chunk_rows(key, pieces)))
        done += 1
        if sum(len(chunks) for _, _, chunks in pending) >= EMBED_BATCH:
            flush()
            progress("indexing", done, len(corpus))
    flush()
    progress("indexing", done, len(corpus))
    return total_chunks


def indexed_chunks(retriever, corpus_ids: dict[str, str]) -> int | None:
    """The chunk count when a kept work directory already holds exactly this corpus, fully indexed (a
    later run reuses it); None when it is empty; an error when it holds something else."""
    from sqlmodel import select

    from appliance.db import Document, session

    with session(retriever.index.engine) as db:
        documents = {d.id: (d.status, d.chunk_count) for d in db.exec(select(Document))}
    if not documents:
        return None
    if set(documents) != set(corpus_ids) or any(status != "indexed" for status, _ in documents.values()):
        raise BadRequest("the work directory holds another or an unfinished index; give an empty directory")
    return sum(count for _, count in documents.values())


# --- BEIR evaluation -----------------------------------------------------------------------------
def rankings(retriever, query: str) -> dict[str, list[str]]:
    """The three chunk rankings of one question through the real retrieval code, as the operator: the
    single searches deep enough for recall@100, the fusion exactly as `search` computes it."""
    from appliance.rbac import OPERATOR

    deep = retriever.rank(query, OPERATOR, dense_candidates=DEEP_CANDIDATES, keyword_candidates=DEEP_CANDIDATES)
    hybrid = retriever.rank(query, OPERATOR)
    return {"dense": [c for c, _ in deep.dense], "bm25": deep.keyword, "hybrid": hybrid.ids}


def _document_of(chunk_id: str, corpus_ids: dict[str, str]) -> str | None:
    return corpus_ids.get(chunk_id.rsplit(":", 1)[0])


def evaluate_beir(
    dataset: BeirDataset,
    settings: Settings,
    *,
    limit: int | None = None,
    progress: Progress = _quiet,
    keep: Path | None = None,
) -> dict:
    """Index the corpus in a throw-away home and score dense, BM25 and hybrid on the split's queries."""
    query_ids = list(dataset.queries)[:limit] if limit else list(dataset.queries)
    corpus_ids = {document_key(doc_id): doc_id for doc_id in dataset.corpus}
    with throwaway_home(settings, keep) as scoped:
        retriever = open_retriever(scoped)
        started = time.perf_counter()
        chunks = indexed_chunks(retriever, corpus_ids)
        if chunks is None:
            chunks = index_corpus(retriever, dataset.corpus, progress)
        indexing_s = time.perf_counter() - started
        per_method: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
        started = time.perf_counter()
        for done, query_id in enumerate(query_ids, start=1):
            for method, chunk_ids in rankings(retriever, dataset.queries[query_id]).items():
                ranked = collapse(chunk_ids, lambda c: _document_of(c, corpus_ids))
                per_method[method].append(beir_metrics(ranked, dataset.qrels[query_id]))
            if done % 10 == 0 or done == len(query_ids):
                progress("querying", done, len(query_ids))
        querying_s = time.perf_counter() - started
    return {
        "dataset": dataset.name,
        "documents": len(dataset.corpus),
        "chunks": chunks,
        "queries": len(query_ids),
        "settings": _retrieval_settings(settings),
        "metrics": {method: mean(rows, BEIR_METRICS) for method, rows in per_method.items()},
        "indexing_s": round(indexing_s, 1),
        "querying_s": round(querying_s, 1),
        "warnings": dataset.warnings,
    }


def _retrieval_settings(settings: Settings) -> dict:
    r = settings.retrieval
    return {
        "rrf_k": r.rrf_k,
        "dense_weight": r.dense_weight,
        "keyword_weight": r.keyword_weight,
        "dense_candidates": r.dense_candidates,
        "keyword_candidates": r.keyword_candidates,
        "embedding_model": settings.embeddings.embedding_model_path or "all-MiniLM-L6-v2 (bundled)",
    }


# --- golden questions (sample_corpus/questions.yaml) ---------------------------------------------
def load_questions(path: Path) -> list[dict]:
    """The golden questions; each needs `question` and `document` (a path relative to the file's folder,
    or null for a question no document answers)."""
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise BadRequest(f"questions file {path} not found")
    try:
        questions = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise BadRequest(f"{path.name}: not valid YAML ({exc})") from None
    if not isinstance(questions, list) or not questions:
        raise BadRequest(f"{path.name}: expected a list of questions")
    for number, item in enumerate(questions, start=1):
        if not isinstance(item, dict) or not isinstance(item.get("question"), str) or not item["question"].strip():
            raise BadRequest(f"{path.name}: entry {number} has no 'question'")
        document = item.get("document")
        if document is not None and not (isinstance(document, str) and (path.parent / document).is_file()):
            raise BadRequest(f"{path.name}: entry {number} names document '{document}', which is not there")
    return questions


def evaluate_questions(
    path: Path, settings: Settings, *, limit: int | None = None, progress: Progress = _quiet, keep: Path | None = None
) -> dict:
    """Ingest every document the questions name (and their folders' neighbours) through the real Ingestor
    into a throw-away home; score hit@1, hit@5 and MRR@10 of the expected document per method."""
    from ingest.pipeline import Ingestor

    path = Path(path).expanduser().resolve()
    questions = load_questions(path)
    root = path.parent
    answerable = [q for q in questions if q.get("document")]
    answerable = answerable[:limit] if limit else answerable
    folders = sorted({(root / q["document"]).parent for q in questions if q.get("document")})
    files = sorted({p for folder in folders for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")})
    with throwaway_home(settings, keep) as scoped:
        retriever = open_retriever(scoped)
        ingestor = Ingestor(scoped, retriever.index, retriever.embedder)
        failed: dict[str, str] = {}
        sources: dict[str, str] = {}  # appliance document id -> path relative to the questions' folder
        started = time.perf_counter()
        try:
            for done, file in enumerate(files, start=1):
                relative = file.relative_to(root).as_posix()
                for result in ingestor.ingest_with_attachments(file, "sample", ["collection:sample"], source=str(file)):
                    if result.status == "failed":
                        failed[result.source] = result.reason
                    elif result.document_id:
                        sources[result.document_id] = relative  # an e-mail's attachments count as the e-mail
                progress("ingesting", done, len(files))
        finally:
            ingestor.parser.stop()
        indexing_s = time.perf_counter() - started
        per_method: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
        misses: list[dict] = []
        for done, item in enumerate(answerable, start=1):
            ranked_by = rankings(retriever, item["question"])
            for method, chunk_ids in ranked_by.items():
                ranked = collapse(chunk_ids, lambda c: sources.get(c.rsplit(":", 1)[0]))
                per_method[method].append(question_metrics(ranked, item["document"]))
                if method == "hybrid" and item["document"] not in ranked[:5]:
                    misses.append({"question": item["question"], "expected": item["document"], "got": ranked[:5]})
            progress("querying", done, len(answerable))
    return {
        "dataset": str(path),
        "documents": len(set(sources.values())),
        "failed": failed,
        "queries": len(answerable),
        "skipped": sum(1 for q in questions if not q.get("document")),
        "settings": _retrieval_settings(settings),
        "metrics": {method: mean(rows, QUESTION_METRICS) for method, rows in per_method.items()},
        "misses": misses,
        "indexing_s": round(indexing_s, 1),
    }


def table(report: dict) -> str:
    """method x metric, as the CLI prints it."""
    names = list(next(iter(report["metrics"].values())))
    lines = [f"{'method':<8}" + "".join(f"{name:>12}" for name in names)]
    for method, values in report["metrics"].items():
        lines.append(f"{method:<8}" + "".join(f"{values[name]:>12.4f}" for name in names))
    return "\n".join(lines)
