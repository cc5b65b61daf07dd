"""Model names in Ollama's grammar: `[host/][namespace/]model[:tag]`, default tag `latest`.

Every part is validated before it becomes a path, so a name can never escape the store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from appliance.errors import BadRequest

DEFAULT_HOST = "local"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

_HOST = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9_.:-]{0,349}$")
_PART = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,79}$")
_TAG = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,79}$")


@dataclass(frozen=True)
class ModelName:
    host: str
    namespace: str
    model: str
    tag: str

    @property
    def display(self) -> str:
        """The short form clients see: `model:tag`, or `namespace/model:tag` outside the library."""
        if self.host != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"

    def parts(self) -> tuple[str, str, str, str]:
        return self.host, self.namespace, self.model, self.tag


def parse_name(raw: str) -> ModelName:
    """Parse and validate a model name; raises BadRequest with the reason."""
    if not isinstance(raw, str) or not raw.strip():
        raise BadRequest("model name is required")
    text = raw.strip()
    if len(text) > 512:
        raise BadRequest("model name is too long")
    tag = DEFAULT_TAG
    slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > slash:
        text, tag = text[:colon], text[colon + 1 :]
    pieces = text.split("/")
    if len(pieces) > 3 or any(p == "" for p in pieces):
        raise BadRequest(f"invalid model name '{raw}'")
    host, namespace = DEFAULT_HOST, DEFAULT_NAMESPACE
    if len(pieces) == 3:
        host, namespace, model = pieces
    elif len(pieces) == 2:
        namespace, model = pieces
    else:
        (model,) = pieces
    if not _HOST.match(host) or not _PART.match(namespace) or not _PART.match(model) or not _TAG.match(tag):
        raise BadRequest(f"invalid model name '{raw}'")
    if any(p in (".", "..") or ".." in p for p in (host, namespace, model, tag)):
        raise BadRequest(f"invalid model name '{raw}'")
    return ModelName(host.lower(), namespace.lower(), model.lower(), tag.lower())


DIGEST = re.compile(r"^sha256[:-]([0-9a-f]{64})$")


def parse_digest(raw: str) -> str:
    """Validate a blob digest (`sha256:<hex>` or `sha256-<hex>`) and return the hex part."""
    match = DIGEST.match(raw or "")
    if not match:
        raise BadRequest("invalid digest: expected sha256:<64 lowercase hex characters>")
    return match.group(1)
