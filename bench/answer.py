"""Answer time and quality with the default model (SmolLM2-135M-Instruct), beside llama-cpp-python direct.

    .venv/bin/python bench/answer.py [--passages 1 2 3 4] [--max-tokens 96 160] [--limit N]

Ingests the sample corpus (hospital and law firm, one collection each) into a throw-away home, then asks its
golden questions that a document answers, through `Answerer.ask` as `appliance ask` and `/api/rag/ask` do
(retrieval, the refusal gate, the answer grammar, the runner process with its prompt cache, attribution and
verification), greedy (temperature 0). The questions are split in two halves by position: `tune` (even
positions), on which the passage budget and the answer length were chosen, and `test` (odd), reported apart.

For each (passages, max tokens) setting and question it records: time to the first streamed token and to the
whole answer; retrieval, prompt processing and generation time (the runner's own counts); whether the
answer cites the expected document with a verified citation; whether the expected fact is in the answer (the
model's text or a verified quote); whether the model's own sentence verified (mode "generated").

Baseline, in the same run, for the chosen setting: llama-cpp-python called directly (`Llama` in this
process, the same threads and context) with exactly the prompt the runner got (same passages, same chat
template, same grammar, greedy), timed to its first token and to its end. The overhead is the appliance's
answer time after retrieval over the direct call's time. Prints tables; writes bench/out/answer.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))] if ordered else float("nan")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def ingest(home: Path) -> None:
    env = dict(os.environ, APPLIANCE_HOME=str(home), HF_HUB_OFFLINE="1")
    appliance = str(Path(sys.executable).with_name("appliance"))
    for collection in ("hospital", "lawfirm"):
        subprocess.run(
            [appliance, "ingest", str(ROOT / "sample_corpus" / collection), "--collection", collection],
            env=env,
            check=True,
            capture_output=True,
        )


def load_questions(limit: int | None) -> list[dict]:
    items = yaml.safe_load((ROOT / "sample_corpus" / "questions.yaml").read_text())
    answerable = [q for q in items if q.get("document") and q.get("answer")]
    for position, item in enumerate(answerable):
        item["half"] = "tune" if position % 2 == 0 else "test"
    return answerable[:limit] if limit else answerable


class Bench:
    def __init__(self, home: Path):
        from appliance.cli.common import open_services
        from appliance.cli.questions import access_as
        from appliance.config import load_settings
        from appliance.models.default_model import DEFAULT_MODEL_NAME

        os.environ["APPLIANCE_HOME"] = str(home)
        self.settings = load_settings()
        self.services = open_services(self.settings)  # the home's core, as `appliance ask` opens it
        self.store = self.services.store
        self.record = self.store.resolve(DEFAULT_MODEL_NAME)
        self.retriever = self.services.retriever
        self.access = access_as(self.services, None)
        self.scheduler = self.services.scheduler
        self.engine = self.services.engine
        self.answerer = self.services.answerer
        self.threads = self.scheduler.hardware.physical_cores

    async def ask(self, item: dict, passages: int, max_tokens: int, penalty: float | None = None) -> dict:
        from appliance.answers.rag import AnswerDone
        from appliance.inference.engine import Token

        self.answerer.settings = self.settings.retrieval.model_copy(
            update={"answer_passages": passages, "answer_max_tokens": max_tokens}
        )
        collection = item["document"].split("/")[0]
        started = time.perf_counter()
        first = None
        done = None
        options = {"temperature": 0} | ({"repeat_penalty": penalty} if penalty is not None else {})
        async for event in self.answerer.ask(item["question"], self.access, [collection], options=options):
            if isinstance(event, Token) and first is None:
                first = time.perf_counter() - started
            elif isinstance(event, AnswerDone):
                done = event
        total = time.perf_counter() - started
        assert done is not None
        expected = Path(item["document"]).name
        quotes = " ".join(c.quote for c in done.citations)
        timings = done.timings
        return {
            "question": item["question"],
            "half": item["half"],
            "mode": done.mode,
            "ttft_s": first,
            "total_s": total,
            "retrieval_s": timings.get("retrieval_duration", 0) / 1e9,
            "prompt_s": timings.get("prompt_eval_duration", 0) / 1e9,
            "generation_s": timings.get("eval_duration", 0) / 1e9,
            "prompt_tokens": timings.get("prompt_eval_count", 0),
            "cached_tokens": timings.get("prompt_cache_count", 0),
            "generated_tokens": timings.get("eval_count", 0),
            "cites_expected": any(c.title == expected for c in done.citations),
            "fact": item["answer"].lower() in (done.answer + " " + quotes).lower(),
            "model_sentence_verified": done.mode == "generated" and done.grounded,
            "answer": done.answer,
        }

    def prompt_for(self, item: dict, passages: int, max_tokens: int) -> str | None:
        """The exact prompt the runner got for this question (None when the gate refused it)."""
        from appliance.inference.engine import GenerationRequest

        self.answerer.settings = self.settings.retrieval.model_copy(
            update={"answer_passages": passages, "answer_max_tokens": max_tokens}
        )
        collection = [item["document"].split("/")[0]]
        scope = self.retriever.scoped(self.access, collection)
        hits = self.retriever.search(item["question"], self.access, scope=scope)
        supporting = self.answerer.supporting(item["question"], hits, scope)
        if not supporting:
            return None
        options = {"num_predict": max_tokens}
        used, _n_ctx = self.answerer._fit_passages(self.record, item["question"], supporting, options)
        request = GenerationRequest(
            model=self.record.name.display, messages=self.answerer.messages(item["question"], used, None)
        )
        return self.engine._prompt(self.record, request)


def direct_baseline(bench: Bench, prompts: list[str], max_tokens: int, penalty: float) -> list[dict]:
    """llama-cpp-python in this process, the same prompt, grammar, context and threads, greedy."""
    import llama_cpp
    from llama_cpp.llama_grammar import LlamaGrammar

    from appliance.answers.rag import ANSWER_GRAMMAR
    from appliance.inference import cpu_path

    with cpu_path.model_params_with_extra_buffers(cpu_path.extra_buffers_enabled("auto")):
        llm = llama_cpp.Llama(
            str(bench.record.model_path),
            n_ctx=int(bench.record.parameters.get("num_ctx", 2048)),
            n_threads=bench.threads,
            n_threads_batch=bench.threads,
            verbose=False,
        )
    results = []
    for prompt in prompts:
        grammar = LlamaGrammar.from_string(ANSWER_GRAMMAR, verbose=False)
        started = time.perf_counter()
        first = None
        pieces = []
        for chunk in llm.create_completion(
            prompt, max_tokens=max_tokens, temperature=0, repeat_penalty=penalty, grammar=grammar, stream=True
        ):
            pieces.append(chunk["choices"][0]["text"])
            if first is None:
                first = time.perf_counter() - started
        total = time.perf_counter() - started
        tokens = len(llm.tokenize("".join(pieces).encode(), add_bos=False, special=True))
        results.append({"ttft_s": first, "total_s": total, "tokens": tokens})
    return results


def summary(rows: list[dict]) -> dict:
    n = len(rows)
    return {
        "n": n,
        "cites_expected": sum(r["cites_expected"] for r in rows) / n,
        "fact": sum(r["fact"] for r in rows) / n,
        "model_sentence_verified": sum(r["model_sentence_verified"] for r in rows) / n,
        "ttft_p50": percentile([r["ttft_s"] for r in rows], 0.5),
        "ttft_p95": percentile([r["ttft_s"] for r in rows], 0.95),
        "total_p50": percentile([r["total_s"] for r in rows], 0.5),
        "total_p95": percentile([r["total_s"] for r in rows], 0.95),
        "retrieval_p50": percentile([r["retrieval_s"] for r in rows], 0.5),
        "prompt_p50": percentile([r["prompt_s"] for r in rows], 0.5),
        "generation_p50": percentile([r["generation_s"] for r in rows], 0.5),
    }


def main() -> int:
    return asyncio.run(run())


async def run() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, nargs="+", default=[3])
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[160])
    parser.add_argument("--limit", type=int, default=None, help="ask only the first N questions")
    parser.add_argument("--home", help="an existing home with the sample corpus ingested (default: a new one)")
    args = parser.parse_args()

    from appliance.inference import cpu_path

    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="bench-answer-"))
    if not args.home:
        ingest(home)
    bench = Bench(home)
    questions = load_questions(args.limit)
    print(f"CPU: {cpu_name()}, {bench.threads} threads; {cpu_path.current('auto').describe()}")
    print(f"load average before: {os.getloadavg()[0]:.2f}; {len(questions)} questions")

    await bench.ask(questions[0], args.passages[0], args.max_tokens[0])  # the runner loads, as a warm server's has
    report: dict = {"cpu": cpu_name(), "threads": bench.threads, "settings": {}}
    print(
        "\npassages max_tok half  n  cites-doc  fact  model-verified  ttft p50/p95 s  total p50/p95 s  "
        "retrieval / prompt / generation p50 s"
    )
    for passages in args.passages:
        for max_tokens in args.max_tokens:
            rows = [await bench.ask(q, passages, max_tokens) for q in questions]
            report["settings"][f"{passages}x{max_tokens}"] = rows
            for half in ("tune", "test"):
                s = summary([r for r in rows if r["half"] == half])
                print(
                    f"{passages:>8} {max_tokens:>7} {half:<5} {s['n']:>2}  {s['cites_expected']:>9.0%}"
                    f" {s['fact']:>5.0%}"
                    f"  {s['model_sentence_verified']:>14.0%}  {s['ttft_p50']:>5.2f} / {s['ttft_p95']:<5.2f}"
                    f"  {s['total_p50']:>6.2f} / {s['total_p95']:<6.2f}  {s['retrieval_p50']:.3f} / "
                    f"{s['prompt_p50']:.3f} / {s['generation_p50']:.3f}"
                )

    passages, max_tokens = args.passages[-1], args.max_tokens[-1]
    prompts = [(q, bench.prompt_for(q, passages, max_tokens)) for q in questions]
    prompts = [(q, p) for q, p in prompts if p is not None]
    # Both sides without the repeat penalty (the runner and llama-cpp-python apply it to different histories),
    # so that greedy decoding under the same grammar writes the same tokens and the times compare.
    ours = [await bench.ask(q, passages, max_tokens, penalty=1.0) for q, _ in prompts]
    direct = direct_baseline(bench, [p for _, p in prompts], max_tokens, penalty=1.0)
    same = [(o, d) for o, d in zip(ours, direct, strict=True) if abs(o["generated_tokens"] - d["tokens"]) <= 1]
    our_ttft = [o["ttft_s"] - o["retrieval_s"] for o, _ in same]
    our_after_retrieval = [o["total_s"] - o["retrieval_s"] for o, _ in same]
    direct_ttft = [d["ttft_s"] for _, d in same]
    direct_total = [d["total_s"] for _, d in same]
    print(
        f"\nBaseline, {len(prompts)} answered questions ({len(same)} with the same tokens written by both, give or "
        f"take one, compared), {passages} passages, {max_tokens} tokens at most (s):"
    )
    print("                                   first token p50/p95   whole answer p50/p95")
    for label, ttft, whole in (
        ("appliance (after retrieval)", our_ttft, our_after_retrieval),
        ("llama-cpp-python direct", direct_ttft, direct_total),
    ):
        print(
            f"{label:<35} {percentile(ttft, 0.5):>6.2f} / {percentile(ttft, 0.95):<6.2f}"
            f"        {percentile(whole, 0.5):>6.2f} / {percentile(whole, 0.95):<6.2f}"
        )
    overhead = statistics.median(o / d - 1 for o, d in zip(our_after_retrieval, direct_total, strict=True))
    print(f"overhead of the appliance over direct (median per question, whole answer after retrieval): {overhead:+.1%}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    report["baseline"] = {"ours": ours, "direct": direct, "overhead": overhead}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "answer.json").write_text(json.dumps(report, indent=2, default=str))
    await bench.services.aclose()  # the runner
    return 0


if __name__ == "__main__":
    sys.exit(main())
