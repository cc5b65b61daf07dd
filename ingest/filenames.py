"""Names of ingested files: what people see (never used as a path) and which extensions are read."""

from __future__ import annotations

from pathlib import Path

from ingest.partition import EXTENSIONS

KNOWN_SUFFIXES = {suffix for suffixes in EXTENSIONS.values() for suffix in suffixes}


def display_name(name: str) -> str:
    """The name shown to people: no directories, no control characters (never used as a path)."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable())
    return name[:255] or "document"


def allowed_suffix(name: str) -> str | None:
    """The lower-case extension of `name` when it is one the appliance reads, else None."""
    suffix = Path(display_name(name)).suffix.lower()
    return suffix if suffix in KNOWN_SUFFIXES else None
