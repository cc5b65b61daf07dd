"""Concurrent embedding callers share forward passes of the bundled MiniLM model, and each gets exactly
what it would have got alone: its own vectors, token count, truncation and dimensions, or its own error."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from appliance.config import EmbeddingSettings
from appliance.errors import BadRequest
from appliance.retrieval.embeddings import SentenceEmbedder

WORDS = "the patient was given two doses of amoxicillin after the ward round and reviewed at noon".split()


def _texts(caller: int) -> list[str]:
    """1 to 5 texts of different lengths, different for each caller."""
    return [" ".join(WORDS[(caller + i) % len(WORDS) :] * (1 + (caller * 7 + i) % 4)) for i in range(caller % 5 + 1)]


def _options(caller: int) -> dict:
    return {"dimensions": 128} if caller % 4 == 0 else {}


@pytest.fixture(scope="module")
def embedder():
    embedder = SentenceEmbedder(EmbeddingSettings())
    embedder.load()
    return embedder


def _alone(embedder, calls: list[tuple[list[str], dict]]):
    """Each call by itself, one after the other."""

    async def one_by_one():
        return [await embedder.aencode(texts, **options) for texts, options in calls]

    return asyncio.run(one_by_one())


def _together(embedder, calls: list[tuple[list[str], dict]]):
    async def at_once():
        return await asyncio.gather(
            *(embedder.aencode(texts, **options) for texts, options in calls), return_exceptions=True
        )

    before = embedder.forward_passes
    results = asyncio.run(at_once())
    return results, embedder.forward_passes - before


def _assert_same(batched, alone) -> None:
    assert batched.vectors.shape == alone.vectors.shape
    np.testing.assert_allclose(batched.vectors, alone.vectors, atol=1e-5)
    assert batched.prompt_tokens == alone.prompt_tokens
    assert batched.duration_ns > 0


def test_concurrent_callers_share_forward_passes_and_get_their_own_results(embedder):
    calls = [(_texts(caller), _options(caller)) for caller in range(20)]
    alone = _alone(embedder, calls)
    results, passes = _together(embedder, calls)
    assert passes < len(calls), f"{passes} forward passes for {len(calls)} callers"
    for batched, single, (texts, options) in zip(results, alone, calls, strict=True):
        _assert_same(batched, single)
        assert batched.vectors.shape == (len(texts), options.get("dimensions", 384))


def test_a_callers_bad_input_fails_only_that_caller(embedder):
    too_long = " ".join(WORDS * 40)  # far beyond the model's 256 tokens
    calls = [(_texts(caller), _options(caller)) for caller in range(8)]
    calls[3] = (["short", too_long], {"truncate": False})
    calls[5] = (["fine"], {"dimensions": 1000})
    calls[6] = (["short enough", "also short"], {"truncate": False})
    calls[7] = ([too_long], {"truncate": True})
    results, passes = _together(embedder, calls)
    assert passes < len(calls)
    assert isinstance(results[3], BadRequest) and "input 1 is" in results[3].message
    assert isinstance(results[5], BadRequest) and "dimensions" in results[5].message
    good = [i for i in range(len(calls)) if i not in (3, 5)]
    for i, single in zip(good, _alone(embedder, [calls[i] for i in good]), strict=True):
        _assert_same(results[i], single)


def test_calls_larger_than_a_batch_are_never_split_between_callers():
    embedder = SentenceEmbedder(EmbeddingSettings(embedding_batch_size=4))
    calls = [(_texts(caller), {}) for caller in (0, 2, 4, 1)] + [([*_texts(4), *_texts(3)], {})]  # last: 9 texts
    alone = _alone(embedder, calls)
    results, _passes = _together(embedder, calls)
    for batched, single in zip(results, alone, strict=True):
        _assert_same(batched, single)


def test_blocking_encode_from_many_threads_is_batched_too(embedder):
    """Retrieval embeds its query with `encode` from a worker thread; concurrent queries share a pass."""
    queries = [f"which dose of {word} was given" for word in WORDS[:8]]
    alone = [embedder.encode([query]) for query in queries]
    gate = threading.Event()
    holder = threading.Thread(target=embedder.call, args=(gate.wait,))  # keeps the embedding thread busy
    holder.start()
    before = embedder.forward_passes
    with ThreadPoolExecutor(len(queries)) as pool:
        futures = [pool.submit(embedder.encode, [query]) for query in queries]
        time.sleep(0.5)  # let every query arrive while the embedding thread is held
        gate.set()
        results = [future.result(timeout=60) for future in futures]
    holder.join()
    assert embedder.forward_passes - before < len(queries)
    for batched, single in zip(results, alone, strict=True):
        _assert_same(batched, single)


def test_ingestion_batches_run_alone_with_their_own_batch_size(embedder):
    texts = [text for caller in range(6) for text in _texts(caller)]
    before = embedder.forward_passes
    result = embedder.encode(texts, batch_size=5)
    assert embedder.forward_passes - before == -(-len(texts) // 5)
    _assert_same(result, embedder.encode(texts))
