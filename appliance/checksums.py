"""The SHA-256 of a file, read in blocks: model files, bundle members, the embedding export."""

from __future__ import annotations

import hashlib
from pathlib import Path

_BLOCK = 8 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()
