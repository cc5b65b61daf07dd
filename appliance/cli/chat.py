"""`appliance run`: chat with a model in the terminal, through the running server."""

from __future__ import annotations

import json
import sys
from typing import Any

from appliance.cli.server import ServerClient
from appliance.errors import ApplianceError, BadRequest
from appliance.models.modelfile import coerce_parameter
from appliance.services import Services

RUN_HELP = """Commands:
  /set parameter NAME VALUE   set a model option (e.g. temperature 0.2, num_predict 128)
  /set system TEXT            set the system message
  /show parameters            show the options set in this session
  /save NAME                  save the model with this session's options and system message as NAME
  /clear                      forget the conversation
  /bye                        exit"""


def cmd_run(services: Services, args) -> int:
    client = ServerClient(services.settings)
    if not args.name:
        from appliance.models.default_model import generation_model

        record = generation_model(services.store, services.settings.retrieval.rag_model)
        if record is None:
            raise BadRequest("no generation model is installed: name one, or `appliance models install-default`")
        args.name = record.name.display
    options: dict[str, Any] = {}
    system: str | None = None
    history: list[dict[str, str]] = []
    client.call("POST", "/api/chat", {"model": args.name, "messages": [], "stream": False})  # load or fail early

    def ask(text: str) -> None:
        messages = (
            ([{"role": "system", "content": system}] if system else []) + history + [{"role": "user", "content": text}]
        )
        reply: list[str] = []
        for item in client.stream("/api/chat", {"model": args.name, "messages": messages, "options": options}):
            piece = item.get("message", {}).get("content", "")
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n\n")
        history.extend([{"role": "user", "content": text}, {"role": "assistant", "content": "".join(reply)}])

    if args.prompt:
        ask(" ".join(args.prompt))
        return 0
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/bye", "/exit"):
            break
        if text in ("/?", "/help"):
            print(RUN_HELP)
        elif text.startswith("/set parameter "):
            parts = text.split(None, 3)
            if len(parts) < 4:
                print("usage: /set parameter NAME VALUE")
                continue
            try:
                name = parts[2]
                options[name] = coerce_parameter(name, parts[3].split() if name == "stop" else parts[3])
                print(f"Set parameter '{name}' to '{parts[3]}'")
            except ApplianceError as exc:
                print(f"error: {exc.message}")
        elif text.startswith("/set system "):
            system = text.removeprefix("/set system ").strip()
            print("Set system message.")
        elif text == "/show parameters":
            print(json.dumps(options, indent=2) if options else "no parameters set in this session")
        elif text.startswith("/save "):
            target = text.split(None, 1)[1].strip()
            body: dict[str, Any] = {"model": target, "from": args.name, "parameters": options, "stream": False}
            if system:
                body["system"] = system
            try:
                client.call("POST", "/api/create", body)
                print(f"Created new model '{target}'")
            except ApplianceError as exc:
                print(f"error: {exc.message}")
        elif text == "/clear":
            history.clear()
            print("Cleared session context")
        elif text.startswith("/"):
            print(f"Unknown command '{text.split()[0]}'. Type /? for help")
        else:
            try:
                ask(text)
            except ApplianceError as exc:
                print(f"error: {exc.message}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("run", help="chat with a model in the terminal (through the server)")
    p.add_argument("name", nargs="?", help="default: the model that answers questions (APPLIANCE_RAG_MODEL, ...)")
    p.add_argument("prompt", nargs="*")
    p.set_defaults(func=cmd_run)
