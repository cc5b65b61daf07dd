"""The inference service: turns chat, generate and embed requests into runner work.

Shared by the Ollama API, the OpenAI API and the CLI, so they cannot disagree: option merging
(model PARAMETERs, then the request's options; unknown keys ignored), templating, JSON/grammar
output constraints, tool-call parsing, the bundled embedding model, timings in nanoseconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import meta

from appliance.errors import BadRequest
from appliance.inference.scheduler import Scheduler, parse_keep_alive
from appliance.models.modelfile import PARAMETER_TYPES, coerce_parameter
from appliance.models.names import parse_name
from appliance.models.store import ModelRecord, ModelStore
from appliance.models.template import is_go_template, parse_tool_calls, render_chat, render_chat_isolated
from appliance.retrieval.embeddings import DEFAULT_EMBEDDING_MODEL, EmbeddingResult, SentenceEmbedder, shorten

log = logging.getLogger(__name__)
# Prompts are rendered on threads of their own, never on the shared default pool that file reads,
# hashing and searches use: a costly template (each render is stopped after RENDER_DEADLINE_S) then
# delays only other renders. A template sent with a request (administrators only) renders in a child
# process; one thread, apart from the models' own templates, waits for those children one at a time.
_MODEL_TEMPLATE_THREADS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="model-template")
_REQUEST_TEMPLATE_THREADS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="request-template")


@dataclass
class GenerationRequest:
    model: str
    messages: list[dict[str, Any]] | None = None  # chat
    prompt: str | None = None  # generate
    system: str | None = None
    template: str | None = None
    raw: bool = False
    format: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    keep_alive: Any = None
    tools: list[dict[str, Any]] | None = None
    truncate: bool = True
    user: str = ""  # who asks: waiting requests are admitted fairly across users
    grammar: str | None = None  # GBNF set by the appliance itself (answers' form); callers use `format`


@dataclass
class Token:
    text: str


@dataclass
class Finished:
    done_reason: str
    total_duration: int
    load_duration: int
    prompt_eval_count: int = 0
    prompt_eval_duration: int = 0
    eval_count: int = 0
    eval_duration: int = 0
    prompt_cache_count: int = 0  # prompt tokens the runner's cache already held (not re-processed)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def timings(self) -> dict[str, int]:
        return {
            "total_duration": self.total_duration,
            "load_duration": self.load_duration,
            "prompt_eval_count": self.prompt_eval_count,
            "prompt_eval_duration": self.prompt_eval_duration,
            "eval_count": self.eval_count,
            "eval_duration": self.eval_duration,
        }


def merge_options(model_parameters: dict[str, Any], request_options: dict[str, Any] | None) -> dict[str, Any]:
    """Model PARAMETERs overlaid by the request's options; unknown keys are ignored, bad types rejected."""
    if request_options is not None and not isinstance(request_options, dict):
        raise BadRequest("options must be an object")
    merged = dict(model_parameters)
    for key, value in (request_options or {}).items():
        if key in PARAMETER_TYPES and value is not None:
            merged[key] = coerce_parameter(key, value)
    return merged


def grammar_for(output_format: Any) -> str | None:
    """GBNF for Ollama's `format`: "json" or a JSON schema object."""
    if output_format in (None, ""):
        return None
    from llama_cpp import llama_grammar

    if output_format == "json":
        return llama_grammar.JSON_GBNF
    if isinstance(output_format, dict):
        try:
            return llama_grammar.json_schema_to_gbnf(json.dumps(output_format))
        except Exception as exc:
            raise BadRequest(f"invalid JSON schema in format: {exc}") from None
    raise BadRequest('format must be "json" or a JSON schema object')


_GO_TOOLS = re.compile(r"\.Tools\b")


@lru_cache(maxsize=256)
def template_supports_tools(template: str) -> bool:
    """Whether a chat template shows the model its tools, Ollama's test for the `tools` capability: a Go
    template reads `.Tools`, a Jinja template the variable `tools` (found by parsing, never rendering)."""
    if is_go_template(template):
        return bool(_GO_TOOLS.search(template))
    try:
        parsed = jinja2.Environment(autoescape=True).parse(template)  # parsed only: escaping never applies
        return "tools" in meta.find_undeclared_variables(parsed)
    except jinja2.TemplateError:
        return False


