"""Continuous batching: several generation requests decoded together by one llama.cpp context.

Each request gets a *slot* (a llama.cpp sequence id) with its own sampler chain, stop strings and
limits. Every step builds one batch: the next token of every generating sequence, then as much of
the waiting prompts as `n_batch` allows; one `llama_decode` runs it and each sequence samples from its
own output row. New requests join between steps; a finished or cancelled one leaves at once.

The KV cache is unified (`n_parallel` × `n_ctx` cells, each sequence limited to `n_ctx`). A slot
keeps the tokens of its last request in the cache, so a follow-up turn of the same conversation, or
any prompt sharing a prefix with what a slot holds (the system prompt), only processes what is new;
a prefix held by another slot is shared into the new one with `llama_memory_seq_cp` (no copy of the
cells). A cancelled or failed request's cells are freed at once.

Greedy output is reproducible on a freshly loaded runner, not always on a warm one (measured with
SmolLM2 Q4_1 on CPU): llama.cpp's CPU attention tiles the KV cells in blocks of 64 when a decode holds
64 tokens or more, walks them one by one below that, and splits them across threads for a single token
once 512 cells are in use; the 8-bit activation quantization then amplifies the rounding difference
(logits moved by up to 0.8). So a prompt decoded whole versus after a cached prefix, placed at other
cells, or a generation step shared with another request's prompt, can change a later greedy token.
"""

from __future__ import annotations

import codecs
import ctypes
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
from llama_cpp import _internals

