"""The search index: check that database, FTS and Chroma agree; rebuild them from the database's chunks."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from appliance.cli.common import print_json
from appliance.services import Services


def check(services: Services, as_json: bool = False) -> int:
    """Print what `index check` finds; 0 when clean, else 1 (also after `index rebuild` and `restore`)."""
    from appliance.retrieval.index import describe_embedder

    report = services.index.check()
    if as_json:
        print_json({**report.__dict__, "clean": report.clean})
    else:
        print(f"{report.documents} documents, {report.chunks} chunks: {'clean' if report.clean else 'MISMATCH'}")
        print(f"  vectors built by: {describe_embedder(report.embedder)}")
        for name, values in report.__dict__.items():
            if isinstance(values, list) and values:
                print(f"  {name.replace('_', ' ')}: {len(values)}: {', '.join(values[:5])}")
    return 0 if report.clean else 1


def cmd_index_check(services: Services, args) -> int:
    return check(services, as_json=args.json)


def cmd_index_rebuild(services: Services, args) -> int:
    """Re-embed every chunk with the configured backend ('auto': the fastest for a new index) and record it."""
    from appliance.retrieval.embeddings import SentenceEmbedder

    settings = services.settings
    index = services.index
    embedder = SentenceEmbedder(settings.embeddings, home=settings.home)  # 'auto' as for a new index
    columns = [TextColumn("re-embedding"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("chunks", total=None)
        count = index.rebuild(
            lambda texts: embedder.encode(texts).vectors,
            embedder=embedder.fingerprint,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    print(f"rebuilt the keyword and vector indexes: {count} chunks, embedded by {embedder.backend}")
    return check(services)


def register(sub) -> None:
    index = sub.add_parser("index", help="the search index").add_subparsers(dest="action", required=True)
    p = index.add_parser("check", help="compare database, FTS and Chroma (exit 1 on any mismatch)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_index_check)
    p = index.add_parser("rebuild", help="rebuild FTS and Chroma from the database's chunks")
    p.set_defaults(func=cmd_index_rebuild)
