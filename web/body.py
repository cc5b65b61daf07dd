"""Reading JSON request bodies with clear 400 errors for malformed JSON, nesting too deep and wrong types."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from appliance.errors import BadRequest, PayloadTooLarge

# No request of these APIs nests deeper than a JSON schema in `format` or a tool's parameters do (a
# dozen levels); the cap keeps deeper input away from code that walks it recursively.
MAX_JSON_DEPTH = 64


async def read_json(request: Request) -> dict[str, Any]:
    limit = request.app.state.settings.server.max_request_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body larger than {limit} bytes")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise PayloadTooLarge(f"request body larger than {limit} bytes")
    if not raw.strip():
        raise BadRequest("missing request body")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise BadRequest(f"JSON in request body nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"invalid JSON in request body: {exc}") from None
    if _depth_over(body, MAX_JSON_DEPTH):
        raise BadRequest(f"JSON in request body nested deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def _depth_over(value: Any, limit: int) -> bool:
    """Whether lists and objects nest deeper than `limit` (walked without recursion)."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        pending.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def get(
    body: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = None, *, required: bool = False
) -> Any:
    """body[key] checked against `kind`; None/missing gives `default` (or a 400 if required)."""
    value = body.get(key)
    if value is None:
        if required:
            raise BadRequest(f"'{key}' is required")
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if bool not in kinds and isinstance(value, bool) and (int in kinds or float in kinds):
        raise BadRequest(f"'{key}' has the wrong type")
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise BadRequest(f"'{key}' must be of type {names}")
    return value


def model_name(body: dict[str, Any]) -> str:
    """Ollama accepts `model` and the older `name`."""
    name = body.get("model") or body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise BadRequest("'model' is required")
    return name
