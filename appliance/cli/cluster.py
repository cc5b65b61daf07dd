"""Several machines: `worker` lends this one to a coordinator; `cluster` pairs workers, probes them and shows
how a model's layers would be split over them."""

from __future__ import annotations

from appliance.cli.common import print_json
from appliance.cluster.plan import gib
from appliance.errors import BadRequest
from appliance.operations import logs
from appliance.services import Services


def cmd_worker(services: Services, args) -> int:
    from appliance.cluster.worker import Worker, WorkerState, main_event_loop, parse_size, split_address

    settings = services.settings
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


def cmd_cluster_pair(services: Services, args) -> int:
    status = services.cluster.pair(args.address, args.code)
    print(f"paired with {status.address} (node {status.node_id})")
    if status.problem:
        print(f"warning: {status.problem}")
    return 0


def cmd_cluster_unpair(services: Services, args) -> int:
    services.cluster.unpair(args.address)
    print(f"forgot {args.address} (its own pairing stays until `appliance worker --reset-pairing` there)")
    return 0


def cmd_cluster_status(services: Services, args) -> int:
    statuses = services.cluster.probe_all()
    if args.json:
        print_json([s.as_json() for s in statuses])
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


def cmd_cluster_plan(services: Services, args) -> int:
    from appliance.inference.engine import merge_options

    store = services.store
    record = store.resolve(args.model)
    options = merge_options(record.parameters, {"num_nodes": args.num_nodes} if args.num_nodes else {})
    scheduler = services.scheduler
    config, size = scheduler._load_config(record, options, embedding=False)
    local = 0 if args.no_local else scheduler.memory_budget
    plan, _ = services.cluster.plan(
        store.gguf_info(record.model_digest),
        config["n_ctx"],
        config["n_parallel"],
        local,
        int(options.get("num_nodes") or 0),
    )
    if args.json:
        print_json({"model": record.name.display, "fits_locally": size <= scheduler.memory_budget, **plan.as_json()})
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


def register(sub) -> None:
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
