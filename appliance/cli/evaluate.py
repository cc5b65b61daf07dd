"""`appliance eval`: retrieval quality on a BEIR dataset or golden questions, and the golden questions' answers."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from appliance.cli.common import print_json
from appliance.errors import BadRequest
from appliance.operations import evaluation
from appliance.services import Services


def cmd_eval(services: Services, args) -> int:
    """Retrieval quality on a BEIR dataset or on golden questions, in a throw-away index; with `--answers`, the
    golden questions' answers too (extractive and/or generated, as `appliance ask` answers)."""
    settings = services.settings
    if args.limit is not None and args.limit < 1:
        raise BadRequest("--limit must be at least 1")
    dataset = Path(args.dataset).expanduser() if args.dataset else None
    questions = Path(args.questions).expanduser() if args.questions else None
    if dataset is not None and not (dataset / "corpus.jsonl").exists() and (dataset / "questions.yaml").is_file():
        dataset, questions = None, dataset / "questions.yaml"  # `--dataset sample_corpus` means its questions
    answers = args.answers or args.mode is not None or args.model is not None
    modes = evaluation.ANSWER_MODES if args.mode in (None, "both") else (args.mode,)
    if dataset is not None and answers:
        raise BadRequest("--answers needs a question file (--questions); a BEIR dataset has no expected answers")
    if questions is not None and args.split is not None:
        evaluation.select_questions([], args.split)  # tune or test, else a clear error before any work
    data = evaluation.load_beir(dataset, args.split or "test") if dataset is not None else None
    workdir = Path(args.workdir).expanduser() if args.workdir else None
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=True, disable=args.json) as bar:
        tasks: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        if data is not None:
            report = evaluation.evaluate_beir(data, settings, limit=args.limit, progress=progress, keep=workdir)
            report["split"] = args.split or "test"
        else:
            assert questions is not None
            report = evaluation.evaluate_questions(
                questions,
                settings,
                split=args.split,
                limit=args.limit,
                progress=progress,
                answers=modes if answers else (),
                model=args.model,
            )
    if args.json:
        print_json(report)
        return 0
    what = f"{report['dataset']} ({report['split']})" if report.get("split") else report["dataset"]
    print(f"{what}: {report['queries']} queries, {report['documents']} documents")
    print(evaluation.table(report))
    if "answers" in report:
        counts = report["answers"]["questions"]
        print()
        print(
            f"answers: {counts['answerable']} answerable ({counts['with_fact']} with a fact), "
            f"{counts['on_topic']} on-topic and {counts['off_topic']} off-topic unanswerable, "
            f"{counts['follow_ups']} follow-ups"
        )
        print(evaluation.answer_table(report["answers"]))
        for mode, summary in report["answers"]["modes"].items():
            refused, near = summary["metrics"]["answerable_refused"], summary["metrics"]["refused_closest_expected"]
            if refused["count"]:
                print(
                    f"{mode}: {near['count']} of the {refused['count']} answerable questions refused link a passage "
                    "of the expected document as the closest"
                )
        misses = evaluation.answer_misses(report["answers"])
        if misses:
            print("\nwrong answers:")
            for line in misses:
                print(f"  {line}")
    for warning in report.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    for source, reason in report.get("failed", {}).items():
        print(f"not indexed: {source}: {reason}", file=sys.stderr)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="retrieval quality (nDCG@10, recall, MRR; hit@5) on a BEIR dataset or golden questions; their answers",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="a BEIR directory: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv")
    source.add_argument("--questions", help="a golden-question file such as sample_corpus/questions.yaml")
    p.add_argument(
        "--split",
        help="qrels split of a BEIR dataset (default: test); of a question file, tune or test (default: all)",
    )
    p.add_argument("--limit", type=int, help="evaluate only the first N queries (a quick run)")
    p.add_argument(
        "--answers",
        action="store_true",
        help="question files: also answer every question as `appliance ask` does, and score the answers",
    )
    p.add_argument(
        "--mode",
        choices=["extractive", "generated", "both"],
        help="with --answers (implies it): no generation model, the bundled default model, or both (default)",
    )
    p.add_argument(
        "--model",
        help="with --answers (implies it): write the generated answers with this model of the home's store "
        "instead of the bundled default (to measure a larger GGUF on your own questions)",
    )
    p.add_argument(
        "--workdir",
        help="keep the BEIR index in this directory instead of a temporary one; a later run reuses it (tuning)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)
