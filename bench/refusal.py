"""The refusal check (appliance/answers/answerability.py): collect its signals, refit its weights, measure its answers.

    .venv/bin/python bench/refusal.py collect --work DIR [--scifact ../shared/eval/scifact] [--evalset evalset]
    .venv/bin/python bench/refusal.py fit --work DIR [--sources scifact,golden,dev,evalset] [--features ...]
    .venv/bin/python bench/refusal.py ask --work DIR [--refusal calibrated|lexical]

`collect` indexes, into kept homes under DIR (reused by later runs):
  * SciFact `train` (BEIR format; CC BY-NC, for measurement only): the relevant abstracts of 300 claims (drawn
    with a fixed seed) and as much of the rest of the corpus as `--scifact-documents` allows. Each claim is
    searched twice: as it is (its relevant abstracts' passages are the ones that answer it) and with its
    relevant abstracts taken out of the results (nothing answers it: the same subject, other findings). The
    sample corpus's questions and the off-topic questions of bench/refusal_questions.yaml are asked of it too;
  * the sample corpus, two collections (hospital, lawfirm): its golden questions and
    bench/refusal_questions.yaml, each asked of its organisation's collection;
  * evalset/ (if there), both organisations in one collection as `appliance eval` ingests it: ONLY the
    entries with `split: tune`; the `test` half is dropped as the file is read, before anything else.
It writes, per question, the retrieved passages and the question's term counts (DIR/*.jsonl).
`fit` computes each passage's signals with the module's own code, fits a logistic regression (scikit-learn,
each source weighing the same), prints WEIGHTS and BIAS to paste into answerability.py, and the share of
each source's questions answered or refused at a few thresholds (a question is answered when one of its
passages scores at least the threshold).
`ask` runs the real `Answerer.ask` (no generation model: extractive) over the sample corpus's golden questions,
bench/refusal_questions.yaml and the evalset's tune half, and prints answered/refused per kind.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("APPLIANCE_EMBEDDING_BACKEND", "torch")  # the vectors every index here was built with

import yaml  # noqa: E402

from appliance.access.rbac import OPERATOR  # noqa: E402
from appliance.answers import answerability  # noqa: E402
from appliance.config import Settings  # noqa: E402
from appliance.retrieval.retrieve import Hit  # noqa: E402
from appliance.services import Services  # noqa: E402

SAMPLE = ROOT / "sample_corpus"
DEV = ROOT / "bench" / "refusal_questions.yaml"
CLAIMS = 300
FEATURES = ("sentence", "similarity", "coverage", "soft_coverage")


def tune_questions(evalset: Path) -> list[dict]:
    """The evalset's tune half; the test half is never kept."""
    entries = yaml.safe_load((evalset / "questions.yaml").read_text(encoding="utf-8")) or []
    return [q for q in entries if q.get("split") == "tune"]


def searched_text(item: dict) -> str:
    """What `Answerer.ask` searches with no generation model: a follow-up after the last question asked."""
    previous = [m["content"] for m in item.get("history") or [] if m.get("role") == "user" and m.get("content")]
    return f"{previous[-1]} {item['question']}"[-2000:] if previous else item["question"]


def sample_collection(item: dict) -> str:
    if item.get("collection"):
        return item["collection"]
    if item.get("document"):
        return item["document"].split("/")[0]
    return "lawfirm" if "Harrow & Vale" in item["question"] else "hospital"


# --- homes ---------------------------------------------------------------------------------------
def _home(work: Path, name: str) -> Settings:
    settings = Settings(home=work / name)
    settings.scheduler.default_model = False  # no generation model in these homes: `ask` answers extractively
    settings.ensure_dirs()
    return settings


def _sources(index) -> dict[str, str]:
    from sqlmodel import select

    from appliance.db import Document, session

    with session(index.engine) as db:
        return {d.id: d.source for d in db.exec(select(Document).where(Document.status == "indexed"))}


