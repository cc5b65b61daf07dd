"""E-mail attachments, taken out of an EML file so that each is ingested as a document of its own."""

from __future__ import annotations

import email
import email.policy
from dataclasses import dataclass
from pathlib import Path

from ingest.filenames import allowed_suffix, display_name


@dataclass
class Attachment:
    name: str  # as the sender named it (display only)
    path: Path | None  # where its bytes were written, or None when it was skipped
    reason: str = ""


def extract_attachments(eml: Path, out_dir: Path, max_bytes: int, max_count: int = 50) -> list[Attachment]:
    with eml.open("rb") as handle:
        message = email.message_from_binary_file(handle, policy=email.policy.default)
    found: list[Attachment] = []
    for index, part in enumerate(message.iter_attachments()):
        name = display_name(part.get_filename() or f"attachment-{index + 1}")
        if len(found) >= max_count:
            found.append(Attachment(name, None, f"more than {max_count} attachments"))
            break
        suffix = allowed_suffix(name)
        payload = part.get_payload(decode=True)
        if suffix is None or not isinstance(payload, bytes):
            found.append(Attachment(name, None, "unsupported attachment type"))
            continue
        if len(payload) > max_bytes:
            found.append(Attachment(name, None, "attachment over the size limit (APPLIANCE_MAX_UPLOAD_MB)"))
            continue
        target = out_dir / f"attachment-{index}{suffix}"
        target.write_bytes(payload)
        found.append(Attachment(name, target))
    return found
