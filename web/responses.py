"""Responses: fast JSON (orjson, numpy arrays included), and streams primed so that early errors get
a real status code, framed as NDJSON (Ollama) or SSE (OpenAI).

A stream's first event is awaited before the response starts, so an unknown model, a full queue or
a load failure is answered with its own status code. An error after that is sent as the stream's
last item (`{"error": ...}`), which is how Ollama and OpenAI clients expect it. A stream is closed, down
to the generation and its place on a runner, as soon as its response ends, the client gone included.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import anyio
import orjson
from fastapi.responses import Response, StreamingResponse

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


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)


def json_response(content: Any, status_code: int = 200) -> Response:
    """A JSON response without FastAPI's per-element encoder walk (which dominates for embeddings)."""
    return Response(dumps(content), status_code=status_code, media_type="application/json")


def _error_text(exc: Exception) -> str:
    if isinstance(exc, ApplianceError):
        return exc.message
    log.exception("error while streaming")
    return "internal error while streaming the response"


class ClosingStreamingResponse(StreamingResponse):
    """A stream whose body is closed as soon as the response ends, the client gone included.

    Starlette leaves a body that was not read to the end for the garbage collector; ours hold a place
    on a model runner (and its generation) until they are closed, so a client that went away would keep
    the place until a collection that may not come for minutes.
    """

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[union-attr]


def ndjson_response(items: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        async with aclosing(items):
            try:
                async for item in items:
                    yield dumps(item) + b"\n"
            except Exception as exc:
                yield dumps({"error": _error_text(exc)}) + b"\n"

    return ClosingStreamingResponse(body(), media_type="application/x-ndjson")


def sse_response(items: AsyncIterator[dict[str, Any]], error_body: Callable[[str], dict]) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        async with aclosing(items):
            try:
                async for item in items:
                    yield b"data: " + dumps(item) + b"\n\n"
            except Exception as exc:
                yield b"data: " + dumps(error_body(_error_text(exc))) + b"\n\n"
        yield b"data: [DONE]\n\n"

    return ClosingStreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
