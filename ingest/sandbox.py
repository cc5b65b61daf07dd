"""Parsing untrusted files in a child process with a time and memory limit.

A hostile or broken file can make a parser loop, allocate without bound or crash; here that ends
one child process and becomes a clear per-file failure, never a problem for the server.
Run as `python -m ingest.sandbox FILE MAX_BYTES` (the parent does this); it prints one JSON line.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

from appliance.config import IngestSettings
from appliance.errors import ApplianceError, BadRequest
from ingest.partition import Element, NoExtractableText, UnsupportedDocument
from ingest.safety import RejectedDocument

_ERRORS: dict[str, type[BadRequest]] = {
    cls.__name__: cls for cls in (NoExtractableText, UnsupportedDocument, RejectedDocument)
}


class ParseFailed(BadRequest):
    """The parser failed, or was stopped at its time or memory limit."""


def partition_in_sandbox(path: Path, settings: IngestSettings) -> tuple[str, list[Element]]:
    """The document's format and elements, parsed in a limited child process."""
    memory = settings.parse_memory_mb * 2**20

    def limit() -> None:  # runs in the child, before exec
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        os.setsid()

    try:
        result = subprocess.run(
            [sys.executable, "-m", "ingest.sandbox", str(path), str(settings.max_upload_mb * 2**20)],
            capture_output=True,
            text=True,
            timeout=settings.parse_timeout_s,
            preexec_fn=limit,  # noqa: PLW1509
        )
    except subprocess.TimeoutExpired:
        raise ParseFailed(f"parsing took longer than {settings.parse_timeout_s:.0f} s and was stopped") from None
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        if result.returncode < 0 and -result.returncode in (signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT):
            raise ParseFailed(
                f"the parser crashed ({signal.Signals(-result.returncode).name}); the file may be hostile or damaged"
            )
        if "MemoryError" in result.stderr:
            raise ParseFailed(f"parsing needed more than {settings.parse_memory_mb} MB and was stopped")
        raise ParseFailed("the parser failed on this file")
    answer = json.loads(lines[-1])
    if "error" in answer:
        raise _ERRORS.get(answer["error"], ParseFailed)(answer["message"])
    return answer["kind"], [Element(**element) for element in answer["elements"]]


def _main(argv: list[str]) -> int:
    from ingest.partition import detect_format, partition_document
    from ingest.safety import check_document

    path, max_bytes = Path(argv[0]), int(argv[1])
    try:
        check_document(path, detect_format(path), max_bytes)
        kind, elements = partition_document(path)
        answer: dict = {"kind": kind, "elements": [element.__dict__ for element in elements]}
    except ApplianceError as exc:
        answer = {"error": type(exc).__name__, "message": exc.message}
    except MemoryError:
        print("MemoryError", file=sys.stderr)
        return 1
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
