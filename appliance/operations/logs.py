"""Log output of the server: human-readable lines, or one JSON object per line for a log collector."""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import UTC, datetime
from typing import TextIO

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes every LogRecord has (and uvicorn's copy of the message with colour codes); anything else on a
# record came from `extra=` and is written as a field.
_NOT_EXTRA = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    """time (UTC, ISO 8601), level, logger, message, the `extra=` fields, and a formatted exception if any."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        entry = {
            "time": when.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _NOT_EXTRA and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure(level: str, fmt: str) -> None:
    """Send every logger's records to stderr in `fmt` ('text' or 'json'), replacing earlier handlers.

    With JSON, whatever else reaches the stderr file descriptor (llama.cpp in the runner processes,
    a C library, a thread's traceback) is relayed as records of the `stderr` logger, so that every
    line stays one JSON object.
    """
    if fmt == "json":
        handler = _RelayedStreamHandler(_capture_stderr())
        handler.setFormatter(JsonFormatter())
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(fmt == "json")


class _RelayedStreamHandler(logging.StreamHandler):
    def handleError(self, record: logging.LogRecord) -> None:
        pass  # its report would go to stderr, which is relayed back here: a loop when the real stderr fails


def _capture_stderr() -> TextIO:
    """Point fd 2 (inherited by child processes) at a pipe read by a relay thread; returns the real stderr."""
    real = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    threading.Thread(target=_relay, args=(read_end,), name="stderr-relay", daemon=True).start()
    return real


def _relay(read_end: int) -> None:
    logger = logging.getLogger("stderr")
    with os.fdopen(read_end, "rb") as pipe:
        for raw in pipe:
            line = raw.decode("utf-8", errors="replace").rstrip()
            if line:
                logger.warning(line)