def _ingest(services: Services, folders: dict[str, list[Path]]) -> None:
    """Each collection's files through the real Ingestor, once (a home that holds documents is kept)."""
    if _sources(services.index):
        return
    ingestor = services.ingestor
    try:
        for collection, paths in folders.items():
            for folder in paths:
                for path in sorted(folder.iterdir()):
                    for result in ingestor.ingest_with_attachments(
                        path, collection, [f"collection:{collection}"], source=str(path)
                    ):
                        print(f"  {result.status} {result.source} {result.reason}", file=sys.stderr)
    finally:
        ingestor.close()


def _record(retriever, question: str, hits: list[Hit], scope: list[str] | None, **extra) -> dict:
    terms = answerability.question_terms(question)
    reach = retriever.scoped(OPERATOR, scope)
    total, holding = answerability.document_frequencies(retriever, terms, reach) if terms else (0, {})
    passages = [
        {k: getattr(h, k) for k in ("chunk_id", "document_id", "title", "section", "text", "similarity", "score")}
        for h in hits
    ]
    return dict(question=question, terms=terms, total=total, holding=holding, hits=passages, **extra)


# --- collect -------------------------------------------------------------------------------------
def collect(args) -> None:
    work = Path(args.work).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    dev = yaml.safe_load(DEV.read_text(encoding="utf-8"))
    golden = yaml.safe_load((SAMPLE / "questions.yaml").read_text(encoding="utf-8"))
    off_topic = [q["question"] for q in dev if q["kind"] == "off_topic"]

    with Services(_home(work, "sample")) as services:
        _ingest(services, {c: [SAMPLE / c] for c in ("hospital", "lawfirm")})
        retriever = services.retriever
        sources = _sources(services.index)
        with (work / "sample.jsonl").open("w") as out:
            for name, items in (("golden", golden), ("dev", dev)):
                for item in items:
                    kind = item.get("kind") or ("answerable" if item.get("document") else "on_topic")
                    collection = sample_collection(item)
                    hits = retriever.search(item["question"], OPERATOR, [collection])
                    relevant = [d for d, s in sources.items() if item.get("document") and item["document"] in s]
                    out.write(
                        json.dumps(
                            _record(
                                retriever,
                                item["question"],
                                hits,
                                [collection],
                                kind=kind,
                                relevant=relevant,
                                source=name,
                            )
                        )
                        + "\n"
                    )
    print("sample corpus: done", file=sys.stderr)

    evalset = Path(args.evalset)
    if (evalset / "questions.yaml").is_file():
        tune = tune_questions(evalset)  # the test half is dropped here, before anything else
        with Services(_home(work, "evalset")) as services:
            _ingest(services, {"sample": [evalset / "hospital", evalset / "lawfirm"]})
            retriever = services.retriever
            sources = _sources(services.index)
            with (work / "evalset.jsonl").open("w") as out:
                for item in tune:
                    searched = searched_text(item)
                    hits = retriever.search(searched, OPERATOR, None)
                    relevant = [d for d, s in sources.items() if item.get("document") and item["document"] in s]
                    out.write(
                        json.dumps(
                            _record(
                                retriever, searched, hits, None, kind=item["kind"], relevant=relevant, source="evalset"
                            )
                        )
                        + "\n"
                    )
        print(f"evalset tune half: {len(tune)} questions", file=sys.stderr)

    if args.scifact:
        from appliance.operations.evaluation import document_key, index_corpus, load_beir

        data = load_beir(Path(args.scifact), "train")
        claims = list(data.queries)
        random.Random(7).shuffle(claims)
        claims = claims[:CLAIMS]
        with Services(_home(work, "scifact")) as services:
            retriever = services.retriever
            if not _sources(services.index):
                needed = {d for q in claims for d, score in data.qrels[q].items() if score > 0 and d in data.corpus}
                others = [d for d in data.corpus if d not in needed][: max(0, args.scifact_documents - len(needed))]
                index_corpus(retriever, {d: data.corpus[d] for d in [*needed, *others]})
            with (work / "scifact.jsonl").open("w") as out:
                for claim in claims:
                    relevant = {document_key(d) for d, score in data.qrels[claim].items() if score > 0}
                    text = data.queries[claim]
                    hits = retriever.search(text, OPERATOR, None, 20)
                    out.write(
                        json.dumps(
                            _record(
                                retriever,
                                text,
                                hits[:6],
                                None,
                                kind="answerable",
                                relevant=sorted(relevant),
                                source="scifact",
                            )
                        )
                        + "\n"
                    )
                    rest = [h for h in hits if h.document_id not in relevant][:6]
                    out.write(
                        json.dumps(_record(retriever, text, rest, None, kind="on_topic", relevant=[], source="scifact"))
                        + "\n"
                    )
                for text in [q["question"] for q in golden] + off_topic:
                    hits = retriever.search(text, OPERATOR, None)
                    out.write(
                        json.dumps(
                            _record(retriever, text, hits, None, kind="off_topic", relevant=[], source="scifact")
                        )
                        + "\n"
                    )
        print(f"scifact: {len(claims)} claims", file=sys.stderr)


