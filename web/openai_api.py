"""The OpenAI-compatible API (/v1/*): chat completions, completions, embeddings, models."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Depends, Request

from appliance.answers.rag import AnswerDone
from appliance.errors import BadRequest, NotFound
from appliance.inference.engine import Finished, GenerationRequest, Token
from appliance.models.names import parse_name
from appliance.retrieval.embeddings import DEFAULT_EMBEDDING_MODEL
from web.body import get, read_json
from web.caller import Caller, caller
from web.rag_api import created_at, rag_chat_events, rag_collection, readable_collections, refuse_outside_chat
from web.responses import json_response, primed, sse_response

router = APIRouter(prefix="/v1")
FINGERPRINT = "fp_appliance"


def error_body(message: str, status: int = 500) -> dict[str, Any]:
    kind = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "invalid_request_error",
        413: "invalid_request_error",
        503: "server_error",
    }.get(status, "api_error")
    code = {401: "invalid_api_key", 404: "model_not_found"}.get(status)
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _text_content(content: Any, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise BadRequest(f"messages[{index}]: only text content parts are supported")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise BadRequest(f"messages[{index}].content must be a string or a list of parts")


def _options(body: dict[str, Any], default_max_tokens: int | None = None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    max_tokens = get(body, "max_completion_tokens", int) or get(body, "max_tokens", int) or default_max_tokens
    if max_tokens is not None:
        if max_tokens < 1:
            raise BadRequest("max_tokens must be at least 1")
        options["num_predict"] = max_tokens
    for ours, theirs in (
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("seed", "seed"),
        ("frequency_penalty", "frequency_penalty"),
        ("presence_penalty", "presence_penalty"),
    ):
        value = get(body, theirs, (int, float))
        if value is not None:
            options[ours] = value
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise BadRequest("stop must be a string or a list of strings")
        options["stop"] = stop
    if get(body, "n", int, 1) != 1:
        raise BadRequest("only n=1 is supported")
    return options


def _response_format(body: dict[str, Any]) -> Any:
    spec = get(body, "response_format", dict)
    if not spec or spec.get("type") in (None, "text"):
        return None
    if spec.get("type") == "json_object":
        return "json"
    if spec.get("type") == "json_schema":
        schema = (spec.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise BadRequest("response_format.json_schema.schema must be an object")
        return schema
    raise BadRequest("response_format.type must be text, json_object or json_schema")


def _finish_reason(done: Finished) -> str:
    if done.tool_calls:
        return "tool_calls"
    return "length" if done.done_reason == "length" else "stop"


def _usage_of(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _usage(done: Finished) -> dict[str, int]:
    return _usage_of(done.prompt_eval_count, done.eval_count)


def _include_usage(body: dict[str, Any]) -> bool:
    """`stream_options.include_usage`: end the stream with a chunk of no choices that carries the usage."""
    return bool((get(body, "stream_options", dict) or {}).get("include_usage"))


def _usage_chunk(chunk: dict[str, Any], usage: dict[str, int]) -> dict[str, Any]:
    """The stream's last chunk when usage was asked for: `chunk`'s envelope, no choices, the usage."""
    return {**chunk, "choices": [], "usage": usage}


def _openai_tool_calls(done: Finished) -> list[dict[str, Any]]:
    return [
        {
            "id": call["id"],
            "type": "function",
            "index": i,
            "function": {"name": call["function"]["name"], "arguments": json.dumps(call["function"]["arguments"])},
        }
        for i, call in enumerate(done.tool_calls)
    ]


@router.post("/chat/completions")
async def chat_completions(request: Request, me: Caller = Depends(caller)):
    body = await read_json(request)
    raw_messages = get(body, "messages", list, required=True)
    messages = []
    for index, message in enumerate(raw_messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"messages[{index}] must be an object with a 'role'")
        role = "system" if message["role"] == "developer" else message["role"]
        messages.append({"role": role, "content": _text_content(message.get("content"), index)})
    model = get(body, "model", str, required=True)
    collection = rag_collection(model)
    if collection is not None:
        return await _rag_completion(request, me, body, collection, messages)
    generation = GenerationRequest(
        model=model,
        messages=messages,
        format=_response_format(body),
        options=_options(body),
        tools=get(body, "tools", list),
        user=me.access.requester,
    )
    events = await primed(request.app.state.engine.generate(generation))
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    display = parse_name(model).display

    if get(body, "stream", bool, False):
        include_usage = _include_usage(body)

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": display,
                "system_fingerprint": FINGERPRINT,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            }

        async def items() -> AsyncIterator[dict[str, Any]]:
            first = True
            async with aclosing(events):
                async for event in events:
                    if isinstance(event, Token):
                        delta = {"role": "assistant", "content": event.text} if first else {"content": event.text}
                        first = False
                        yield chunk(delta, None)
                    else:
                        delta = {"role": "assistant", "content": ""} if first else {}
                        if event.tool_calls:
                            delta["tool_calls"] = _openai_tool_calls(event)
                        yield chunk(delta, _finish_reason(event))
                        if include_usage:
                            yield _usage_chunk(chunk({}, None), _usage(event))

        return sse_response(items(), error_body)

    pieces: list[str] = []
    async for event in events:
        if isinstance(event, Token):
            pieces.append(event.text)
            continue
        message: dict[str, Any] = {"role": "assistant", "content": "".join(pieces)}
        if event.tool_calls:
            message["tool_calls"] = _openai_tool_calls(event)
        return json_response(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": display,
                "system_fingerprint": FINGERPRINT,
                "choices": [{"index": 0, "message": message, "finish_reason": _finish_reason(event), "logprobs": None}],
                "usage": _usage(event),
            }
        )
    raise BadRequest("no response was generated")


async def _rag_completion(
    request: Request, me: Caller, body: dict[str, Any], collection: str, messages: list[dict[str, Any]]
):
    """`rag/<collection>` as a chat model: the answer with a Sources block; `citations` on the last chunk.

    `finish_reason` is the answer's `done_reason` ("length" when the model's generation hit `max_tokens`); the
    usage counts the tokens of the answer's generation (none for an answer made without the model)."""
    events = await rag_chat_events(request, me, collection, messages, _options(body))
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    display = f"rag/{collection}:latest"

    def envelope(kind: str, choice: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": kind,
            "created": created,
            "model": display,
            "system_fingerprint": FINGERPRINT,
            "choices": [choice],
        }

    def usage(done: AnswerDone) -> dict[str, int]:
        return _usage_of(done.timings.get("prompt_eval_count", 0), done.timings.get("eval_count", 0))

    if get(body, "stream", bool, False):
        include_usage = _include_usage(body)

        async def items() -> AsyncIterator[dict[str, Any]]:
            first = True
            async with aclosing(events):
                async for event in events:
                    if isinstance(event, Token):
                        delta = {"role": "assistant", "content": event.text} if first else {"content": event.text}
                        first = False
                        yield envelope("chat.completion.chunk", {"index": 0, "delta": delta, "finish_reason": None})
                    elif isinstance(event, AnswerDone):
                        finish = {"index": 0, "delta": {}, "finish_reason": event.done_reason}
                        item = envelope("chat.completion.chunk", finish)
                        item.update(citations=[c.public() for c in event.citations], grounded=event.grounded)
                        yield item
                        if include_usage:
                            yield _usage_chunk(envelope("chat.completion.chunk", finish), usage(event))

        return sse_response(items(), error_body)
    pieces: list[str] = []
    async for event in events:
        if isinstance(event, Token):
            pieces.append(event.text)
        elif isinstance(event, AnswerDone):
            citations = [c.public() for c in event.citations]
            message = {"role": "assistant", "content": "".join(pieces), "citations": citations}
            item = envelope("chat.completion", {"index": 0, "message": message, "finish_reason": event.done_reason})
            item.update(usage=usage(event), citations=citations, grounded=event.grounded)
            return json_response(item)
    raise BadRequest("no answer was produced")


