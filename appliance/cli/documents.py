"""Documents: ingest files and folders into a collection; list, show and remove documents; set who may read one."""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from appliance.cli.common import print_json, record_audit
from appliance.errors import BadRequest, NotFound
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
    from appliance.rbac import check_acl_subjects, ensure_collection
    from ingest.pipeline import parse_acl

    ensure_collection(services.db, args.collection)
    acl = parse_acl(args.acl, args.collection)
    check_acl_subjects(services.db, acl, args.collection)
    files = _walk(args.paths)
    # Parser processes share the cores with embedding: torch's OpenMP threads must sleep when they wait,
    # not spin, or they take the time parsing needs (set before torch is imported).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    ingestor = services.ingestor
    results = []
    console = Console(stderr=True)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True, disable=args.json) as bar:
        overall = bar.add_task("all files", total=len(files))
        current = bar.add_task("", total=3)
        stages = {"parsing": 0, "embedding": 1, "indexing": 2}

        def show_stage(stage: str, subject: str) -> None:
            bar.update(current, completed=stages[stage], description=f"  {stage} {subject[:40]}")

        ingestor.on_stage = show_stage
        try:
            for file_results in ingestor.ingest_many(
                ((path, str(path.resolve())) for path in files), args.collection, acl
            ):
                for result in file_results:
                    results.append(result)
                    record_audit(
                        services,
                        "upload",
                        args.collection,
                        outcome="failed" if result.status == "failed" else "ok",
                        source=result.source,
                        document_id=result.document_id,
                        result=result.status,
                        reason=result.reason or None,
                    )
                    if not args.json:
                        detail = f" ({result.chunks} chunks)" if result.status in ("added", "updated") else ""
                        reason = f": {result.reason}" if result.reason else ""
                        line = f"{result.status:<9} {result.source}{detail}{reason}"
                        console.print(line, markup=False, highlight=False)
                bar.advance(overall)
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
    from appliance.rbac import OPERATOR

    rows = [d.summary() for d in readable_documents(services.db, OPERATOR, args.collection)]
    if args.json:
        print_json(rows)
    else:
        for row in rows:
            print(
                f"{row['id'][:12]}  {row['collection']:<16} {row['filename']:<40} {row['chunks']:>5} chunks  "
                f"{row['status']}"
            )
    return 0


def _find_document(services: Services, prefix: str):
    from sqlmodel import select

    from appliance.db import Document, session

    if len(prefix) < 6 or not all(c in "0123456789abcdef" for c in prefix):
        raise BadRequest("give the document id (at least its first 6 hex characters)")
    with session(services.db) as db:
        matches = list(db.exec(select(Document).where(Document.id.startswith(prefix))))
    if not matches:
        raise NotFound(f"document {prefix} not found")
    if len(matches) > 1:
        raise BadRequest(f"document id {prefix} is ambiguous; give more characters")
    return matches[0]


def cmd_documents_show(services: Services, args) -> int:
    from sqlmodel import select

    from appliance.db import Chunk, session

    document = _find_document(services, args.id)
    with session(services.db) as db:
        chunks = list(db.exec(select(Chunk).where(Chunk.document_id == document.id).order_by(Chunk.position)))
    chunk_rows = [
        {"id": c.id, "page": c.page, "headings": c.headings, "start": c.start, "end": c.end, "characters": len(c.text)}
        for c in chunks
    ]
    print_json({**document.model_dump(mode="json"), "chunks": chunk_rows})
    return 0


def cmd_documents_rm(services: Services, args) -> int:
    document = _find_document(services, args.id)
    services.ingestor.remove(document.id)
    record_audit(services, "delete", document.id, collection=document.collection, filename=document.filename)
    print(f"removed {document.filename} ({document.id[:12]})")
    return 0


def cmd_documents_acl(services: Services, args) -> int:
    from appliance.rbac import check_acl_subjects
    from ingest.pipeline import parse_acl

    document = _find_document(services, args.id)
    acl = parse_acl(args.acl, document.collection)
    index = services.index
    check_acl_subjects(index.engine, acl, document.collection)
    index.set_acl(document.id, acl)
    record_audit(services, "acl_set", document.id, collection=document.collection, acl=acl, previous=document.acl)
    print(f"{document.filename} ({document.id[:12]}): readable by {', '.join(acl)}")
    return 0


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
    p = documents.add_parser("acl", help="set who may read one document (effective on the next request)")
    p.add_argument("id")
    p.add_argument("--acl", default="", help="user:NAME,group:NAME,... (empty: the collection's readers)")
    p.set_defaults(func=cmd_documents_acl)
