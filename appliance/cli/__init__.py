"""The `appliance` command: the same services as the web, split by noun.

Each module of this package owns one noun's commands and their part of the parser (`register`). Every command
has one shape: `cmd_*(services, args) -> exit status`; `main` opens the home's `Services` (nothing is built
until a command uses it), runs the command, closes them, and turns a domain error into a message and exit 1.

Model-store commands (create, list, show, rm, cp) work on APPLIANCE_HOME directly; commands that need loaded
models (run, ps, stop) talk to the running server (see `server.py` for how they find and authenticate to it).
Heavy libraries (sqlalchemy, torch, chromadb, llama_cpp, unstructured) are imported inside the commands that
use them, so that `appliance --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from appliance.cli import (
    access,
    audit,
    backup,
    bundle,
    chat,
    cluster,
    config,
    documents,
    evaluate,
    index,
    models,
    questions,
    server,
    users,
)
from appliance.cli.common import open_services
from appliance.config import load_settings
from appliance.errors import ApplianceError

# In the order `appliance --help` lists them.
NOUNS = (
    server,
    models,
    chat,
    users,
    access,
    documents,
    index,
    questions,
    evaluate,
    audit,
    backup,
    bundle,
    config,
    cluster,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description="Private knowledge appliance")
    sub = parser.add_subparsers(dest="command", required=True)
    for noun in NOUNS:
        noun.register(sub)
    return parser


def _setting_errors(exc: ValidationError) -> str:
    """A setting's validation errors in one line, each named by its environment variable."""
    problems = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        loc = "_".join(str(part) for part in error["loc"]).upper()
        problems.append(message if not loc or message.startswith("APPLIANCE_") else f"APPLIANCE_{loc}: {message}")
    return "invalid setting: " + "; ".join(problems)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except ValidationError as exc:
        print(f"error: {_setting_errors(exc)}", file=sys.stderr)
        return 1
    try:
        with open_services(settings) as services:
            return int(args.func(services, args) or 0)
    except ApplianceError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
