"""Refusing hostile or broken files before any parser sees them.

Size limit; for OOXML (DOCX, PPTX, XLSX) the declared uncompressed size, compression ratio and entry
count of the ZIP container (zip bombs); for PDF the structure (truncated or damaged files) and
encryption. XML external entities need no check here: python-docx, python-pptx and openpyxl parse
with entity resolution off, and a test holds them to it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from appliance.errors import BadRequest

MAX_ZIP_ENTRIES = 10_000
MAX_UNCOMPRESSED_BYTES = 1 << 30
MAX_COMPRESSION_RATIO = 200


class RejectedDocument(BadRequest):
    """The file is refused before parsing: too large, a zip bomb, damaged or encrypted."""


def check_size(path: Path, max_bytes: int) -> None:
    size = path.stat().st_size
    if size > max_bytes:
        raise RejectedDocument(
            f"file is {size / 2**20:.1f} MB, over the {max_bytes / 2**20:.0f} MB limit (APPLIANCE_MAX_UPLOAD_MB)"
        )


def check_zip_container(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except zipfile.BadZipFile as exc:
        raise RejectedDocument(f"damaged ZIP container ({exc})") from None
    if len(entries) > MAX_ZIP_ENTRIES:
        raise RejectedDocument(f"container holds {len(entries)} entries, more than {MAX_ZIP_ENTRIES} (zip bomb?)")
    declared = sum(entry.file_size for entry in entries)
    if declared > MAX_UNCOMPRESSED_BYTES:
        raise RejectedDocument(
            f"container declares {declared / 2**30:.1f} GiB uncompressed, over the "
            f"{MAX_UNCOMPRESSED_BYTES / 2**30:.0f} GiB limit (zip bomb?)"
        )
    for entry in entries:
        if entry.flag_bits & 0x1:
            raise RejectedDocument("encrypted (password-protected) document")
        if entry.file_size > 1 << 20 and entry.file_size > MAX_COMPRESSION_RATIO * max(entry.compress_size, 1):
            raise RejectedDocument(
                f"entry '{entry.filename[:80]}' expands {entry.file_size // max(entry.compress_size, 1)}"
                f"-fold, more than {MAX_COMPRESSION_RATIO} (zip bomb?)"
            )


def check_pdf(path: Path) -> None:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(path, strict=True)
        encrypted = reader.is_encrypted
        if not encrypted:
            len(reader.pages)
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as exc:
        raise RejectedDocument(f"damaged or truncated PDF ({exc})") from None
    if encrypted:
        raise RejectedDocument("encrypted (password-protected) PDF")


def check_document(path: Path, kind: str, max_bytes: int) -> None:
    """All checks for a file whose format (`ingest.partition.detect_format`) is `kind`."""
    check_size(path, max_bytes)
    if kind in ("docx", "pptx", "xlsx"):
        check_zip_container(path)
    elif kind == "pdf":
        check_pdf(path)
