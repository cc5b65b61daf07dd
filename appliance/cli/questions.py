"""Questions from the command line: `search` ranks passages, `ask` answers with verified citations. Both read as
the local operator (everything), or with `--as USER` exactly what that user may read."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from appliance.cli.common import print_json, record_audit
from appliance.errors import ApplianceError, Forbidden, NotFound
from appliance.services import Services


def access_as(services: Services, as_user: str | None):
    """The local operator reads everything; `--as USER` shows exactly what that user would see."""
    from appliance.rbac import OPERATOR, access_for_user

    return access_for_user(services.db, as_user) if as_user else OPERATOR


def _where(item: dict) -> str:
    parts = [item["title"]]
    if item.get("page") is not None:
        parts.append(f"page {item['page']}")
    if item.get("section"):
        parts.append(item["section"])
    return ", ".join(parts)


def _question_audit(services: Services, args, text: str) -> dict[str, Any]:
    """What every CLI question's audit record carries besides its outcome."""
    details: dict[str, Any] = {"collections": args.collection or None, "as_user": args.as_user}
    if services.settings.audit_question_text:
        details["question"] = text
    return details


def cmd_search(services: Services, args) -> int:
    retriever = services.retriever
    target = ",".join(args.collection) if args.collection else None
    try:
        hits = retriever.search(args.query, access_as(services, args.as_user), args.collection or None, args.top_k)
    except (NotFound, Forbidden) as exc:
        details = _question_audit(services, args, args.query)
        record_audit(services, "search", target, outcome="denied", **details, reason=exc.message)
        raise
    details = _question_audit(services, args, args.query)
    record_audit(services, "search", target, **details, retrieved=[h.chunk_id for h in hits])
    results = [hit.public() for hit in hits]
    if args.json:
        print_json({"results": results})
        return 0
    if not results:
        print("no passages found")
    for rank, item in enumerate(results, start=1):
        print(f"{rank}. [{item['score']:.4f}] {_where(item)}  ({item['chunk_id'][:12]}…)")
        print(f"   {' '.join(item['text'].split())[:300]}")
    return 0


def cmd_ask(services: Services, args) -> int:
    from appliance import audit
    from appliance.inference.engine import Token
    from appliance.rag import AnswerDone

    settings = services.settings
    access = access_as(services, args.as_user)
    answerer = services.answerer

    async def run() -> AnswerDone | None:
        done = None
        try:
            async for event in answerer.ask(
                args.question, access, args.collection or None, model=args.model, top_k=args.top_k
            ):
                if isinstance(event, Token) and not args.json:
                    print(event.text, end="", flush=True)
                elif isinstance(event, AnswerDone):
                    done = event
        finally:
            await services.aclose()  # the runners stop in the event loop that started them
        return done

    target = ",".join(args.collection) if args.collection else None
    try:
        done = asyncio.run(run())
    except (NotFound, Forbidden) as exc:
        details = _question_audit(services, args, args.question)
        record_audit(services, "ask", target, outcome="denied", **details, reason=exc.message)
        raise
    if done is None:
        raise ApplianceError("no answer was produced")
    details = audit.ask_details(
        done,
        args.collection or None,
        question=args.question,
        keep_question=settings.audit_question_text,
        as_user=args.as_user,
    )
    record_audit(services, "ask", target, **details)
    if args.json:
        print_json({"answer": done.answer, **done.public()})
        return 0
    print()
    if done.citations:
        print("\nSources:")
        for citation in done.citations:
            print(f"  {citation.label()}")
            print(f'      "{" ".join(citation.quote.split())[:400]}"')
    for flag in done.flags:
        what = f"citation [{flag.number}] dropped" if flag.number else "not shown"
        print(f"  ({what}: {flag.reason})", file=sys.stderr)
    return 0


def register(sub) -> None:
    p = sub.add_parser("search", help="ranked passages for a query (as the local operator, or --as USER)")
    p.add_argument("query")
    p.add_argument("--collection", action="append", help="a collection to search (repeatable; default: all)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--as", dest="as_user", metavar="USER", help="see exactly what USER would see")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("ask", help="answer a question from the documents, with verified citations")
    p.add_argument("question")
    p.add_argument("--collection", action="append", help="a collection to ask (repeatable; default: all)")
    p.add_argument("--model", help="generation model (default: APPLIANCE_RAG_MODEL or the first installed)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--as", dest="as_user", metavar="USER", help="answer from exactly what USER may read")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ask)
