"""The Ollama-compatible API (/api/*), wire-compatible with the official clients.

Routes parse and authorize (`web.caller`; managing models is the `manage_models` right), then call the
inference engine, the model store, or `appliance.answers.asking` for a `rag/<collection>` chat; nothing else.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy import func
from sqlmodel import select

from appliance import __version__
from appliance.answers.rag import AnswerDone
from appliance.db import Document, session
from appliance.errors import BadRequest, NotFound, Withheld
from appliance.inference.engine import Finished, GenerationRequest, Token
from appliance.models.create import create_model, modelfile_from_api
from appliance.models.modelfile import parse_modelfile, render_modelfile
from appliance.models.names import parse_digest, parse_name
from appliance.models.store import ModelRecord
from appliance.retrieval.embeddings import DEFAULT_EMBEDDING_MODEL
from web.body import get, model_name, read_json
from web.caller import Caller, caller, requires
from web.rag_api import rag_chat_events, rag_collection, readable_collections
from web.responses import json_response, ndjson_response, primed

router = APIRouter(prefix="/api")
manage_models = requires("manage_models", "this operation requires the admin role")
EMBEDDING_DISPLAY = f"{DEFAULT_EMBEDDING_MODEL}:latest"


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _state(request: Request):
    return request.app.state


# --- generation --------------------------------------------------------------------------------
def _messages(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise BadRequest("'messages' must be a list")
    messages = []
    for index, message in enumerate(raw):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"messages[{index}] must be an object with a 'role'")
        content = message.get("content") or ""
        if not isinstance(content, str):
            raise BadRequest(f"messages[{index}].content must be a string")
        if message.get("images"):
            raise BadRequest("images are not supported by this server's models")
        entry: dict[str, Any] = {"role": message["role"], "content": content}
        if message.get("tool_calls"):
            entry["tool_calls"] = message["tool_calls"]
        if message.get("tool_name"):
            entry["name"] = message["tool_name"]
        messages.append(entry)
    return messages


def _generation_request(body: dict[str, Any], chat: bool, me: Caller) -> GenerationRequest:
    tools = get(body, "tools", list)
    if body.get("images"):
        raise BadRequest("images are not supported by this server's models")
    return GenerationRequest(
        model=model_name(body),
        messages=_messages(body.get("messages") or []) if chat else None,
        prompt=None if chat else get(body, "prompt", str, ""),
        system=None if chat else get(body, "system", str),
        template=None if chat else _request_template(get(body, "template", str), me),
        raw=bool(get(body, "raw", bool, False)),
        format=body.get("format"),
        options=get(body, "options", dict, {}),
        keep_alive=body.get("keep_alive"),
        tools=tools,
        truncate=bool(get(body, "truncate", bool, True)),
    )


def _request_template(template: str | None, me: Caller) -> str | None:
    """A template sent with the request replaces the model's own: for those who manage models only, since a
    template is code that runs here (sandboxed and bounded, but able to cost CPU and memory)."""
    if template:
        me.require(
            "manage_models", message="only administrators may send a 'template'; leave it out to use the model's own"
        )
    return template or None


async def _generation(request: Request, chat: bool, body: dict[str, Any], me: Caller):
    generation = _generation_request(body, chat, me)
    generation.user = me.access.requester
    stream = bool(get(body, "stream", bool, True))
    engine = _state(request).engine
    model = generation.model  # echoed as the request named it, as Ollama does
    events = await primed(engine.generate(generation))

    def shape(text: str) -> dict[str, Any]:
        if chat:
            return {
                "model": model,
                "created_at": now_iso(),
                "message": {"role": "assistant", "content": text},
                "done": False,
            }
        return {"model": model, "created_at": now_iso(), "response": text, "done": False}

    def final(done: Finished, text: str) -> dict[str, Any]:
        item = shape(text)
        if chat and done.tool_calls:
            item["message"]["tool_calls"] = done.tool_calls
        item.update(done=True, done_reason=done.done_reason, **done.timings())
        return item

    return await _respond(events, stream, shape, final)


async def _respond(events: AsyncIterator[Any], stream: bool, shape, final):
    """Token events shaped as NDJSON lines (or gathered into one object), closed by `final`."""
    if stream:

        async def items() -> AsyncIterator[dict[str, Any]]:
            async with aclosing(events):
                async for event in events:
                    yield shape(event.text) if isinstance(event, Token) else final(event, "")

        return ndjson_response(items())
    pieces: list[str] = []
    async for event in events:
        if isinstance(event, Token):
            pieces.append(event.text)
        else:
            return json_response(final(event, "".join(pieces)))
    raise BadRequest("no response was generated")


@router.post("/generate")
async def generate(request: Request, me: Caller = Depends(caller)):
    body = await read_json(request)
    if rag_collection(model_name(body)) is not None:
        raise BadRequest("RAG models answer through /api/chat")
    return await _generation(request, False, body, me)


@router.post("/chat")
async def chat(request: Request, me: Caller = Depends(caller)):
    body = await read_json(request)
    collection = rag_collection(model_name(body))
    if collection is None:
        return await _generation(request, True, body, me)
    if get(body, "tools", list):
        await _readable_rag_model(request, me, collection)  # a hidden collection stays a missing model
        raise BadRequest(f"rag/{collection}:latest does not support tools")
    return await _rag_chat(request, me, body, collection)


_RAG_TIMINGS = ("load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration")


async def _rag_chat(request: Request, me: Caller, body: dict[str, Any], collection: str):
    """`rag/<collection>` as a chat model: the answer, a Sources block, and structured `citations`."""
    model = model_name(body)
    messages = _messages(body.get("messages") or [])
    started = time.perf_counter_ns()
    events = await rag_chat_events(request, me, collection, messages, get(body, "options", dict))

    def shape(text: str) -> dict[str, Any]:
        return {
            "model": model,
            "created_at": now_iso(),
            "message": {"role": "assistant", "content": text},
            "done": False,
        }

    def final(done: AnswerDone, text: str) -> dict[str, Any]:
        item = shape(text)
        item["message"]["citations"] = [c.public() for c in done.citations]
        item.update(
            done=True,
            done_reason=done.done_reason,
            grounded=done.grounded,
            citations=item["message"]["citations"],
            total_duration=time.perf_counter_ns() - started,
            **{k: v for k, v in done.timings.items() if k in _RAG_TIMINGS},
        )
        return item

    return await _respond(events, get(body, "stream", bool, True), shape, final)


# --- embeddings --------------------------------------------------------------------------------
@router.post("/embed")
async def embed(request: Request, me: Caller = Depends(caller)):
    body = await read_json(request)
    started = datetime.now(UTC)
    raw_input = body.get("input", [])
    inputs = [raw_input] if isinstance(raw_input, str) else raw_input
    if not isinstance(inputs, list) or not all(isinstance(t, str) for t in inputs):
        raise BadRequest("'input' must be a string or a list of strings")
    name = model_name(body)
    result, load_ns = await _state(request).engine.embed(
        name,
        inputs,
        truncate=bool(get(body, "truncate", bool, True)),
        dimensions=get(body, "dimensions", int),
        options=get(body, "options", dict, {}),
        keep_alive=body.get("keep_alive"),
        user=me.access.requester,
    )
    total = int((datetime.now(UTC) - started).total_seconds() * 1e9)
    return json_response(
        {
            "model": name,
            "embeddings": result.vectors,
            "total_duration": total,
            "load_duration": load_ns,
            "prompt_eval_count": result.prompt_tokens,
        }
    )


@router.post("/embeddings")
async def embeddings_legacy(request: Request, me: Caller = Depends(caller)):
    body = await read_json(request)
    prompt = get(body, "prompt", str, "")
    if not prompt:
        return {"embedding": []}
    result, _load = await _state(request).engine.embed(
        model_name(body),
        [prompt],
        options=get(body, "options", dict, {}),
        keep_alive=body.get("keep_alive"),
        user=me.access.requester,
    )
    return json_response({"embedding": result.vectors[0]})


# --- listing and inspection --------------------------------------------------------------------
def _embedding_entry(request: Request) -> dict[str, Any]:
    embedder = _state(request).embedder
    return {
        "name": EMBEDDING_DISPLAY,
        "model": EMBEDDING_DISPLAY,
        "modified_at": _state(request).started_at,
        "size": embedder.disk_size,
        "digest": hashlib.sha256(str(embedder.path).encode()).hexdigest(),
        "details": {
            "parent_model": "",
            "format": "safetensors",
            "family": "bert",
            "families": ["bert"],
            "parameter_size": "23M",
            "quantization_level": "F32",
        },
    }


def _tag_entry(record: ModelRecord) -> dict[str, Any]:
    name = record.name.display
    return {
        "name": name,
        "model": name,
        "modified_at": record.modified_at.isoformat().replace("+00:00", "Z"),
        "size": record.size,
        "digest": record.digest,
        "details": record.details,
    }


_RAG_DETAILS = {
    "parent_model": "",
    "format": "rag",
    "family": "rag",
    "families": ["rag"],
    "parameter_size": "",
    "quantization_level": "",
}


def _rag_entry(collection: str, modified_at: str) -> dict[str, Any]:
    name = f"rag/{collection}:latest"
    return {
        "name": name,
        "model": name,
        "modified_at": modified_at,
        "size": 0,
        "digest": hashlib.sha256(name.encode()).hexdigest(),
        "details": dict(_RAG_DETAILS),
    }


def _collections_changed_at(request: Request) -> dict[str, str]:
    """When each collection with indexed documents last gained one: its rag model's stable modified_at."""
    query = (
        select(Document.collection, func.max(Document.created_at))
        .where(Document.status == "indexed")
        .group_by(Document.collection)
    )
    with session(_state(request).db) as db:
        return {collection: _iso(added) for collection, added in db.exec(query).all()}