@router.post("/completions")
async def completions(request: Request, me: Caller = Depends(caller)):
    body = await read_json(request)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string (or a list of one string)")
    model = get(body, "model", str, required=True)
    await asyncio.to_thread(refuse_outside_chat, request, me.access, model, "/v1/chat/completions")
    generation = GenerationRequest(
        model=model, prompt=prompt, raw=True, options=_options(body, 16), user=me.access.requester
    )
    events = await primed(request.app.state.engine.generate(generation))
    completion_id = f"cmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    display = parse_name(model).display

    def shaped(text: str, finish: str | None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": display,
            "system_fingerprint": FINGERPRINT,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
        }

    if get(body, "stream", bool, False):
        include_usage = _include_usage(body)

        async def items() -> AsyncIterator[dict[str, Any]]:
            async with aclosing(events):
                async for event in events:
                    if isinstance(event, Token):
                        yield shaped(event.text, None)
                    else:
                        yield shaped("", _finish_reason(event))
                        if include_usage:
                            yield _usage_chunk(shaped("", None), _usage(event))

        return sse_response(items(), error_body)
    pieces: list[str] = []
    async for event in events:
        if isinstance(event, Token):
            pieces.append(event.text)
        else:
            return json_response({**shaped("".join(pieces), _finish_reason(event)), "usage": _usage(event)})
    raise BadRequest("no response was generated")


