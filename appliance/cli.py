"""The `appliance` command: the same services as the web, split by noun.

Model-store commands (create, list, show, rm, cp) work on APPLIANCE_HOME directly; commands that
need loaded models (run, ps, stop) talk to the running server, authenticated with APPLIANCE_API_KEY
or the local CLI token the server leaves in APPLIANCE_HOME/run (readable only by its own OS user).
They find the server at APPLIANCE_URL, else at the address it wrote in APPLIANCE_HOME/run/server.url,
else at APPLIANCE_HOST and APPLIANCE_PORT.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from appliance import __version__
from appliance.config import Settings, load_settings
from appliance.errors import ApplianceError, BadRequest

log = logging.getLogger("appliance")


# --- helpers -------------------------------------------------------------------------------------
def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _store(settings: Settings):
    from appliance.models.default_model import ensure_default_model
    from appliance.models.store import ModelStore

    settings.ensure_dirs()
    store = ModelStore(settings.models_dir)
    try:
        ensure_default_model(store, settings.scheduler.default_model)
    except ApplianceError as exc:  # a damaged package must not stop `rm`, `create` or `doctor`
        print(f"warning: {exc.message}", file=sys.stderr)
    return store


def _db(settings: Settings):
    from appliance.db import create_db_engine

    settings.ensure_dirs()
    return create_db_engine(settings.resolved_database_url)


def _audit(engine, action: str, target: str | None = None, *, outcome: str = "ok", **details: Any) -> None:
    """An audit record of something the local operator did (the CLI acts as the local operator)."""
    from appliance import audit

    audit.record(engine, audit.LOCAL_OPERATOR, action, actor_id=0, target=target, outcome=outcome, details=details)


def server_url(settings: Settings) -> tuple[str, str]:
    """(URL of the running server, where it came from): APPLIANCE_URL, else what the server of this home wrote
    in its run directory, else APPLIANCE_HOST and APPLIANCE_PORT."""
    if settings.server.url:
        return settings.server.url, "APPLIANCE_URL"
    path = settings.server_url_file
    written = path.read_text().strip() if path.is_file() else ""
    if written:
        return written, f"written by the server in {path}"
    return settings.server.local_url, "APPLIANCE_HOST and APPLIANCE_PORT"


class ServerClient:
    """A small HTTP client for the running server (used by run, ps, stop)."""

    def __init__(self, settings: Settings):
        import httpx

        self.base, self.source = server_url(settings)
        key = os.environ.get("APPLIANCE_API_KEY")
        token_file = settings.run_dir / "cli.token"
        if not key and token_file.is_file():
            key = token_file.read_text().strip()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            self.http = httpx.Client(base_url=self.base, headers=headers, timeout=httpx.Timeout(600, connect=5))
        except httpx.InvalidURL as exc:
            raise BadRequest(f"{self.base!r} ({self.source}) is not a usable URL: {exc}") from None

    def _unreachable(self) -> str:
        return (
            f"could not reach the server at {self.base} ({self.source}); start it with `appliance serve`, "
            "or say where it runs with APPLIANCE_URL"
        )

    def _check(self, response) -> None:
        if response.status_code >= 400:
            try:
                message = response.json().get("error") or response.text
            except ValueError:
                message = response.text
            error = ApplianceError(str(message))
            error.status = response.status_code
            raise error

    def call(self, method: str, path: str, body: dict | None = None) -> Any:
        import httpx

        try:
            response = self.http.request(method, path, json=body)
        except httpx.ConnectError:
            raise ApplianceError(self._unreachable()) from None
        self._check(response)
        return response.json() if response.content else None

    def stream(self, path: str, body: dict):
        import httpx

        try:
            with self.http.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    self._check(response)
                for line in response.iter_lines():
                    if line.strip():
                        item = json.loads(line)
                        if "error" in item:
                            raise ApplianceError(item["error"])
                        yield item
        except httpx.ConnectError:
            raise ApplianceError(self._unreachable()) from None


# --- server --------------------------------------------------------------------------------------
def cmd_serve(settings: Settings, args) -> int:
    import uvicorn

    from web.app import create_app

    try:
        settings.server.set_address(args.host, args.port)
    except ValueError as exc:
        raise BadRequest(f"--host {exc}") from None
    from appliance import logs

    logs.configure(settings.log_level, settings.log_format)
    uvicorn.run(
        create_app(settings),
        host=settings.server.host,
        port=settings.server.port,
        log_level=settings.log_level.lower(),
        # With JSON, uvicorn's own loggers must reach the root handler instead of its text handlers.
        **({"log_config": None} if settings.log_format == "json" else {}),
        access_log=False,
    )
    return 0


# --- models --------------------------------------------------------------------------------------
def cmd_create(settings: Settings, args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from appliance.models.create import create_model
    from appliance.models.modelfile import Modelfile, parse_modelfile

    if bool(args.file) == bool(args.from_file):
        raise BadRequest("give either -f MODELFILE or --from FILE.gguf")
    if args.file:
        path = Path(args.file).expanduser()
        if not path.is_file():
            raise BadRequest(f"Modelfile not found: {path}")
        spec, base_dir = parse_modelfile(path.read_text()), path.resolve().parent
    else:
        spec, base_dir = Modelfile(from_=str(Path(args.from_file).expanduser().resolve())), Path.cwd()
    source = (base_dir / Path(spec.from_).expanduser()).resolve()
    total = source.stat().st_size if source.is_file() else None
    columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("creating model", total=total)
        record = create_model(
            _store(settings),
            args.name,
            spec,
            base_dir=base_dir,
            quantize=args.quantize,
            progress=lambda message: bar.update(task, description=message),
            on_bytes=lambda n: bar.advance(task, n),
        )
    print(f"created {record.name.display} (sha256:{record.model_digest[:12]}, {record.details['quantization_level']})")
    return 0


def cmd_list(settings: Settings, args) -> int:
    records = _store(settings).list()
    if args.json:
        _print_json(
            [
                {
                    "name": r.name.display,
                    "digest": r.digest,
                    "size": r.size,
                    "modified_at": r.modified_at.isoformat(),
                    "details": r.details,
                }
                for r in records
            ]
        )
        return 0
    print(f"{'NAME':<40} {'ID':<14} {'SIZE':>10}  {'QUANT':<8} MODIFIED")
    for r in records:
        print(
            f"{r.name.display:<40} {r.digest[:12]:<14} {r.size / 1e6:>8.1f}MB  "
            f"{r.details['quantization_level']:<8} {r.modified_at:%Y-%m-%d %H:%M}"
        )
    return 0


def cmd_show(settings: Settings, args) -> int:
    from appliance.models.modelfile import render_modelfile

    store = _store(settings)
    record = store.resolve(args.name)
    info = store.gguf_info(record.model_digest)
    template = store.chat_template(record) or ""
    if args.modelfile:
        print(
            render_modelfile(
                record.name.display,
                str(record.model_path),
                record.parameters,
                record.template,
                record.system,
                record.license,
            )
        )
        return 0
    if args.template:
        print(template)
        return 0
    summary = {
        "name": record.name.display,
        "architecture": info.architecture,
        "parameters": record.details["parameter_size"],
        "parameter_count": info.parameter_count,
        "quantization": info.quantization,
        "context_length": info.context_length,
        "embedding_length": info.arch_value("embedding_length"),
        "chat_template": template,
        "system": record.system,
        "parameters_set": record.parameters,
        "digest": record.model_digest,
    }
    if args.json:
        _print_json(summary)
        return 0
    print("  Model")
    for label, key in (
        ("architecture", "architecture"),
        ("parameters", "parameters"),
        ("context length", "context_length"),
        ("embedding length", "embedding_length"),
        ("quantization", "quantization"),
    ):
        print(f"    {label:<20}{summary[key]}")
    if record.parameters:
        print("\n  Parameters")
        for key, value in record.parameters.items():
            print(f"    {key:<20}{value}")
    if record.system:
        print(f"\n  System\n    {record.system}")
    print(f"\n  Chat template\n    {template[:300] + ('...' if len(template) > 300 else '') if template else '(none)'}")
    return 0


def cmd_rm(settings: Settings, args) -> int:
    store = _store(settings)
    for name in args.names:
        store.remove(name)
        print(f"deleted '{name}'")
    return 0


def cmd_models_install_default(settings: Settings, args) -> int:
    from appliance.models.default_model import install_default_model

    record = install_default_model(_store(settings))
    print(f"installed '{record.name.display}' (sha256:{record.model_digest[:12]})")
    return 0


def cmd_cp(settings: Settings, args) -> int:
    record = _store(settings).copy(args.source, args.destination)
    print(f"copied '{args.source}' to '{record.name.display}'")
    return 0


def cmd_ps(settings: Settings, args) -> int:
    models = ServerClient(settings).call("GET", "/api/ps")["models"]
    if args.json:
        _print_json(models)
        return 0
    print(f"{'NAME':<40} {'SIZE':>10}  {'PROCESSOR':<10} {'CONTEXT':>7}  {'PID':>7}  UNTIL")
    for m in models:
        processor = "GPU" if m["size_vram"] >= m["size"] else ("CPU" if not m["size_vram"] else "CPU/GPU")
        if m.get("cluster"):
            processor = "CLUSTER"
        print(
            f"{m['name']:<40} {m['size'] / 1e6:>8.1f}MB  {processor:<10} {m['context_length']:>7}  "
            f"{m['runner']['pid']:>7}  {m['expires_at']}"
        )
        for node in (m.get("cluster") or {}).get("nodes", []):
            layers = node["layers"]
            span = f"layers {layers[0]}-{layers[1]}" if layers else "no layers"
            print(f"  {node['node']:<38} {span}{' + output' if node.get('output') else ''}")
    return 0


def cmd_stop(settings: Settings, args) -> int:
    ServerClient(settings).call("POST", "/api/generate", {"model": args.name, "keep_alive": 0})
    return 0


# --- chat ----------------------------------------------------------------------------------------
RUN_HELP = """Commands:
  /set parameter NAME VALUE   set a model option (e.g. temperature 0.2, num_predict 128)
  /set system TEXT            set the system message
  /show parameters            show the options set in this session
  /save NAME                  save the model with this session's options and system message as NAME
  /clear                      forget the conversation
  /bye                        exit"""


def cmd_run(settings: Settings, args) -> int:
    from appliance.models.modelfile import coerce_parameter

    client = ServerClient(settings)
    if not args.name:
        from appliance.models.default_model import generation_model

        record = generation_model(_store(settings), settings.retrieval.rag_model)
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


# --- users and keys ------------------------------------------------------------------------------
def cmd_users_add(settings: Settings, args) -> int:
    from appliance.users import add_user

    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else None
    engine = _db(settings)
    user = add_user(engine, args.name, args.role, password)
    _audit(engine, "user_add", user.name, role=user.role, with_password=password is not None)
    print(f"created user '{user.name}' with role {user.role}")
    return 0


def cmd_users_list(settings: Settings, args) -> int:
    from appliance.users import list_users

    users = [
        {"name": u.name, "role": u.role, "disabled": u.disabled, "created_at": u.created_at.isoformat()}
        for u in list_users(_db(settings))
    ]
    if args.json:
        _print_json(users)
    else:
        for u in users:
            print(f"{u['name']:<32} {u['role']:<8} {'disabled' if u['disabled'] else ''}")
    return 0


def cmd_keys_create(settings: Settings, args) -> int:
    from appliance.users import create_key

    engine = _db(settings)
    key = create_key(engine, args.user, args.label or "")
    _audit(engine, "key_create", args.user, prefix=key[:12], label=args.label or "")
    print(key)
    return 0


def cmd_keys_list(settings: Settings, args) -> int:
    from appliance.users import list_keys

    for key, user in list_keys(_db(settings), args.user):
        state = f"revoked {key.revoked_at:%Y-%m-%d}" if key.revoked_at else "active"
        print(f"{key.prefix:<14} {user:<24} {state:<20} {key.label}")
    return 0


def cmd_keys_revoke(settings: Settings, args) -> int:
    from appliance.users import revoke_key

    engine = _db(settings)
    count = revoke_key(engine, args.prefix)
    _audit(engine, "key_revoke", args.prefix, revoked=count)
    print(f"revoked {count} key(s)")
    return 0


# --- access: groups, collections, grants, walls --------------------------------------------------
def _ensure_collection(settings: Settings, name: str) -> None:
    from appliance.rbac import ensure_collection

    ensure_collection(_db(settings), name)


def _subject_details(args) -> dict[str, str]:
    """Whom a grant or wall names, for its audit record."""
    return (
        {"subject_kind": "user", "subject": args.user}
        if args.user
        else {"subject_kind": "group", "subject": args.group}
    )


def cmd_users_disable(settings: Settings, args) -> int:
    from appliance.users import disable_user

    engine = _db(settings)
    count = disable_user(engine, args.name)
    _audit(engine, "user_disable", args.name, keys_revoked=count)
    print(f"disabled user '{args.name}' and revoked {count} key(s)")
    return 0


def cmd_users_role(settings: Settings, args) -> int:
    from appliance.users import set_role

    engine = _db(settings)
    old = set_role(engine, args.name, args.role)
    _audit(engine, "role_set", args.name, role=args.role, previous=old)
    print(f"user '{args.name}': role {old} -> {args.role}")
    return 0


def cmd_groups_add(settings: Settings, args) -> int:
    from appliance.rbac import add_group

    engine = _db(settings)
    group = add_group(engine, args.name)
    _audit(engine, "group_add", group.name)
    print(f"created group '{group.name}'")
    return 0


def cmd_groups_add_member(settings: Settings, args) -> int:
    from appliance.rbac import add_member

    engine = _db(settings)
    add_member(engine, args.group, args.user)
    _audit(engine, "member_add", args.group, user=args.user)
    print(f"added '{args.user}' to group '{args.group}'")
    return 0


def cmd_groups_rm_member(settings: Settings, args) -> int:
    from appliance.rbac import remove_member

    engine = _db(settings)
    remove_member(engine, args.group, args.user)
    _audit(engine, "member_rm", args.group, user=args.user)
    print(f"removed '{args.user}' from group '{args.group}'")
    return 0


def cmd_groups_list(settings: Settings, args) -> int:
    from appliance.rbac import list_groups

    groups = list_groups(_db(settings))
    if args.json:
        _print_json(groups)
    else:
        for group in groups:
            print(f"{group['name']:<32} {', '.join(group['members'])}")
    return 0


def cmd_collections_add(settings: Settings, args) -> int:
    from appliance.rbac import add_collection

    engine = _db(settings)
    collection = add_collection(engine, args.name, args.description)
    _audit(engine, "collection_add", collection.name)
    print(f"created collection '{collection.name}'")
    return 0


def cmd_collections_list(settings: Settings, args) -> int:
    from appliance.rbac import list_collections

    collections = list_collections(_db(settings))
    if args.json:
        _print_json(collections)
    else:
        for c in collections:
            print(f"{c['name']:<32} {c['documents']:>6} documents  {c['description'] or ''}")
    return 0


def cmd_grants_add(settings: Settings, args) -> int:
    from appliance.rbac import add_grant

    engine = _db(settings)
    grant = add_grant(engine, args.collection, user=args.user, group=args.group, role=args.role or "reader")
    _audit(engine, "grant_add", args.collection, **_subject_details(args), role=grant.role)
    print(f"granted {grant.role} on '{args.collection}' to {grant.subject_kind} '{args.user or args.group}'")
    return 0


def cmd_grants_rm(settings: Settings, args) -> int:
    from appliance.rbac import remove_grant

    engine = _db(settings)
    remove_grant(engine, args.collection, user=args.user, group=args.group, role=args.role)
    _audit(engine, "grant_rm", args.collection, **_subject_details(args), role=args.role)
    print(f"revoked the grant on '{args.collection}' for '{args.user or args.group}'")
    return 0


def cmd_grants_list(settings: Settings, args) -> int:
    from appliance.rbac import list_grants

    grants = list_grants(_db(settings), args.collection)
    if args.json:
        _print_json(grants)
    else:
        for g in grants:
            until = ""
            if "expires_at" in g:
                until = f"  break-glass {'expired' if g['expired'] else 'until'} {g['expires_at']}: {g['reason']}"
            print(f"{g['collection']:<32} {g['kind']:<6} {g['subject']:<32} {g['role']}{until}")
    return 0


def cmd_break_glass(settings: Settings, args) -> int:
    """An admin's own time-limited reader grant, with a reason; audited, refused attempts too."""
    from appliance.errors import Forbidden
    from appliance.rbac import break_glass

    engine = _db(settings)
    details = {"user": args.user, "reason": args.reason[:500], "minutes": args.minutes}
    try:
        grant = break_glass(
            engine, args.user, args.collection, args.reason, args.minutes, max_minutes=settings.break_glass_max_minutes
        )
    except ApplianceError as exc:
        outcome = "denied" if isinstance(exc, Forbidden) else "failed"
        _audit(engine, "break_glass", args.collection, outcome=outcome, **details, error=exc.message[:200])
        raise
    assert grant.expires_at is not None
    details["reason"] = grant.reason
    _audit(engine, "break_glass", args.collection, **details, expires_at=grant.expires_at.isoformat())
    print(f"'{args.user}' may read '{args.collection}' until {grant.expires_at.isoformat()} (break-glass, audited)")
    return 0


