"""Parsing untrusted files in a child process with a time and memory limit.

A hostile or broken file can make a parser loop, allocate without bound or crash; here that ends
the child process and becomes a clear per-file failure, never a problem for the server or the CLI.
The child lives on between files (importing the parsing stack once costs seconds), under an
address-space limit for its whole life; after a timeout, a crash or a memory error it is replaced.
A `ParserPool` holds a few such children so that several files can be parsed at once.

Protocol (`python -m ingest.sandbox MAX_BYTES`): one file path per line on stdin, one JSON line per
file on stdout: {"kind", "elements"} or {"error", "message"}. An empty line asks the child to import
the parsing stack now; it answers {"ready": true}.
"""

from __future__ import annotations

import json
import os
import queue
import resource
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
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


class ParserProcess:
    """One limited child process that parses files one at a time (thread-safe: calls are serialised)."""

    def __init__(self, settings: IngestSettings):
        self.settings = settings
        self._process: subprocess.Popen | None = None
        self._stderr = None  # a temporary file: a pipe nobody reads could fill up and stall the child
        self._lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        memory = self.settings.parse_memory_mb * 2**20

        def limit() -> None:  # runs in the child, before exec
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
            os.setsid()

        self._stderr = tempfile.TemporaryFile(mode="w+")
        return subprocess.Popen(
            [sys.executable, "-m", "ingest.sandbox", str(self.settings.max_upload_mb * 2**20)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            preexec_fn=limit,  # noqa: PLW1509  (no threads start between fork and exec here)
        )

    def stop(self) -> None:
        if self._process is not None:
            if self._process.poll() is None:
                try:
                    os.killpg(self._process.pid, signal.SIGKILL)  # the child and any OCR tools it started
                except ProcessLookupError:
                    pass
            self._process.wait()
            self._process = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def warm_up(self) -> None:
        """Start the child and let it import the parsing stack (otherwise the first file pays for that)."""
        self._ask("")

    def partition(self, path: Path) -> tuple[str, list[Element]]:
        """The document's format and elements; raises a BadRequest subclass with the reason."""
        answer = self._ask(str(path))
        if "error" in answer:
            if answer["error"] == "MemoryError":
                self.stop()
                raise ParseFailed(f"parsing needed more than {self.settings.parse_memory_mb} MB and was stopped")
            raise _ERRORS.get(answer["error"], ParseFailed)(answer["message"])
        return answer["kind"], [Element(**element) for element in answer["elements"]]

    def _ask(self, line: str) -> dict:
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                self._process = self._start()
            process = self._process
            assert process.stdin and process.stdout
            try:
                process.stdin.write(line + "\n")
                process.stdin.flush()
            except BrokenPipeError:
                pass  # the child died starting up; reading below reports how
            answer = self._read_line(process, time.monotonic() + self.settings.parse_timeout_s)
            if answer is None:
                raise self._failure(process)
            return json.loads(answer)

    @staticmethod
    def _read_line(process: subprocess.Popen, deadline: float) -> str | None:
        assert process.stdout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([process.stdout], [], [], remaining)
            if ready:
                line = process.stdout.readline()
                return line or None

    def _failure(self, process: subprocess.Popen) -> ParseFailed:
        running = process.poll() is None
        stderr = ""
        if self._stderr is not None and not running:
            self._stderr.seek(0)
            stderr = self._stderr.read()[-10_000:]
        self.stop()
        if running:
            return ParseFailed(f"parsing took longer than {self.settings.parse_timeout_s:.0f} s and was stopped")
        code = process.returncode
        if "MemoryError" in stderr:
            return ParseFailed(f"parsing needed more than {self.settings.parse_memory_mb} MB and was stopped")
        if code is not None and code < 0:
            return ParseFailed(f"the parser crashed ({signal.Signals(-code).name}); the file may be hostile or damaged")
        return ParseFailed("the parser failed on this file")


class ParserPool:
    """A few parser processes; `partition` uses a free one (thread-safe: one file per process at a time).

    Children start when first needed, and the most recently used one is taken first, so a pool that
    parses one file at a time (the server's job worker) keeps a single child alive.
    """

    def __init__(self, settings: IngestSettings, size: int):
        self.size = max(1, size)
        self._parsers = [ParserProcess(settings) for _ in range(self.size)]
        self._free: queue.LifoQueue[ParserProcess] = queue.LifoQueue()
        for parser in reversed(self._parsers):
            self._free.put(parser)

    def partition(self, path: Path) -> tuple[str, list[Element]]:
        parser = self._free.get()
        try:
            return parser.partition(path)
        finally:
            self._free.put(parser)

    def warm_up(self) -> None:
        """Start every child and wait until each has imported the parsing stack."""
        threads = [threading.Thread(target=parser.warm_up) for parser in self._parsers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def stop(self) -> None:
        for parser in self._parsers:
            parser.stop()


def _import_parsing_stack() -> None:
    from ingest.partition import prepare_offline

    prepare_offline()
    import unstructured.partition.auto  # noqa: F401
    import unstructured.partition.docx  # noqa: F401
    import unstructured.partition.html  # noqa: F401
    import unstructured.partition.pdf  # noqa: F401


def _parse_one(path: Path, max_bytes: int) -> dict:
    from ingest.partition import detect_format, partition_document
    from ingest.safety import check_document

    try:
        check_document(path, detect_format(path), max_bytes)
        kind, elements = partition_document(path)
        return {"kind": kind, "elements": [element.__dict__ for element in elements]}
    except ApplianceError as exc:
        return {"error": type(exc).__name__, "message": exc.message}
    except MemoryError:
        return {"error": "MemoryError", "message": "out of memory"}
    except Exception as exc:  # a parser bug on a strange file is this file's failure, not the worker's
        return {"error": "ParseFailed", "message": f"the parser failed on this file ({type(exc).__name__})"}


def _main(argv: list[str]) -> int:
    max_bytes = int(argv[0])
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the answers
    sys.stdout = sys.stderr
    for line in sys.stdin:
        if not line.strip():
            try:
                _import_parsing_stack()
            except Exception:  # noqa: S110  (the next file reports what is wrong, with its own answer)
                pass
            protocol.write(json.dumps({"ready": True}) + "\n")
            protocol.flush()
            continue
        answer = _parse_one(Path(line.rstrip("\n")), max_bytes)
        protocol.write(json.dumps(answer) + "\n")
        protocol.flush()
        if answer.get("error") == "MemoryError":
            return 1  # a process that ran out of memory is not trusted with the next file
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