from appliance.inference import cpu_path, llama_log
from appliance.inference.stops import StopMatcher


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def build_sampler(vocab, n_vocab: int, n_ctx: int, options: dict[str, Any], grammar: str | None, history: list[int]):
    """A llama.cpp sampler chain for one request (Ollama option names and defaults)."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    if not chain:
        raise RequestError(500, "could not create a sampler")

    def add(sampler) -> None:
        if not sampler:
            llama_cpp.llama_sampler_free(chain)
            raise RequestError(400, "invalid sampling options")
        llama_cpp.llama_sampler_chain_add(chain, sampler)

    if grammar:
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
        if not sampler:
            llama_cpp.llama_sampler_free(chain)
            raise RequestError(400, "invalid grammar")
        add(sampler)
    last_n = int(options.get("repeat_last_n", 64))
    last_n = n_ctx if last_n < 0 else last_n  # -1: the whole context, as in Ollama
    penalties = llama_cpp.llama_sampler_init_penalties(
        n_vocab,
        last_n,
        float(options.get("repeat_penalty", 1.1)),
        float(options.get("frequency_penalty", 0.0)),
        float(options.get("presence_penalty", 0.0)),
    )
    for token in history[-last_n:] if last_n else []:
        llama_cpp.llama_sampler_accept(penalties, token)  # the prompt's tail counts as recent text
    add(penalties)
    seed = options.get("seed")
    seed = int(seed) if seed is not None and int(seed) >= 0 else random.randint(0, 2**31 - 1)
    temperature = float(options.get("temperature", 0.8))
    mirostat = int(options.get("mirostat", 0))
    if temperature <= 0:
        add(llama_cpp.llama_sampler_init_greedy())
    elif mirostat == 1:
        add(llama_cpp.llama_sampler_init_temp(temperature))
        tau, eta = float(options.get("mirostat_tau", 5.0)), float(options.get("mirostat_eta", 0.1))
        add(llama_cpp.llama_sampler_init_mirostat(n_vocab, seed, tau, eta, 100))
    elif mirostat == 2:
        add(llama_cpp.llama_sampler_init_temp(temperature))
        tau, eta = float(options.get("mirostat_tau", 5.0)), float(options.get("mirostat_eta", 0.1))
        add(llama_cpp.llama_sampler_init_mirostat_v2(seed, tau, eta))
    else:
        top_k = int(options.get("top_k", 40))
        if top_k > 0:
            add(llama_cpp.llama_sampler_init_top_k(top_k))
        add(llama_cpp.llama_sampler_init_typical(float(options.get("typical_p", 1.0)), 1))
        add(llama_cpp.llama_sampler_init_top_p(float(options.get("top_p", 0.9)), 1))
        add(llama_cpp.llama_sampler_init_min_p(float(options.get("min_p", 0.0)), 1))
        add(llama_cpp.llama_sampler_init_temp(temperature))
        add(llama_cpp.llama_sampler_init_dist(seed))
    return chain


@dataclass
class Sequence:
    """One request being generated in a slot."""

    request_id: str
    prompt: list[int]
    limit: int  # most tokens to generate
    sampler: Any
    stops: StopMatcher
    received_at: int
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    fed: int = 0  # prompt tokens already in the KV cache
    reused: int = 0  # prompt tokens found in the cache (not processed again)
    next_token: int | None = None  # sampled, not yet decoded
    generated: int = 0
    started_at: int = 0
    first_token_at: int = 0


@dataclass
class Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens whose cells this sequence holds, from position 0
    active: Sequence | None = None
    last_used: float = 0.0


class BatchedGenerator:
    """The generation side of a runner: one model, one context, `n_parallel` slots."""

    def __init__(self, config: dict[str, Any], send: Callable[[dict[str, Any]], None]):
        self.send = send
        self.n_parallel = max(1, int(config.get("n_parallel", 1)))
        self.n_ctx_seq = int(config["n_ctx"])
        self.n_batch = max(int(config.get("n_batch", 512)), self.n_parallel)
        verbose = bool(config.get("verbose", False))
        llama_log.quiet(verbose)  # llama.cpp's own log lines: errors only unless asked for
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = int(config.get("n_gpu_layers", 0))
        model_params.use_mmap = bool(config.get("use_mmap", True))
        self.cpu_path = cpu_path.current(config.get("cpu_extra_buffers", "auto"))
        model_params.use_extra_bufts = self.cpu_path.extra_buffers
        self.tunnels = self._cluster_arrays = None
        if config.get("cluster"):  # a sharded model: reach and register the workers before loading
            from appliance.cluster.tunnel import attach_workers

            self.tunnels, self._cluster_arrays = attach_workers(config["cluster"], model_params, send)
        self.model = _internals.LlamaModel(path_model=config["model_path"], params=model_params, verbose=verbose)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.n_ctx_seq * self.n_parallel
        params.n_batch = self.n_batch
        params.n_ubatch = min(self.n_batch, 512)
        params.n_seq_max = self.n_parallel
        params.kv_unified = True
        params.n_threads = int(config["n_threads"])
        params.n_threads_batch = int(config["n_threads"])
        params.embeddings = False
        params.no_perf = True
        self.context = _internals.LlamaContext(model=self.model, params=params, verbose=verbose)
        self.ctx = self.context.ctx
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.vocab = self.model.vocab
        self.n_vocab = self.model.n_vocab()
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.slots = [Slot(seq_id=i) for i in range(self.n_parallel)]
        self.waiting: list[tuple[str, dict[str, Any], int]] = []
        self.cancelled: set[str] = set()
        self._piece_buffer = ctypes.create_string_buffer(64)
        add_bos = self.model_metadata("tokenizer.ggml.add_bos_token")
        self.add_bos = add_bos is None or add_bos.lower() == "true"

    def model_metadata(self, key: str) -> str | None:
        buffer = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_model_meta_val_str(self.model.model, key.encode(), buffer, len(buffer))
        return buffer.value.decode(errors="replace") if n >= 0 else None

    def info(self) -> dict[str, Any]:
        return {
            "n_ctx": self.n_ctx_seq,
            "n_ctx_train": self.model.n_ctx_train(),
            "n_vocab": self.n_vocab,
            "n_parallel": self.n_parallel,
            "amx": self.cpu_path.amx,
            "extra_buffers": self.cpu_path.extra_buffers,
        }

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        for slot in self.slots:
            if slot.active is not None:
                self._release(slot, keep_cache=True)  # the context and its cells go next
        self.context.close()
        self.model.close()
        if self.tunnels is not None:
            self.tunnels.close()

    # --- requests --------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(slot.active is not None for slot in self.slots)

    def submit(self, request_id: str, request: dict[str, Any]) -> None:
        self.waiting.append((request_id, request, time.perf_counter_ns()))

    def cancel(self, request_id: str) -> None:
        """Cancel a waiting or running request (an id that is neither is ignored: it already finished)."""
        running = any(slot.active is not None and slot.active.request_id == request_id for slot in self.slots)
        if running or any(waiting[0] == request_id for waiting in self.waiting):
            self.cancelled.add(request_id)

    def _tokens(self, prompt: str, truncate: bool, num_predict: int, n_ctx: int) -> list[int]:
        tokens = self.model.tokenize(prompt.encode(), add_bos=self.add_bos, special=True)
        if not tokens:
            raise RequestError(400, "the prompt is empty after tokenization")
        if len(tokens) < n_ctx:
            return tokens
        if not truncate:
            raise RequestError(400, f"input length ({len(tokens)} tokens) exceeds the context length ({n_ctx} tokens)")
        room = num_predict if 0 < num_predict < n_ctx // 2 else n_ctx // 4
        return tokens[-(n_ctx - room) :]

    def _start(self, request_id: str, request: dict[str, Any], received_at: int, free: list[Slot]) -> None:
        """Begin a request in the free slot that already holds most of its prompt.

        A request that states a smaller num_ctx than the runner's (the scheduler lets a larger runner serve
        it) is truncated and limited as if the runner had been loaded with its num_ctx.
        """
        options = request.get("options") or {}
        num_predict = int(options.get("num_predict", -1))
        n_ctx = min(self.n_ctx_seq, int(options.get("num_ctx") or self.n_ctx_seq))
        prompt, truncate = str(request.get("prompt", "")), bool(request.get("truncate", True))
        tokens = self._tokens(prompt, truncate, num_predict, n_ctx)
        slot = max(free, key=lambda s: (common_prefix(s.cached, tokens), -s.last_used))
        room = n_ctx - len(tokens)
        limit = room if num_predict < 0 else min(num_predict, room)
        sampler = build_sampler(self.vocab, self.n_vocab, n_ctx, options, request.get("grammar"), tokens)
        sequence = Sequence(
            request_id=request_id,
            prompt=tokens,
            limit=limit,
            sampler=sampler,
            stops=StopMatcher([str(s) for s in options.get("stop") or []]),
            received_at=received_at,
            started_at=time.perf_counter_ns(),
        )
        self._reuse_cache(slot, tokens)
        sequence.fed = sequence.reused = len(slot.cached)
        slot.active = sequence
        slot.last_used = time.monotonic()

    def _reuse_cache(self, slot: Slot, tokens: list[int]) -> None:
        """Keep (or share in from another slot) the longest cached prefix of `tokens`; drop the rest."""
        usable = len(tokens) - 1  # the last prompt token is always decoded: its logits start generation
        keep = min(common_prefix(slot.cached, tokens), usable)
        donor, donor_keep = None, keep
        for other in self.slots:
            if other is not slot:
                shared = min(common_prefix(other.cached, tokens), usable)
                if shared > donor_keep:
                    donor, donor_keep = other, shared
        if donor is not None:
            llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
            llama_cpp.llama_memory_seq_cp(self.memory, donor.seq_id, slot.seq_id, 0, donor_keep)
            slot.cached = tokens[:donor_keep]
            return
        if not llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, keep, -1):
            llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
            keep = 0
        slot.cached = slot.cached[:keep]

    def _admit(self) -> None:
        """Give waiting requests free slots, oldest first."""
        while self.waiting:
            free = [slot for slot in self.slots if slot.active is None]
            if not free:
                return
            request_id, request, received_at = self.waiting.pop(0)
            if request_id in self.cancelled:
                self.cancelled.discard(request_id)
                self.send({"id": request_id, "event": "done", "done_reason": "cancelled", **_no_counts()})
                continue
            try:
                self._start(request_id, request, received_at, free)
            except RequestError as exc:
                self.send({"id": request_id, "event": "error", "status": exc.status, "message": exc.message})
            except Exception as exc:  # noqa: BLE001 - a bad request must not end the runner
                self.send({"id": request_id, "event": "error", "status": 500, "message": f"runner error: {exc}"})

    # --- decoding --------------------------------------------------------------------------------
    def step(self) -> None:
        """Admit waiting requests, decode one batch, sample, emit tokens, retire finished sequences."""
        self._admit()
        for slot in self.slots:
            if slot.active is not None and slot.active.request_id in self.cancelled:
                self._finish(slot, "cancelled")
        batch = self.batch
        batch.n_tokens = 0
        outputs: list[tuple[Slot, int]] = []

        def put(token: int, position: int, slot: Slot, logits: bool) -> None:
            i = batch.n_tokens
            batch.token[i] = token
            batch.pos[i] = position
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = slot.seq_id
            batch.logits[i] = logits
            batch.n_tokens = i + 1
            if logits:
                outputs.append((slot, i))

        active = [slot for slot in self.slots if slot.active is not None]
        for slot in active:  # generating sequences first: each adds one token
            sequence = slot.active
            if sequence.next_token is not None:
                put(sequence.next_token, len(slot.cached), slot, True)
        for slot in sorted(active, key=lambda s: s.active.received_at):  # then prompts, oldest first
            sequence = slot.active
            while sequence.next_token is None and sequence.fed < len(sequence.prompt) and batch.n_tokens < self.n_batch:
                last = sequence.fed == len(sequence.prompt) - 1
                put(sequence.prompt[sequence.fed], sequence.fed, slot, last)
                sequence.fed += 1
        if batch.n_tokens == 0:
            return
        status = llama_cpp.llama_decode(self.ctx, batch)
        if status != 0:
            self._fail_batch(status)
            return
        for slot in active:  # what was decoded is now in the cache
            sequence = slot.active
            if sequence.next_token is not None:
                slot.cached.append(sequence.next_token)
                sequence.next_token = None
            else:
                slot.cached = sequence.prompt[: sequence.fed]
        for slot, index in outputs:
            self._sample(slot, index)

    def _sample(self, slot: Slot, index: int) -> None:
        sequence = slot.active
        token = llama_cpp.llama_sampler_sample(sequence.sampler, self.ctx, index)
        if not sequence.first_token_at:
            sequence.first_token_at = time.perf_counter_ns()
        sequence.generated += 1
        if llama_cpp.llama_vocab_is_eog(self.vocab, token):
            self._finish(slot, "stop")
            return
        text, hit = sequence.stops.feed(sequence.decoder.decode(self._piece(token)))
        if text:
            self.send({"id": sequence.request_id, "event": "token", "text": text})
        if hit:
            self._finish(slot, "stop", stopped_by_string=True)
        elif sequence.generated >= sequence.limit:
            self._finish(slot, "length")
        else:
            sequence.next_token = token

    def _piece(self, token: int) -> bytes:
        """The token's bytes (a piece may be part of a UTF-8 character; the decoder joins them)."""
        buffer = self._piece_buffer
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, False)
        if n < 0:  # longer than the buffer: grow it to the size asked for
            self._piece_buffer = buffer = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, False)
        return buffer.raw[: max(n, 0)]

    def _release(self, slot: Slot, keep_cache: bool) -> Sequence:
        """Take the sequence out of its slot; without `keep_cache` its cells are freed at once."""
        sequence = slot.active
        slot.active = None
        slot.last_used = time.monotonic()
        llama_cpp.llama_sampler_free(sequence.sampler)
        self.cancelled.discard(sequence.request_id)
        if not keep_cache:
            llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
            slot.cached = []
        return sequence

    def _finish(self, slot: Slot, reason: str, stopped_by_string: bool = False) -> None:
        # A cancelled answer is not worth keeping, nor a prompt cut off half-read.
        whole_prompt = slot.active.fed == len(slot.active.prompt)
        sequence = self._release(slot, keep_cache=reason != "cancelled" and whole_prompt)
        if not stopped_by_string:
            tail = sequence.stops.feed(sequence.decoder.decode(b"", final=True))[0] + sequence.stops.flush()
            if tail:
                self.send({"id": sequence.request_id, "event": "token", "text": tail})
        finished = time.perf_counter_ns()
        first = sequence.first_token_at or finished
        self.send(
            {
                "id": sequence.request_id,
                "event": "done",
                "done_reason": reason,
                "prompt_eval_count": len(sequence.prompt),
                "prompt_cache_count": sequence.reused,
                "prompt_eval_duration": first - sequence.started_at,
                "eval_count": sequence.generated,
                "eval_duration": finished - first,
                "queue_duration": sequence.started_at - sequence.received_at,
            }
        )

    def _fail_batch(self, status: int) -> None:
        """llama_decode refused the batch (no room in the KV cache, or aborted): fail its requests."""
        message = f"the model could not decode this request (llama_decode returned {status})"
        for slot in self.slots:
            if slot.active is not None:
                sequence = self._release(slot, keep_cache=False)
                self.send({"id": sequence.request_id, "event": "error", "status": 503, "message": message})


def _no_counts() -> dict[str, int]:
    return {
        "prompt_eval_count": 0,
        "prompt_cache_count": 0,
        "prompt_eval_duration": 0,
        "eval_count": 0,
        "eval_duration": 0,
    }