def _not_supported(request: GenerationRequest) -> BadRequest:
    """Ollama's refusal of a chat or generate request to a model that cannot write text."""
    return BadRequest(f'"{request.model}" does not support {"chat" if request.messages is not None else "generate"}')


@dataclass
class TokenUsage:
    """Tokens of finished generations since the process started, per model (read by /metrics)."""

    prompt: dict[str, int] = field(default_factory=dict)
    generated: dict[str, int] = field(default_factory=dict)

    def add(self, model: str, prompt_tokens: int, generated_tokens: int) -> None:
        self.prompt[model] = self.prompt.get(model, 0) + prompt_tokens
        self.generated[model] = self.generated.get(model, 0) + generated_tokens


class Engine:
    def __init__(self, store: ModelStore, scheduler: Scheduler, embedder: SentenceEmbedder):
        self.store = store
        self.scheduler = scheduler
        self.embedder = embedder
        self.usage = TokenUsage()

    def resolve(self, name: str) -> ModelRecord:
        if parse_name(name).display == f"{DEFAULT_EMBEDDING_MODEL}:latest":
            raise BadRequest(f"'{DEFAULT_EMBEDDING_MODEL}' is an embedding model and does not generate text")
        return self.store.resolve(name)

    def capabilities(self, record: ModelRecord, template: str | None = None) -> list[str]:
        """What a model can do, in Ollama's words: "embedding" for an embedding GGUF, else "completion", and
        "tools" when its chat template (or `template`, sent with a request) shows the model its tools."""
        if self.store.gguf_info(record.model_digest).is_embedding_model:
            return ["embedding"]
        if template_supports_tools(template or self.store.chat_template(record) or ""):
            return ["completion", "tools"]
        return ["completion"]

    def _check_capabilities(self, record: ModelRecord, request: GenerationRequest) -> None:
        """Refuse, as Ollama does, text from an embedding model and tools to a model that cannot see them."""
        capabilities = self.capabilities(record, request.template)
        if "completion" not in capabilities:
            raise _not_supported(request)
        if request.tools and "tools" not in capabilities:
            raise BadRequest(f"{record.name.display} does not support tools")

    def _prompt(self, record: ModelRecord, request: GenerationRequest) -> str:
        info = self.store.gguf_info(record.model_digest)
        template = request.template or self.store.chat_template(record)
        if request.messages is not None:
            messages = list(record.messages)
            system = request.system if request.system is not None else record.system
            if system and not any(m.get("role") == "system" for m in request.messages):
                messages.insert(0, {"role": "system", "content": system})
            messages += request.messages
        else:
            if request.raw:
                return request.prompt or ""
            system = request.system if request.system is not None else record.system
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": request.prompt or ""}
            ]
        render = render_chat_isolated if request.template else render_chat  # a caller's template: a child process
        return render(
            template,
            messages,
            tools=request.tools,
            bos_token=info.token_string("tokenizer.ggml.bos_token_id"),
            eos_token=info.token_string("tokenizer.ggml.eos_token_id"),
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Token | Finished]:
        """Stream tokens, then one Finished. An empty prompt/message list only loads (or unloads)."""
        started = time.perf_counter_ns()
        if parse_name(request.model).display == f"{DEFAULT_EMBEDDING_MODEL}:latest":
            raise _not_supported(request)
        record = self.store.resolve(request.model)
        options = merge_options(record.parameters, request.options)
        grammar = request.grammar or grammar_for(request.format)
        empty = (request.messages is not None and not request.messages) or (
            request.messages is None and not request.prompt
        )
        if empty:
            if request.keep_alive is not None and parse_keep_alive(request.keep_alive) == 0:
                await self.scheduler.unload(record.name.display)  # every runner of the model, chat and embedding
                yield Finished("unload", time.perf_counter_ns() - started, 0)
                return
            self._check_capabilities(record, request)
            await self.scheduler.load_only(record, options, request.keep_alive)
            load_duration = time.perf_counter_ns() - started  # this request's wait for the model, not an old load
            yield Finished("load", time.perf_counter_ns() - started, load_duration)
            return
        self._check_capabilities(record, request)
        threads = _REQUEST_TEMPLATE_THREADS if request.template else _MODEL_TEMPLATE_THREADS
        prompt = await asyncio.get_running_loop().run_in_executor(threads, self._prompt, record, request)
        finished: Finished | None = None
        async with self.scheduler.use(record, options, request.keep_alive, user=request.user) as model:
            load_duration = time.perf_counter_ns() - started
            pieces: list[str] = []
            payload = {"prompt": prompt, "options": options, "grammar": grammar, "truncate": request.truncate}
            async with aclosing(model.runner.request("complete", payload)) as events:
                async for event in events:
                    if event["event"] == "token":
                        pieces.append(event["text"])
                        yield Token(event["text"])
                    elif event["event"] == "done":
                        finished = self._finished(request, record, event, pieces, started, load_duration)
        # Passed on once the sequence is given back: a caller that reads the last event and then stops
        # (without closing this generator) holds no place on the runner.
        if finished is not None:
            yield finished

    def _finished(
        self,
        request: GenerationRequest,
        record: ModelRecord,
        event: dict[str, Any],
        pieces: list[str],
        started: int,
        load_duration: int,
    ) -> Finished:
        """The runner's done event as a Finished, with the tool calls found in the text; counts the usage."""
        tool_calls = []
        if request.tools:
            names = {t.get("function", {}).get("name") for t in request.tools if isinstance(t, dict)}
            tool_calls = parse_tool_calls("".join(pieces), names)
        self.usage.add(record.name.display, event["prompt_eval_count"], event["eval_count"])
        return Finished(
            done_reason=event["done_reason"] if event["done_reason"] != "cancelled" else "stop",
            total_duration=time.perf_counter_ns() - started,
            load_duration=load_duration,
            prompt_eval_count=event["prompt_eval_count"],
            prompt_eval_duration=event["prompt_eval_duration"],
            eval_count=event["eval_count"],
            eval_duration=event["eval_duration"],
            prompt_cache_count=event.get("prompt_cache_count", 0),
            tool_calls=tool_calls,
        )

    async def embed(
        self,
        model_name: str,
        inputs: list[str],
        *,
        truncate: bool = True,
        dimensions: int | None = None,
        options: dict[str, Any] | None = None,
        keep_alive: Any = None,
        user: str = "",
    ) -> tuple[EmbeddingResult, int]:
        """Embeddings for `inputs`; returns the result and the load duration in ns."""
        if not all(isinstance(text, str) for text in inputs):
            raise BadRequest("input must be a string or a list of strings")
        if not inputs:
            return EmbeddingResult(shorten([], None), 0, 0), 0
        if parse_name(model_name).display == f"{DEFAULT_EMBEDDING_MODEL}:latest":
            started = time.perf_counter_ns()
            await self.embedder.aload()
            load_ns = time.perf_counter_ns() - started
            result = await self.embedder.aencode(inputs, truncate=truncate, dimensions=dimensions)
            return result, load_ns
        record = self.store.resolve(model_name)
        merged = merge_options(record.parameters, options)
        started = time.perf_counter_ns()
        async with self.scheduler.use(record, merged, keep_alive, embedding=True, user=user) as model:
            load_ns = time.perf_counter_ns() - started
            async with aclosing(model.runner.request("embed", {"texts": inputs, "truncate": truncate})) as events:
                async for event in events:
                    vectors = shorten(event["embeddings"], dimensions)
                    return EmbeddingResult(
                        vectors, event["prompt_eval_count"], time.perf_counter_ns() - started - load_ns
                    ), load_ns
        raise BadRequest("the runner returned no embeddings")