def _iso(moment: datetime) -> str:
    """A database time (stored without a zone, in UTC) as Ollama writes times."""
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat().replace("+00:00", "Z")


def _readable_rag_models(request: Request, me: Caller) -> dict[str, str]:
    """The caller's `rag/<collection>` models (what /api/tags lists), collection -> modified_at."""
    changed = _collections_changed_at(request)
    readable = readable_collections(request, me.access)
    return {c: changed.get(c, _state(request).started_at) for c in readable}


async def _readable_rag_model(request: Request, me: Caller, collection: str) -> str:
    """The modified_at of `rag/<collection>`; a collection the caller may not read is answered like a missing
    model (and audited as a refusal)."""

    def lookup() -> str:
        models = _readable_rag_models(request, me)
        if collection in models:
            return models[collection]
        refusal = Withheld if collection in _collections_changed_at(request) else NotFound
        raise refusal(f"model 'rag/{collection}:latest' not found")

    return await asyncio.to_thread(lookup)


@router.get("/tags")
async def tags(request: Request, me: Caller = Depends(caller)):
    records = await asyncio.to_thread(_state(request).store.list)
    rag_models = await asyncio.to_thread(_readable_rag_models, request, me)
    return {
        "models": [_tag_entry(r) for r in records]
        + [_embedding_entry(request)]
        + [_rag_entry(c, modified_at) for c, modified_at in rag_models.items()]
    }


