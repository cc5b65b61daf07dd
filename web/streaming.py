"""Streaming helpers: prime a stream so early errors get a real status, then NDJSON or SSE framing.

A stream's first event is awaited before the response starts, so an unknown model, a full queue or
a load failure is answered with its own status code. An error after that is sent as the stream's
last item (`{"error": ...}`), which is how Ollama and OpenAI clients expect it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse

from appliance.errors import ApplianceError

log = logging.getLogger(__name__)


async def primed(stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """Await the first item now (errors raise here), return an iterator over all items."""
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        first = None
        empty = True
    else:
        empty = False

    async def rest() -> AsyncIterator[Any]:
        try:
            if not empty:
                yield first
            async for item in stream:
                yield item
        finally:
            await stream.aclose()

    return rest()


def _error_text(exc: Exception) -> str:
    if isinstance(exc, ApplianceError):
        return exc.message
    log.exception("error while streaming")
    return "internal error while streaming the response"


def ndjson_response(items: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        try:
            async for item in items:
                yield (json.dumps(item, ensure_ascii=False) + "\n").encode()
        except Exception as exc:
            yield (json.dumps({"error": _error_text(exc)}) + "\n").encode()

    return StreamingResponse(body(), media_type="application/x-ndjson")


def sse_response(items: AsyncIterator[dict[str, Any]], error_body: Callable[[str], dict]) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        try:
            async for item in items:
                yield f"data: {json.dumps(item, ensure_ascii=False)}\n\n".encode()
        except Exception as exc:
            yield f"data: {json.dumps(error_body(_error_text(exc)))}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