def cmd_walls_add(settings: Settings, args) -> int:
    from appliance.rbac import add_wall

    engine = _db(settings)
    add_wall(engine, args.collection, user=args.user, group=args.group)
    _audit(engine, "wall_add", args.collection, **_subject_details(args))
    print(f"walled '{args.user or args.group}' off '{args.collection}'")
    return 0


def cmd_walls_rm(settings: Settings, args) -> int:
    from appliance.rbac import remove_wall

    engine = _db(settings)
    remove_wall(engine, args.collection, user=args.user, group=args.group)
    _audit(engine, "wall_rm", args.collection, **_subject_details(args))
    print(f"removed the wall between '{args.user or args.group}' and '{args.collection}'")
    return 0


def cmd_walls_list(settings: Settings, args) -> int:
    from appliance.rbac import list_walls

    walls = list_walls(_db(settings), args.collection)
    if args.json:
        _print_json(walls)
    else:
        for w in walls:
            print(f"{w['collection']:<32} {w['kind']:<6} {w['subject']}")
    return 0


def _access_parsers(sub) -> None:
    """Parser entries for groups, collections, grants and walls."""

    def subject(p, with_role: bool) -> None:
        p.add_argument("--collection", required=True)
        who = p.add_mutually_exclusive_group(required=True)
        who.add_argument("--user")
        who.add_argument("--group")
        if with_role:
            p.add_argument("--role", choices=["reader", "editor"], help="reader (default) or editor")

    groups = sub.add_parser("groups", help="groups of users").add_subparsers(dest="action", required=True)
    p = groups.add_parser("add")
    p.add_argument("name")
    p.set_defaults(func=cmd_groups_add)
    p = groups.add_parser("add-member")
    p.add_argument("group")
    p.add_argument("user")
    p.set_defaults(func=cmd_groups_add_member)
    p = groups.add_parser("rm-member")
    p.add_argument("group")
    p.add_argument("user")
    p.set_defaults(func=cmd_groups_rm_member)
    p = groups.add_parser("list")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_groups_list)

    collections = sub.add_parser("collections", help="document collections").add_subparsers(
        dest="action", required=True
    )
    p = collections.add_parser("add")
    p.add_argument("name")
    p.add_argument("--description")
    p.set_defaults(func=cmd_collections_add)
    p = collections.add_parser("list")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_collections_list)

    grants = sub.add_parser("grants", help="who may read or edit a collection").add_subparsers(
        dest="action", required=True
    )
    p = grants.add_parser("add", help="grant a user or group reader (default) or editor on a collection")
    subject(p, with_role=True)
    p.set_defaults(func=cmd_grants_add)
    p = grants.add_parser("rm", help="revoke a grant (effective on the server's next request)")
    subject(p, with_role=True)
    p.set_defaults(func=cmd_grants_rm)
    p = grants.add_parser("list")
    p.add_argument("--collection")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_grants_list)

    p = sub.add_parser(
        "break-glass",
        help="an admin's own time-limited reader grant on a collection, with a reason (audited; walls still apply)",
    )
    p.add_argument("--user", required=True, help="the administrator who needs to read")
    p.add_argument("--collection", required=True)
    p.add_argument("--reason", required=True, help="why (at least 10 characters; kept in the audit log)")
    p.add_argument(
        "--minutes", type=int, default=60, help="how long (default 60, at most APPLIANCE_BREAK_GLASS_MAX_MINUTES)"
    )
    p.set_defaults(func=cmd_break_glass)

    walls = sub.add_parser("walls", help="ethical walls: who may never see a collection").add_subparsers(
        dest="action", required=True
    )
    p = walls.add_parser("add", help="wall a user or group off a collection, whatever else grants it")
    subject(p, with_role=False)
    p.set_defaults(func=cmd_walls_add)
    p = walls.add_parser("rm")
    subject(p, with_role=False)
    p.set_defaults(func=cmd_walls_rm)
    p = walls.add_parser("list")
    p.add_argument("--collection")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_walls_list)