def _parameters_text(parameters: dict[str, Any]) -> str:
    lines = []
    for key, value in parameters.items():
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"{key:<30} {item}")
    return "\n".join(lines)


@router.post("/show")
async def show(request: Request, me: Caller = Depends(caller)):
    body = await read_json(request)
    name = model_name(body)
    state = _state(request)
    collection = rag_collection(name)
    if collection is not None:
        return await _show_rag(request, me, collection)
    if parse_name(name).display == EMBEDDING_DISPLAY:
        await state.embedder.aload()
        entry = _embedding_entry(request)
        return {
            "modelfile": f"# bundled sentence-transformers model\nFROM {DEFAULT_EMBEDDING_MODEL}\n",
            "parameters": "",
            "template": "",
            "details": entry["details"],
            "model_info": {
                "general.architecture": "bert",
                "general.parameter_count": 22_700_000,
                "bert.embedding_length": state.embedder.dimensions,
                "bert.context_length": state.embedder.max_tokens,
            },
            "capabilities": ["embedding"],
            "modified_at": entry["modified_at"],
        }
    record = await asyncio.to_thread(state.store.resolve, name)
    info = await asyncio.to_thread(state.store.gguf_info, record.model_digest)
    template = state.store.chat_template(record) or ""
    capabilities = state.engine.capabilities(record)
    result = {
        "modelfile": render_modelfile(
            record.name.display,
            f"sha256-{record.model_digest}",
            record.parameters,
            record.template,
            record.system,
            record.license,
        ),
        "parameters": _parameters_text(record.parameters),
        "template": template,
        "details": record.details,
        "model_info": info.model_info(),
        "capabilities": capabilities,
        "modified_at": record.modified_at.isoformat().replace("+00:00", "Z"),
    }
    if record.system:
        result["system"] = record.system
    if record.license:
        result["license"] = record.license
    return result


async def _show_rag(request: Request, me: Caller, collection: str) -> dict[str, Any]:
    """`rag/<collection>` described by the model that writes its answers (LlamaIndex reads the context length
    from model_info before every request); it completes chats, with citations, and takes no tools."""
    modified_at = await _readable_rag_model(request, me, collection)
    state = _state(request)
    name = f"rag/{collection}:latest"
    record = await asyncio.to_thread(state.answerer.generation_model, None)
    if record is None:  # no generation model: answers quote the passages themselves
        writer = "no generation model is installed: answers quote the passages that answer the question"
        details = dict(_RAG_DETAILS)
        model_info = {"general.architecture": "rag", "rag.context_length": state.settings.scheduler.num_ctx}
    else:
        writer = f"answers are written by {record.name.display}"
        details = {**record.details, "parent_model": record.name.display}
        model_info = (await asyncio.to_thread(state.store.gguf_info, record.model_digest)).model_info()
    modelfile = (
        f"# {name}: answers from the documents of collection '{collection}' that the caller may read,\n"
        f"# with a Sources block and structured citations; {writer}.\n"
        f"# The appliance's own grounded prompt replaces any template; tools are not supported.\n"
    )
    if record is not None:
        modelfile += f"FROM {record.name.display}\n"
    return {
        "modelfile": modelfile,
        "parameters": "",
        "template": "",
        "details": details,
        "model_info": model_info,
        "capabilities": ["completion"],
        "modified_at": modified_at,
    }