# --- fit -----------------------------------------------------------------------------------------
def _hit(row: dict) -> Hit:
    return Hit(
        row["chunk_id"],
        row["document_id"],
        "",
        row["title"],
        row["title"],
        None,
        row["section"],
        row["text"],
        0,
        0,
        row["score"],
        row["similarity"],
    )


def signals(work: Path) -> list[dict]:
    """Per question: its source, kind, and each passage's signals and label, computed by the module's code."""
    from appliance.retrieval.embeddings import SentenceEmbedder

    embedder = SentenceEmbedder(Settings().embeddings)
    questions = []
    for path in sorted(work.glob("*.jsonl")):
        for line in path.open():
            record = json.loads(line)
            if not record["hits"] or not record["terms"]:
                continue  # refused before any score (no terms; nothing retrieved)
            hits = [_hit(h) for h in record["hits"]]
            found = answerability.evidence(
                embedder, record["question"], hits, record["total"], record["holding"], record["terms"]
            )
            relevant = set(record["relevant"])
            questions.append(
                {
                    "source": record.get("source") or record.get("set") or path.stem,
                    "kind": record["kind"],
                    "question": record["question"],
                    "passages": [[getattr(e, f) for f in FEATURES] for e in found],
                    "labels": [int(record["kind"] == "answerable" and e.hit.document_id in relevant) for e in found],
                }
            )
    return questions


def fit(args) -> None:
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    work = Path(args.work).expanduser().resolve()
    if args.cached and (work / "signals.json").is_file():
        questions = json.loads((work / "signals.json").read_text())
    else:
        questions = signals(work)
        (work / "signals.json").write_text(json.dumps(questions))
    names = args.features.split(",")
    columns = [FEATURES.index(n) for n in names]
    sources = args.sources.split(",")
    rows = [(q["source"], p, label) for q in questions for p, label in zip(q["passages"], q["labels"], strict=True)]
    train = [r for r in rows if r[0] in sources]
    x = np.array([[r[1][c] for c in columns] for r in train])
    y = np.array([r[2] for r in train])
    counts = collections.Counter(r[0] for r in train)
    weight = np.array([len(train) / (len(counts) * counts[r[0]]) for r in train])  # each source weighs the same
    model = LogisticRegression(C=10.0).fit(x, y, sample_weight=weight)
    weights = {n: round(float(w), 3) for n, w in zip(names, model.coef_[0], strict=True)}
    bias = round(float(model.intercept_[0]), 3)
    print(f"WEIGHTS = {weights}\nBIAS = {bias}")
    print(f"(fitted on {dict(counts)} passages)")
    groups = collections.defaultdict(list)
    for q in questions:
        best = max(
            1 / (1 + np.exp(-(bias + sum(weights[n] * p[FEATURES.index(n)] for n in names)))) for p in q["passages"]
        )
        groups[(q["source"], q["kind"])].append(best)
    print("threshold  " + "  ".join(f"{s}/{k}" for s, k in sorted(groups)))
    for threshold in (0.3, 0.35, 0.4, 0.45, 0.5):
        cells = []
        for key in sorted(groups):
            answered = sum(score >= threshold for score in groups[key]) / len(groups[key])
            share = answered if key[1] == "answerable" else 1 - answered
            cells.append(f"{'answered' if key[1] == 'answerable' else 'refused'} {100 * share:.0f}%")
        print(f"{threshold:<10} " + "  ".join(cells))