# --- documents -----------------------------------------------------------------------------------
def _chunk_index(settings: Settings):
    from appliance.index import ChunkIndex, open_vector_store

    settings.ensure_dirs()
    return ChunkIndex(_db(settings), open_vector_store(settings))


def _ingestor(settings: Settings):
    from appliance.embeddings import open_embedder
    from ingest.pipeline import Ingestor

    index = _chunk_index(settings)
    return Ingestor(settings, index, open_embedder(settings, index))


def _walk(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")))
        else:
            files.append(path)
    return files


def cmd_ingest(settings: Settings, args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from appliance.rbac import check_acl_subjects
    from ingest.pipeline import parse_acl

    _ensure_collection(settings, args.collection)
    acl = parse_acl(args.acl, args.collection)
    check_acl_subjects(_db(settings), acl, args.collection)
    files = _walk(args.paths)
    # Parser processes share the cores with embedding: torch's OpenMP threads must sleep when they wait,
    # not spin, or they take the time parsing needs (set before torch is imported).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    ingestor = _ingestor(settings)
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
                    _audit(
                        ingestor.index.engine,
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
        _print_json({"counts": counts, "documents": [r.__dict__ for r in results]})
    else:
        print(", ".join(f"{count} {status}" for status, count in counts.items()))
    return 1 if counts["failed"] else 0


def cmd_documents_list(settings: Settings, args) -> int:
    from sqlmodel import select

    from appliance.db import Document, session

    with session(_db(settings)) as db:
        query = select(Document).order_by(Document.collection, Document.filename)
        if args.collection:
            query = query.where(Document.collection == args.collection)
        documents = list(db.exec(query))
    rows = [d.summary() for d in documents]
    if args.json:
        _print_json(rows)
    else:
        for row in rows:
            print(
                f"{row['id'][:12]}  {row['collection']:<16} {row['filename']:<40} {row['chunks']:>5} chunks  "
                f"{row['status']}"
            )
    return 0


def _find_document(settings: Settings, prefix: str):
    from sqlmodel import select

    from appliance.db import Document, session
    from appliance.errors import NotFound

    if len(prefix) < 6 or not all(c in "0123456789abcdef" for c in prefix):
        raise BadRequest("give the document id (at least its first 6 hex characters)")
    with session(_db(settings)) as db:
        matches = list(db.exec(select(Document).where(Document.id.startswith(prefix))))
    if not matches:
        raise NotFound(f"document {prefix} not found")
    if len(matches) > 1:
        raise BadRequest(f"document id {prefix} is ambiguous; give more characters")
    return matches[0]


def cmd_documents_show(settings: Settings, args) -> int:
    from sqlmodel import select

    from appliance.db import Chunk, session

    document = _find_document(settings, args.id)
    with session(_db(settings)) as db:
        chunks = list(db.exec(select(Chunk).where(Chunk.document_id == document.id).order_by(Chunk.position)))
    chunk_rows = [
        {"id": c.id, "page": c.page, "headings": c.headings, "start": c.start, "end": c.end, "characters": len(c.text)}
        for c in chunks
    ]
    _print_json({**document.model_dump(mode="json"), "chunks": chunk_rows})
    return 0


def cmd_documents_rm(settings: Settings, args) -> int:
    document = _find_document(settings, args.id)
    ingestor = _ingestor(settings)
    ingestor.remove(document.id)
    _audit(ingestor.index.engine, "delete", document.id, collection=document.collection, filename=document.filename)
    print(f"removed {document.filename} ({document.id[:12]})")
    return 0


def cmd_documents_acl(settings: Settings, args) -> int:
    from appliance.rbac import check_acl_subjects
    from ingest.pipeline import parse_acl

    document = _find_document(settings, args.id)
    acl = parse_acl(args.acl, document.collection)
    index = _chunk_index(settings)
    check_acl_subjects(index.engine, acl, document.collection)
    index.set_acl(document.id, acl)
    _audit(index.engine, "acl_set", document.id, collection=document.collection, acl=acl, previous=document.acl)
    print(f"{document.filename} ({document.id[:12]}): readable by {', '.join(acl)}")
    return 0


def cmd_index_check(settings: Settings, args) -> int:
    from appliance.index import describe_embedder

    report = _chunk_index(settings).check()
    if args.json:
        _print_json({**report.__dict__, "clean": report.clean})
    else:
        print(f"{report.documents} documents, {report.chunks} chunks: {'clean' if report.clean else 'MISMATCH'}")
        print(f"  vectors built by: {describe_embedder(report.embedder)}")
        for name, values in report.__dict__.items():
            if isinstance(values, list) and values:
                print(f"  {name.replace('_', ' ')}: {len(values)}: {', '.join(values[:5])}")
    return 0 if report.clean else 1


def cmd_index_rebuild(settings: Settings, args) -> int:
    """Re-embed every chunk with the configured backend ('auto': the fastest for a new index) and record it."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from appliance.embeddings import SentenceEmbedder

    index = _chunk_index(settings)
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
    return cmd_index_check(settings, argparse.Namespace(json=False))


# --- search and ask ------------------------------------------------------------------------------
def _retriever(settings: Settings):
    from appliance.embeddings import open_embedder
    from appliance.retrieve import Retriever

    index = _chunk_index(settings)
    return Retriever(index, open_embedder(settings, index), settings.retrieval)


def _cli_access(settings: Settings, as_user: str | None):
    """The local operator reads everything; `--as USER` shows exactly what that user would see."""
    from appliance.rbac import OPERATOR, access_for_user

    return access_for_user(_db(settings), as_user) if as_user else OPERATOR


def _where(item: dict) -> str:
    parts = [item["title"]]
    if item.get("page") is not None:
        parts.append(f"page {item['page']}")
    if item.get("section"):
        parts.append(item["section"])
    return ", ".join(parts)


def _question_audit(settings: Settings, args, text: str) -> dict[str, Any]:
    """What every CLI question's audit record carries besides its outcome."""
    details: dict[str, Any] = {"collections": args.collection or None, "as_user": args.as_user}
    if settings.audit_question_text:
        details["question"] = text
    return details


def cmd_search(settings: Settings, args) -> int:
    from appliance.errors import Forbidden, NotFound

    retriever = _retriever(settings)
    engine = retriever.index.engine
    target = ",".join(args.collection) if args.collection else None
    try:
        hits = retriever.search(args.query, _cli_access(settings, args.as_user), args.collection or None, args.top_k)
    except (NotFound, Forbidden) as exc:
        _audit(
            engine,
            "search",
            target,
            outcome="denied",
            **_question_audit(settings, args, args.query),
            reason=exc.message,
        )
        raise
    _audit(
        engine, "search", target, **_question_audit(settings, args, args.query), retrieved=[h.chunk_id for h in hits]
    )
    results = [hit.public() for hit in hits]
    if args.json:
        _print_json({"results": results})
        return 0
    if not results:
        print("no passages found")
    for rank, item in enumerate(results, start=1):
        print(f"{rank}. [{item['score']:.4f}] {_where(item)}  ({item['chunk_id'][:12]}…)")
        print(f"   {' '.join(item['text'].split())[:300]}")
    return 0


def cmd_ask(settings: Settings, args) -> int:
    import asyncio

    from appliance.inference import hardware
    from appliance.inference.engine import Engine, Token
    from appliance.inference.scheduler import Scheduler
    from appliance.rag import AnswerDone, Answerer

    retriever = _retriever(settings)
    access = _cli_access(settings, args.as_user)
    store = _store(settings)
    scheduler = Scheduler(settings.scheduler, store, hardware.detect())
    answerer = Answerer(
        retriever, Engine(store, scheduler, retriever.embedder), settings.retrieval, settings.scheduler.num_ctx
    )

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
            await scheduler.shutdown()
        return done

    from appliance import audit
    from appliance.errors import Forbidden, NotFound

    target = ",".join(args.collection) if args.collection else None
    try:
        done = asyncio.run(run())
    except (NotFound, Forbidden) as exc:
        details = _question_audit(settings, args, args.question)
        _audit(retriever.index.engine, "ask", target, outcome="denied", **details, reason=exc.message)
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
    _audit(retriever.index.engine, "ask", target, **details)
    if args.json:
        _print_json({"answer": done.answer, **done.public()})
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


# --- eval ----------------------------------------------------------------------------------------
def cmd_eval(settings: Settings, args) -> int:
    """Retrieval quality on a BEIR dataset or on golden questions, in a throw-away index; with `--answers`, the
    golden questions' answers too (extractive and/or generated, as `appliance ask` answers)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from appliance import evaluation

    if args.limit is not None and args.limit < 1:
        raise BadRequest("--limit must be at least 1")
    dataset = Path(args.dataset).expanduser() if args.dataset else None
    questions = Path(args.questions).expanduser() if args.questions else None
    if dataset is not None and not (dataset / "corpus.jsonl").exists() and (dataset / "questions.yaml").is_file():
        dataset, questions = None, dataset / "questions.yaml"  # `--dataset sample_corpus` means its questions
    answers = args.answers or args.mode is not None
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
            )
    if args.json:
        _print_json(report)
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


# --- audit ---------------------------------------------------------------------------------------
def cmd_audit_verify(settings: Settings, args) -> int:
    from appliance import audit

    result = audit.check(_db(settings))
    if result.ok:
        print(f"OK: {result.records} records, the chain is intact (head {result.head})")
        return 0
    print(f"BROKEN: record {result.first_bad_id}: {result.reason} ({result.records} records before it verify)")
    return 1


def cmd_audit_export(settings: Settings, args) -> int:
    from appliance import audit

    for item in audit.export(_db(settings), since=args.since, actor=args.user, action=args.only_action):
        sys.stdout.write(json.dumps(item, ensure_ascii=False) + "\n")
    return 0


# --- backup and restore ----------------------------------------------------------------------------
def cmd_backup(settings: Settings, args) -> int:
    from appliance.backup import backup

    report = backup(settings, Path(args.out), include_models=not args.no_models)
    _audit(_db(settings), "backup", report.path.name, files=report.files, bytes=report.bytes)
    print(
        f"backed up {report.documents} documents, {report.files} files ({report.bytes / 2**20:.1f} MiB"
        f"{'' if report.models_included else ', models left out'}) to {report.path}"
    )
    return 0


def cmd_restore(settings: Settings, args) -> int:
    from appliance.backup import restore

    report = restore(settings, Path(args.archive))
    _audit(_db(settings), "restore", Path(args.archive).name, files=report.files, version=report.source_version)
    print(f"restored {report.documents} documents, {report.files} files; vector index reloaded: {report.chunks} chunks")
    return cmd_index_check(settings, argparse.Namespace(json=False))


def cmd_bundle(settings: Settings, args) -> int:
    import time

    from rich.console import Console

    from appliance.bundle import DEFAULT_CMAKE_ARGS, build_bundle
    from ingest.spacy_standin import build_wheel

    started = time.monotonic()
    with Console(stderr=True).status("building the offline bundle") as status:

        def progress(message: str) -> None:
            status.update(message)
            log.info(message)

        report = build_bundle(
            settings,
            Path(args.out),
            spacy_standin=build_wheel,
            models=args.model or [],
            cmake_args=args.cmake_args or DEFAULT_CMAKE_ARGS,
            torch_index=args.torch_index,
            rebuild_llama=args.rebuild_llama,
            progress=progress,
        )
    print(
        f"bundle of {len(report.distributions)} distributions and {len(report.models)} models "
        f"({report.bytes / 2**20:.0f} MiB) in {report.path}, built in {time.monotonic() - started:.0f} s"
        f"{' (llama-cpp-python from the cache)' if report.llama_reused else ''}\n"
        f"sha256 of SHA256SUMS: {report.checksums_sha256} (note it; compare it on the target before installing)\n"
        f"install on the target: bash {report.path}/install.sh /opt/appliance/.venv"
    )
    return 0


def cmd_config_show(settings: Settings, args) -> int:
    from appliance.config import settings_report

    rows = settings_report(settings)
    if args.json:
        _print_json(rows)
        return 0
    for row in rows:
        changed = "" if row["value"] == row["default"] else f"   (default: {row['default']})"
        print(f"{row['env']}={row['value']}{changed}")
    return 0


def cmd_doctor(settings: Settings, args) -> int:
    from appliance import doctor

    checks = doctor.run(settings)
    failed = any(check.status == doctor.FAIL for check in checks)
    if args.json:
        _print_json({"ok": not failed, "checks": [check.as_dict() for check in checks]})
    else:
        width = max(len(check.name) for check in checks)
        for check in checks:
            label = "ok" if check.status == doctor.OK else check.status.upper()
            print(f"{label:<5} {check.name:<{width}}  {check.message}")
            if check.advice and check.status != doctor.OK:
                print(f"{'':<5} {'':<{width}}  -> {check.advice}")
    return 1 if failed else 0


# --- cluster ---------------------------------------------------------------------------------------
def _cluster(settings: Settings):
    from appliance.cluster.coordinator import Cluster

    return Cluster(settings.home / "cluster")


def cmd_worker(settings: Settings, args) -> int:
    from appliance.cluster.worker import Worker, WorkerState, main_event_loop, parse_size, split_address

    host, port = split_address(args.listen)
    try:
        max_memory = parse_size(args.max_memory) if args.max_memory else None
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    state = WorkerState(settings.home / "worker")
    if args.reset_pairing:
        state.reset()
        print("pairing reset: this worker forgot its coordinator", flush=True)
    code = None if state.paired else state.new_code()
    from appliance import logs

    logs.configure(settings.log_level, settings.log_format)

    def listening() -> None:
        if code:
            print(f"Pairing code (one use): {code}", flush=True)
            print(f"On the coordinator: appliance cluster pair {host}:{port} --code {code}", flush=True)
        else:
            print(f"paired; the coordinator CA fingerprint is {state.data.get('coordinator_ca', '')[:16]}", flush=True)
        print(f"worker listening on {host}:{port}", flush=True)

    worker = Worker(
        state,
        host,
        port,
        max_memory=max_memory,
        threads=args.threads,
        devices=args.device,
        on_event=lambda message: print(message, flush=True),
    )
    main_event_loop(worker, listening)
    return 0


def cmd_cluster_pair(settings: Settings, args) -> int:
    status = _cluster(settings).pair(args.address, args.code)
    print(f"paired with {status.address} (node {status.node_id})")
    if status.problem:
        print(f"warning: {status.problem}")
    return 0


def cmd_cluster_unpair(settings: Settings, args) -> int:
    _cluster(settings).unpair(args.address)
    print(f"forgot {args.address} (its own pairing stays until `appliance worker --reset-pairing` there)")
    return 0


def cmd_cluster_status(settings: Settings, args) -> int:
    from appliance.cluster.plan import gib

    statuses = _cluster(settings).probe_all()
    if args.json:
        _print_json([s.as_json() for s in statuses])
        return 0
    if not statuses:
        print("no worker is paired (appliance cluster pair HOST:PORT --code CODE)")
        return 0
    print(f"{'WORKER':<24} {'STATE':<10} {'FREE':>10} {'CAP':>10} {'LATENCY':>9}  {'VERSION':<16} DEVICES")
    for s in statuses:
        state = "ok" if s.problem is None else ("busy" if s.busy else ("down" if not s.reachable else "unusable"))
        devices = ", ".join(f"{d.get('name')} ({d.get('description')})" for d in s.devices)
        version = f"{s.version or '-'}/{s.llama_cpp_python or '-'}"
        print(
            f"{s.address:<24} {state:<10} {gib(s.free_memory) if s.reachable else '-':>10} "
            f"{gib(s.max_memory) if s.max_memory else '-':>10} "
            f"{f'{s.latency_ms:.2f} ms' if s.latency_ms is not None else '-':>9}  {version:<16} {devices}"
        )
        if s.problem:
            print(f"{'':<24} {s.problem}")
    return 0


def cmd_cluster_plan(settings: Settings, args) -> int:
    from appliance.cluster.plan import gib
    from appliance.inference import hardware
    from appliance.inference.engine import merge_options
    from appliance.inference.scheduler import Scheduler

    store = _store(settings)
    record = store.resolve(args.model)
    options = merge_options(record.parameters, {"num_nodes": args.num_nodes} if args.num_nodes else {})
    scheduler = Scheduler(settings.scheduler, store, hardware.detect(), _cluster(settings))
    config, size = scheduler._load_config(record, options, embedding=False)
    local = 0 if args.no_local else scheduler.memory_budget
    plan, _ = scheduler.cluster.plan(
        store.gguf_info(record.model_digest),
        config["n_ctx"],
        config["n_parallel"],
        local,
        int(options.get("num_nodes") or 0),
    )
    if args.json:
        _print_json({"model": record.name.display, "fits_locally": size <= scheduler.memory_budget, **plan.as_json()})
        return 0
    print(f"{record.name.display}: {gib(plan.total_bytes)} with context {config['n_ctx']} x {config['n_parallel']}")
    if size <= scheduler.memory_budget and not options.get("num_nodes"):
        print("(it fits on this machine, where it loads unless num_nodes asks for workers)")
    print(f"{'NODE':<24} {'LAYERS':<12} {'USES':>10} {'FREE':>10}")
    for share in plan.shares:
        layers = f"{share.first_layer}-{share.first_layer + share.n_layers - 1}" if share.n_layers else "-"
        layers += " +out" if share.output else ""
        print(f"{share.node:<24} {layers:<12} {gib(share.bytes):>10} {gib(share.free):>10}")
    return 0


def cmd_version(settings: Settings, args) -> int:
    print(f"appliance {__version__}")
    return 0


# --- parser --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description="Private knowledge appliance")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="start the server")
    p.add_argument("--host", help="address to bind, as APPLIANCE_HOST: host, host:port, [::1]:port, http://host:port")
    p.add_argument("--port", type=int, help="TCP port (wins over a port in --host)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("create", help="create a model from a Modelfile or a GGUF file")
    p.add_argument("name")
    p.add_argument("-f", "--file", help="Modelfile (FROM ./file.gguf, PARAMETER, TEMPLATE, SYSTEM)")
    p.add_argument("--from", dest="from_file", help="a GGUF file")
    p.add_argument("-q", "--quantize", help="re-quantize an F16/F32/Q8_0 model, e.g. q4_K_M")
    p.set_defaults(func=cmd_create)

    for name in ("list", "ls"):
        p = sub.add_parser(name, help="list models")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="show a model's metadata")
    p.add_argument("name")
    p.add_argument("--modelfile", action="store_true")
    p.add_argument("--template", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("rm", help="remove models")
    p.add_argument("names", nargs="+")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("cp", help="copy a model")
    p.add_argument("source")
    p.add_argument("destination")
    p.set_defaults(func=cmd_cp)

    p = sub.add_parser("ps", help="list loaded models (asks the server)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ps)

    p = sub.add_parser("stop", help="unload a model (asks the server)")
    p.add_argument("name")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("run", help="chat with a model in the terminal (through the server)")
    p.add_argument("name", nargs="?", help="default: the model that answers questions (APPLIANCE_RAG_MODEL, ...)")
    p.add_argument("prompt", nargs="*")
    p.set_defaults(func=cmd_run)

    models = sub.add_parser("models", help="the bundled default model").add_subparsers(dest="action", required=True)
    p = models.add_parser("install-default", help="install (again) the bundled smollm2:135m, digest checked")
    p.set_defaults(func=cmd_models_install_default)

    users = sub.add_parser("users", help="manage users").add_subparsers(dest="action", required=True)
    p = users.add_parser("add")
    p.add_argument("name")
    p.add_argument("--role", required=True, choices=["admin", "editor", "reader"])
    p.add_argument("--password-stdin", action="store_true", help="read a password from the first stdin line")
    p.set_defaults(func=cmd_users_add)
    p = users.add_parser("list")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_users_list)
    p = users.add_parser("role", help="change a user's role (effective on their next request)")
    p.add_argument("name")
    p.add_argument("role", choices=["admin", "editor", "reader"])
    p.set_defaults(func=cmd_users_role)
    p = users.add_parser("disable", help="disable a user and revoke all their keys")
    p.add_argument("name")
    p.set_defaults(func=cmd_users_disable)

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="action", required=True)
    p = keys.add_parser("create", help="issue a key (printed once, stored hashed)")
    p.add_argument("--user", required=True)
    p.add_argument("--label")
    p.set_defaults(func=cmd_keys_create)
    p = keys.add_parser("list")
    p.add_argument("--user")
    p.set_defaults(func=cmd_keys_list)
    p = keys.add_parser("revoke")
    p.add_argument("prefix", help="the key's prefix as `keys list` shows it")
    p.set_defaults(func=cmd_keys_revoke)
    _access_parsers(sub)

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

    index = sub.add_parser("index", help="the search index").add_subparsers(dest="action", required=True)
    p = index.add_parser("check", help="compare database, FTS and Chroma (exit 1 on any mismatch)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_index_check)
    p = index.add_parser("rebuild", help="rebuild FTS and Chroma from the database's chunks")
    p.set_defaults(func=cmd_index_rebuild)

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
        "--workdir",
        help="keep the BEIR index in this directory instead of a temporary one; a later run reuses it (tuning)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    audit = sub.add_parser("audit", help="the audit log").add_subparsers(dest="action", required=True)
    p = audit.add_parser("verify", help="recompute the hash chain (exit 1 when a record was edited or removed)")
    p.set_defaults(func=cmd_audit_verify)
    p = audit.add_parser("export", help="records as JSON lines, oldest first")
    p.add_argument("--since", help="only records at or after this ISO date or time (UTC unless a zone is given)")
    p.add_argument("--user", help="only records of this user (local-operator for the CLI)")
    p.add_argument("--action", dest="only_action", help="only this action (upload, delete, ask, grant_add, ...)")
    p.set_defaults(func=cmd_audit_export)

    p = sub.add_parser("backup", help="a consistent archive of the home while the server runs")
    p.add_argument("--out", required=True, help="archive to write (.tar, or .tar.gz to compress)")
    p.add_argument("--no-models", action="store_true", help="leave the model store out (models can be imported again)")
    p.set_defaults(func=cmd_backup)
    p = sub.add_parser("restore", help="restore a backup archive onto an empty home, then check the index")
    p.add_argument("archive")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("bundle", help="an offline install bundle (wheels, models, install.sh); run connected")
    p.add_argument("--out", required=True, help="folder to write (new or empty)")
    p.add_argument("--model", action="append", help="a model from this home to carry along (repeatable)")
    p.add_argument(
        "--cmake-args",
        help="llama.cpp build options for the target (default: -DGGML_RPC=on -DGGML_NATIVE=OFF, any AVX2 CPU; "
        "add -DGGML_CUDA=on for NVIDIA GPUs)",
    )
    p.add_argument("--torch-index", help="package index for torch, e.g. a mirror of the PyTorch CPU wheels")
    p.add_argument("--rebuild-llama", action="store_true", help="build llama-cpp-python again, ignoring the cache")
    p.set_defaults(func=cmd_bundle)

    config = sub.add_parser("config", help="the settings").add_subparsers(dest="action", required=True)
    p = config.add_parser("show", help="every setting: current value (secrets masked), default, description")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_config_show)

    p = sub.add_parser("doctor", help="check the configuration and report network use (exit 1 on a failed check)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("worker", help="lend this machine to a paired coordinator (llama.cpp RPC behind mutual TLS)")
    p.add_argument("--listen", required=True, help="HOST:PORT the coordinator connects to (TLS)")
    p.add_argument("--max-memory", help="most memory the coordinator may plan on this worker, e.g. 16GiB")
    p.add_argument("--threads", type=int, default=0, help="compute threads (default: all usable cores)")
    p.add_argument("--device", action="append", help="llama.cpp device to serve (default: GPUs, else the CPU)")
    p.add_argument("--reset-pairing", action="store_true", help="forget the coordinator and show a new code")
    p.set_defaults(func=cmd_worker)

    cluster = sub.add_parser("cluster", help="paired workers: pair, status, plan").add_subparsers(
        dest="action", required=True
    )
    p = cluster.add_parser("pair", help="pair with a worker using the one-time code its console shows")
    p.add_argument("address", help="HOST:PORT of the worker")
    p.add_argument("--code", required=True)
    p.set_defaults(func=cmd_cluster_pair)
    p = cluster.add_parser("unpair", help="forget a worker")
    p.add_argument("address")
    p.set_defaults(func=cmd_cluster_unpair)
    p = cluster.add_parser("status", help="each worker: devices, free memory, latency, version")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cluster_status)
    p = cluster.add_parser("plan", help="how a model's layers would be split over this machine and the workers")
    p.add_argument("model")
    p.add_argument("--num-nodes", type=int, default=0, help="use exactly this many workers")
    p.add_argument("--no-local", action="store_true", help="keep no layer on this machine")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cluster_plan)

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=cmd_version)
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
        return int(args.func(settings, args) or 0)
    except ApplianceError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