@router.get("/ps")
async def ps(request: Request, _: Caller = Depends(caller)):
    models = []
    for loaded in _state(request).scheduler.loaded():
        record = loaded.record
        n_layers = int(_state(request).store.gguf_info(record.model_digest).arch_value("block_count", 0) or 0)
        vram = int(loaded.size * min(1.0, loaded.gpu_layers / n_layers)) if n_layers and loaded.gpu_layers else 0
        if loaded.placement:
            vram = 0  # the offloaded layers are on cluster workers, not on a local GPU
        models.append(
            {
                "name": record.name.display,
                "model": record.name.display,
                "size": loaded.size,
                "digest": record.digest,
                "details": record.details,
                "expires_at": (loaded.expires_at or datetime.now(UTC)).isoformat().replace("+00:00", "Z"),
                "size_vram": vram,
                "context_length": loaded.n_ctx,
                "runner": {
                    "pid": loaded.runner.pid,
                    "embedding": loaded.slot[1],
                    "gpu_layers": loaded.gpu_layers,
                    "parallel": loaded.n_parallel,
                },
                **({"cluster": {"nodes": loaded.placement}} if loaded.placement else {}),
            }
        )
    return {"models": models}


@router.get("/version")
async def version():
    return {"version": __version__}


# --- model management (the manage_models right) ------------------------------------------------
@router.post("/copy")
async def copy(request: Request, _: Caller = Depends(manage_models)):
    body = await read_json(request)
    source = get(body, "source", str, required=True)
    destination = get(body, "destination", str, required=True)
    await asyncio.to_thread(_state(request).store.copy, source, destination)
    return Response(status_code=200)


@router.delete("/delete")
async def delete(request: Request, _: Caller = Depends(manage_models)):
    body = await read_json(request)
    name = model_name(body)
    state = _state(request)
    record = await asyncio.to_thread(state.store.resolve, name)
    await state.scheduler.unload(record.name.display)
    await asyncio.to_thread(state.store.remove, name)
    return Response(status_code=200)


@router.post("/create")
async def create(request: Request, _: Caller = Depends(manage_models)):
    body = await read_json(request)
    name = model_name(body)
    files = get(body, "files", dict)
    if isinstance(body.get("modelfile"), str) and body["modelfile"].strip():
        spec = parse_modelfile(body["modelfile"])  # older clients send the Modelfile text
    else:
        spec = modelfile_from_api(body)
    quantize = get(body, "quantize", str)
    stream = bool(get(body, "stream", bool, True))
    statuses: list[str] = []
    store = _state(request).store
    # Creation is quick unless quantizing; statuses are collected and sent once it is done, so that a
    # failure is answered with its own status code.
    await asyncio.to_thread(create_model, store, name, spec, files=files, quantize=quantize, progress=statuses.append)
    if not stream:
        return {"status": "success"}

    async def items() -> AsyncIterator[dict[str, Any]]:
        for status in statuses:
            yield {"status": status}

    return ndjson_response(items())


@router.api_route("/blobs/{digest}", methods=["HEAD"])
async def blob_exists(digest: str, request: Request, _: Caller = Depends(manage_models)):
    parse_digest(digest)
    return Response(status_code=200 if _state(request).store.has_blob(digest) else 404)


@router.post("/blobs/{digest}")
async def blob_upload(digest: str, request: Request, _: Caller = Depends(manage_models)):
    expected = parse_digest(digest)
    state = _state(request)
    if state.store.has_blob(digest):
        async for _chunk in request.stream():
            pass
        return Response(status_code=201)
    writer = state.store.blob_writer(state.settings.server.max_blob_bytes)
    try:
        async for chunk in request.stream():
            writer.write(chunk)
    except BaseException:
        writer.abort()
        raise
    await asyncio.to_thread(writer.commit, expected)
    return Response(status_code=201)


@router.post("/pull")
async def pull(_: Caller = Depends(manage_models)):
    raise BadRequest(
        "pulling models is not available: the appliance has no internet access. Import a GGUF "
        "with `appliance create NAME --from FILE.gguf` or upload it with /api/blobs and /api/create"
    )


@router.post("/push")
async def push(_: Caller = Depends(manage_models)):
    raise BadRequest("pushing models is not available on the appliance")