# --- ask -----------------------------------------------------------------------------------------
def ask(args) -> None:
    from appliance.answers.rag import AnswerDone

    work = Path(args.work).expanduser().resolve()
    sets = {"sample": [], "evalset": []}
    for item in yaml.safe_load((SAMPLE / "questions.yaml").read_text(encoding="utf-8")):
        kind = "answerable" if item["document"] else "on_topic"
        sets["sample"].append(("golden", kind, item["question"], None, [sample_collection(item)], item["document"]))
    for item in yaml.safe_load(DEV.read_text(encoding="utf-8")):
        sets["sample"].append(("dev", item["kind"], item["question"], None, [item["collection"]], item.get("document")))
    if (Path(args.evalset) / "questions.yaml").is_file() and (work / "evalset").is_dir():
        for item in tune_questions(Path(args.evalset)):
            history = item.get("history") or None
            sets["evalset"].append(("evalset", item["kind"], item["question"], history, None, item.get("document")))
    totals = collections.defaultdict(collections.Counter)
    for home, items in sets.items():
        if not items:
            continue
        settings = _home(work, home)
        settings.retrieval.refusal = args.refusal
        services = Services(settings)  # its store holds no model (see _home): answers are extractive

        async def run(items=items, services=services):
            answerer = services.answerer
            for source, kind, question, history, scope, document in items:
                async for event in answerer.ask(question, OPERATOR, scope, history=history):
                    if isinstance(event, AnswerDone):
                        answered = event.mode != "not_found"
                        cited = (
                            answered
                            and bool(document)
                            and any(
                                Path(document).name in (c.title, c.title.split("#")[0])
                                or Path(document).stem in c.title
                                for c in event.citations
                            )
                        )
                        totals[(source, kind)].update({"questions": 1, "answered": answered, "cited expected": cited})
                        if args.verbose and answered != (kind == "answerable"):
                            print(f"  {source} {kind} {'answered' if answered else event.reason}: {question}")
            await services.aclose()

        asyncio.run(run())
    print(f"refusal={args.refusal}")
    for (source, kind), counts in sorted(totals.items()):
        n = counts["questions"]
        if kind == "answerable":
            print(
                f"  {source:8} {kind:10} {n:3}  answered {counts['answered']} ({100 * counts['answered'] / n:.0f}%), "
                f"citing the expected document {counts['cited expected']}"
            )
        else:
            refused = n - counts["answered"]
            print(f"  {source:8} {kind:10} {n:3}  refused {refused} ({100 * refused / n:.0f}%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("collect", "fit", "ask"):
        p = sub.add_parser(name)
        p.add_argument("--work", required=True, help="kept homes and collected questions")
        p.add_argument("--evalset", default=str(ROOT / "evalset"))
    sub.choices["collect"].add_argument("--scifact", help="a BEIR SciFact directory (../shared/eval/scifact)")
    sub.choices["collect"].add_argument("--scifact-documents", type=int, default=2000)
    sub.choices["fit"].add_argument("--sources", default="scifact,golden,dev,evalset")
    sub.choices["fit"].add_argument("--features", default="sentence,soft_coverage")
    sub.choices["fit"].add_argument("--cached", action="store_true", help="reuse the signals the last fit computed")
    sub.choices["ask"].add_argument("--refusal", default="calibrated", choices=["calibrated", "lexical"])
    sub.choices["ask"].add_argument("--verbose", action="store_true", help="print each question decided wrongly")
    args = parser.parse_args()
    {"collect": collect, "fit": fit, "ask": ask}[args.command](args)


if __name__ == "__main__":
    main()
