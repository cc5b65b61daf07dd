"""A stream the client stops reading is closed at once, down to the generation that holds a runner's place."""

import asyncio
import contextlib

import pytest
from starlette.requests import ClientDisconnect

from web.responses import ndjson_response, primed, sse_response


def _source(log: list[str]):
    async def generation():
        try:
            for number in range(1000):
                yield {"n": number}
                await asyncio.sleep(0)
        finally:
            log.append("closed")  # where the scheduler's place is given back

    return generation()


async def _serve_until_the_client_leaves(response, chunks_before_leaving: int) -> int:
    """Run the response as uvicorn does (ASGI 2.4): `send` fails once the client has gone."""
    sent = 0

    async def send(message):
        nonlocal sent
        if message["type"] == "http.response.body":
            sent += 1
            if sent > chunks_before_leaving:
                raise OSError("the client closed the connection")

    async def receive():
        await asyncio.sleep(3600)

    scope = {"type": "http", "asgi": {"spec_version": "2.4"}, "method": "GET", "path": "/"}
    with contextlib.suppress(ClientDisconnect):  # what Starlette makes of the OSError
        await response(scope, receive, send)
    return sent


@pytest.mark.parametrize(
    ("respond", "sends"),
    [(ndjson_response, 3), (lambda items: sse_response(items, lambda text: {"error": text}), 2)],
    ids=["ndjson", "sse"],
)
def test_a_client_that_leaves_closes_the_stream_and_its_source(respond, sends):
    log: list[str] = []

    async def scenario():
        response = respond(await primed(_source(log)))
        await _serve_until_the_client_leaves(response, sends)
        # The response is still referenced here: only an explicit close, not the garbage collector, ran it.
        assert log == ["closed"]
        assert response is not None

    asyncio.run(scenario())


def test_a_stream_read_to_the_end_closes_its_source_once():
    log: list[str] = []

    async def scenario():
        response = ndjson_response(await primed(_source(log)))
        sent = await _serve_until_the_client_leaves(response, 10_000)
        assert sent == 1001  # a thousand items and the closing empty body
        assert log == ["closed"]

    asyncio.run(scenario())
