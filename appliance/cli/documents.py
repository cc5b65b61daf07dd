"""Documents: ingest files and folders into a collection; list, show and remove documents; set who may read one."""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from appliance.access.actors import Actor
from appliance.cli.common import print_json
from appliance.services import Services


def _walk(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")))
        else:
            files.append(path)
    return files


def cmd_ingest(services: Services, args) -> int:
    from appliance import documents

    files = _walk(args.paths)
    # Parser processes share the cores with embedding: torch's OpenMP threads must sleep when they wait,
    # not spin, or they take the time parsing needs (set before torch is imported).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    console = Console(stderr=True)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True, disable=args.json) as bar:
        overall = bar.add_task("all files", total=len(files))
        current = bar.add_task("", total=3)
        stages = {"parsing": 0, "embedding": 1, "indexing": 2}

        def show_stage(stage: str, subject: str) -> None:
            bar.update(current, completed=stages[stage], description=f"  {stage} {subject[:40]}")

        def show_file(file_results) -> None:
            for result in file_results:
                if not args.json:
                    detail = f" ({result.chunks} chunks)" if result.status in ("added", "updated") else ""
                    reason = f": {result.reason}" if result.reason else ""
                    line = f"{result.status:<9} {result.source}{detail}{reason}"
                    console.print(line, markup=False, highlight=False)
            bar.advance(overall)

        ingestor = services.ingestor
        ingestor.on_stage = show_stage
        try:
            results = documents.ingest_files(
                services.db, ingestor, Actor.operator(), files, args.collection, args.acl, show_file
            )
        finally:
            ingestor.close()
    counts = {
        status: sum(1 for r in results if r.status == status) for status in ("added", "unchanged", "updated", "failed")
    }
    if args.json:
        print_json({"counts": counts, "documents": [r.__dict__ for r in results]})
    else:
        print(", ".join(f"{count} {status}" for status, count in counts.items()))
    return 1 if counts["failed"] else 0


def cmd_documents_list(services: Services, args) -> int:
    from appliance.documents import readable_documents

    rows = [d.summary() for d in readable_documents(services.db, Actor.operator().access, args.collection)]
    if args.json:
        print_json(rows)
    else:
        for row in rows:
            print(
                f"{row['id'][:12]}  {row['collection']:<16} {row['filename']:<40} {row['chunks']:>5} chunks  "
                f"{row['status']}"
            )
    return 0


def cmd_documents_show(services: Services, args) -> int:
    from appliance import documents

    operator = Actor.operator()
    document = documents.find_document(services.db, operator, args.id)
    chunk_rows = [
        {"id": c.id, "page": c.page, "headings": c.headings, "start": c.start, "end": c.end, "characters": len(c.text)}
        for c in documents.document_chunks(services.db, operator, document)
    ]
    print_json({**document.model_dump(mode="json"), "chunks": chunk_rows})
    return 0


def cmd_documents_rm(services: Services, args) -> int:
    from appliance import documents

    operator = Actor.operator()
    found = documents.find_document(services.db, operator, args.id)
    document = documents.delete_document(services.db, services.ingestor, operator, found.id)
    print(f"removed {document.filename} ({document.id[:12]})")
    return 0


def cmd_documents_acl(services: Services, args) -> int:
    from appliance import documents

    operator = Actor.operator()
    found = documents.find_document(services.db, operator, args.id)
    document, acl = documents.set_document_acl(services.db, services.index, operator, found.id, args.acl)
    print(f"{document.filename} ({document.id[:12]}): readable by {', '.join(acl)}")
    return 0


def cmd_documents_reparse(services: Services, args) -> int:
    from appliance import documents

    operator = Actor.operator()
    ids = [documents.find_document(services.db, operator, prefix).id for prefix in args.ids]

    def show(result) -> None:
        if args.json:
            return
        d = result.document
        detail = f"{result.chunks_before} -> {result.chunks_after} passages" if result.status == "reparsed" else ""
        print(f"{result.status:<9} {d.collection}/{d.filename} ({d.id[:12]}) {detail or result.reason}".rstrip())

    results = documents.reparse_documents(
        services.db, services.ingestor, operator, args.collection, ids or None, on_result=show
    )
    summary = {status: sum(r.status == status for r in results) for status in ("reparsed", "unchanged", "failed")}
    if args.json:
        rows = [
            {
                "id": r.document.id,
                "collection": r.document.collection,
                "filename": r.document.filename,
                "status": r.status,
                "chunks_before": r.chunks_before,
                "chunks_after": r.chunks_after,
                "reason": r.reason,
            }
            for r in results
        ]
        print_json({"documents": rows, **summary})
    else:
        print(", ".join(f"{count} {status}" for status, count in summary.items()))
    return 1 if summary["failed"] else 0


def register(sub) -> None:
    p = sub.add_parser("ingest", help="ingest files and folders into a collection")
    p.add_argument("paths", nargs="+")
    p.add_argument("--collection", required=True)
    p.add_argument("--acl", help="who may read them: group:NAME,user:NAME (default: the collection's readers)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ingest)

    documents = sub.add_parser("documents", help="ingested documents").add_subparsers(dest="action", required=True)
    p = documents.add_parser("list")
    p.add_argument("--collection")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_documents_list)
    p = documents.add_parser("show")
    p.add_argument("id")
    p.set_defaults(func=cmd_documents_show)
    p = documents.add_parser("rm")
    p.add_argument("id")
    p.set_defaults(func=cmd_documents_rm)
    p = documents.add_parser(
        "reparse",
        help="parse indexed documents again from their stored originals with this version's parser "
        "(after an upgrade); unchanged ones are left as they are",
    )
    p.add_argument("ids", nargs="*", help="document ids (or unique prefixes); default: every document")
    p.add_argument("--collection")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_documents_reparse)
    p = documents.add_parser("acl", help="set who may read one document (effective on the next request)")
    p.add_argument("id")
    p.add_argument("--acl", default="", help="user:NAME,group:NAME,... (empty: the collection's readers)")
    p.set_defaults(func=cmd_documents_acl)