@router.post("/embeddings")
async def embeddings(request: Request, me: Caller = Depends(caller)):
    body = await read_json(request)
    raw_input = body.get("input")
    inputs = [raw_input] if isinstance(raw_input, str) else raw_input
    if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) for t in inputs):
        raise BadRequest("input must be a non-empty string or list of strings (token arrays are not supported)")
    encoding = get(body, "encoding_format", str, "float")
    if encoding not in ("float", "base64"):
        raise BadRequest("encoding_format must be float or base64")
    model = get(body, "model", str, required=True)
    await asyncio.to_thread(refuse_outside_chat, request, me.access, model, "/v1/chat/completions")
    result, _load = await request.app.state.engine.embed(
        model, inputs, dimensions=get(body, "dimensions", int), user=me.access.requester
    )
    data = []
    for index, vector in enumerate(result.vectors):
        value: Any = vector
        if encoding == "base64":
            value = base64.b64encode(vector.astype("<f4").tobytes()).decode()
        data.append({"object": "embedding", "embedding": value, "index": index})
    return json_response(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
        }
    )


async def _model_entries(request: Request, me: Caller) -> list[dict[str, Any]]:
    records = await asyncio.to_thread(request.app.state.store.list)
    collections = await asyncio.to_thread(readable_collections, request, me.access)
    dates = await asyncio.to_thread(created_at, request, collections)
    entries = [
        {
            "id": r.name.display,
            "object": "model",
            "created": int(r.modified_at.timestamp()),
            "owned_by": r.name.namespace,
        }
        for r in records
    ]
    entries.append(
        {"id": f"{DEFAULT_EMBEDDING_MODEL}:latest", "object": "model", "created": 0, "owned_by": "appliance"}
    )
    for c in collections:  # dated by the collection's creation (0 for a collection with no record of it)
        created = int(dates[c].timestamp()) if c in dates else 0
        entries.append({"id": f"rag/{c}:latest", "object": "model", "created": created, "owned_by": "appliance"})
    return entries


@router.get("/models")
async def models(request: Request, me: Caller = Depends(caller)):
    return {"object": "list", "data": await _model_entries(request, me)}


@router.get("/models/{model:path}")
async def model(model: str, request: Request, me: Caller = Depends(caller)):
    wanted = parse_name(model).display
    for entry in await _model_entries(request, me):
        if entry["id"] == wanted:
            return entry
    raise NotFound(f"model '{model}' not found")
