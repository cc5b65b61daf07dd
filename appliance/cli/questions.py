"""Questions from the command line: `search` ranks passages, `ask` answers with verified citations. Both read as
the local operator (everything), or with `--as USER` exactly what that user may read; `appliance.answers.asking` answers
them and writes their audit records."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import replace

from appliance.cli.common import print_json
from appliance.errors import ApplianceError
from appliance.services import Services


def access_as(services: Services, as_user: str | None):
    """The local operator reads everything; `--as USER` shows exactly what that user would see."""
    from appliance.access.rbac import OPERATOR, access_for_user

    return access_for_user(services.db, as_user) if as_user else OPERATOR


def actor_as(services: Services, as_user: str | None):
    """The local operator, reading what `--as USER` may read (the audit records name the operator, and
    `as_user`)."""
    from appliance.access.actors import Actor

    return replace(Actor.operator(), access=access_as(services, as_user))


def _where(item: dict) -> str:
    parts = [item["title"]]
    if item.get("page") is not None:
        parts.append(f"page {item['page']}")
    if item.get("section"):
        parts.append(item["section"])
    return ", ".join(parts)


def cmd_search(services: Services, args) -> int:
    from appliance.answers import asking

    actor = actor_as(services, args.as_user)
    hits = asking.search(services, actor, args.query, args.collection or None, args.top_k, as_user=args.as_user)
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
    from appliance.answers import asking
    from appliance.answers.rag import AnswerDone
    from appliance.inference.engine import Token

    actor = actor_as(services, args.as_user)

    async def run() -> AnswerDone | None:
        done = None
        try:
            asked = await asking.ask(
                services,
                actor,
                args.question,
                args.collection or None,
                model=args.model,
                top_k=args.top_k,
                as_user=args.as_user,
            )
            async for event in asked.events:
                if isinstance(event, Token) and not args.json:
                    print(event.text, end="", flush=True)
                elif isinstance(event, AnswerDone):
                    done = event
        finally:
            await services.aclose()  # the runners stop in the event loop that started them
        return done

    done = asyncio.run(run())
    if done is None:
        raise ApplianceError("no answer was produced")
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
