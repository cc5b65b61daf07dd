"""`appliance bundle`: an offline install bundle (wheels, models, install.sh), built on a connected machine."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from rich.console import Console

from appliance.operations.bundle import DEFAULT_CMAKE_ARGS, build_bundle
from appliance.services import Services

log = logging.getLogger(__name__)


def cmd_bundle(services: Services, args) -> int:
    from ingest.spacy_standin import build_wheel

    started = time.monotonic()
    with Console(stderr=True).status("building the offline bundle") as status:

        def progress(message: str) -> None:
            status.update(message)
            log.info(message)

        report = build_bundle(
            services.settings,
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


def register(sub) -> None:
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
