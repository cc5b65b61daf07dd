"""Many requests on one model: continuous batching, prefix reuse, cancellation, fair admission."""

import asyncio
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import llama_cpp
import ollama
import pytest

from appliance.inference.fair_queue import FairQueue
from appliance.inference.runner_process import RunnerProcess
from appliance.models.synthetic_gguf import TINY_SLOW, write_gguf
from tests.conftest import start_server, stop_server

GREEDY = {"temperature": 0, "seed": 1, "repeat_penalty": 1.0}
# Greedy decoding of the synthetic model never samples its end-of-generation token: a long, steady stream.
LONG = {"num_predict": 1500, "temperature": 0, "repeat_penalty": 1.0}
LONG_PROMPT = "tell me a story"  # some prompts do reach the end token early; this one does not


@pytest.fixture(scope="module")
def batch_server(tmp_path_factory, model_dir, tiny_gguf, tiny_long_gguf):
    tiny_slow_gguf = write_gguf(model_dir / "tiny-slow.gguf", TINY_SLOW, seed=2)
    srv = start_server(
        tmp_path_factory.mktemp("batching"),
        {"tiny": tiny_gguf, "tiny-long": tiny_long_gguf, "tiny-slow": tiny_slow_gguf},
        APPLIANCE_NUM_PARALLEL="4",
        APPLIANCE_NUM_CTX="16384",  # a stream without num_predict runs for many seconds: until it is closed
        APPLIANCE_NUM_THREAD="1",  # a model this small decodes faster on one thread, and a busy machine slows it less
    )
    yield srv
    stop_server(srv)


def _client(server, key=None) -> ollama.Client:
    return ollama.Client(host=server.url, headers=server.auth(key), timeout=120)


def test_greedy_output_is_the_same_alone_and_in_a_batch(batch_server):
    client = _client(batch_server)
    prompts = [f"question {i}: what is the retention period for record type {i * 7}?" for i in range(8)]

    def generate(prompt: str):
        reply = client.generate(model="tiny", prompt=prompt, raw=True, options={**GREEDY, "num_predict": 48})
        return reply.response, reply.eval_count

    alone = [generate(p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(generate, prompts))
    assert together == alone
    assert all(count == 48 for _text, count in alone)
    assert len({text for text, _count in alone}) > 1  # different prompts, different answers: not one cached reply


def test_a_request_joins_a_running_generation_and_no_stream_is_cut(batch_server):
    client = _client(batch_server)
    stream = client.generate(model="tiny-long", prompt=LONG_PROMPT, stream=True, options=LONG)
    first = next(stream)
    assert not first.done
    # The short request is served while the long one is still streaming (one runner, decoding both).
    other = _client(batch_server, batch_server.reader_key)
    short = other.generate(model="tiny-long", prompt="a short one", options={**GREEDY, "num_predict": 4})
    assert short.done and short.eval_count == 4
    chunks = list(stream)
    assert len(chunks) > 100, "the long stream had already finished: the test proves nothing"
    last = chunks[-1]
    assert last.done and last.done_reason == "length" and last.eval_count == LONG["num_predict"]


def test_disconnected_clients_free_their_sequences(batch_server):
    client = _client(batch_server)
    for _ in range(2):  # twice as many long streams as the runner has sequences, each abandoned
        streams = [client.generate(model="tiny-long", prompt=f"story {i}", stream=True, options=LONG) for i in range(4)]
        for stream in streams:
            assert not next(stream).done
            stream.close()
        # Given back when the server notices the client has gone, not when the garbage collector runs.
        _wait_for_scheduler(batch_server, queued=0, running=0, timeout=20)
    # Had the abandoned sequences kept their places, these would wait for 1500 tokens each.
    replies = [
        client.generate(model="tiny-long", prompt=f"quick {i}", options={**GREEDY, "num_predict": 3}) for i in range(4)
    ]
    assert all(r.done and r.eval_count == 3 for r in replies)
    batch_server.assert_alive()


def test_ps_shows_the_parallel_sequences(batch_server):
    client = _client(batch_server)
    client.generate(model="tiny", prompt="hi", options={"num_predict": 1})
    with batch_server.http() as http:
        models = http.get("/api/ps").json()["models"]
    tiny = next(m for m in models if m["name"] == "tiny:latest")
    assert tiny["runner"]["parallel"] == 4


# --- the runner itself: prefix reuse ---------------------------------------------------------------
def _complete(runner: RunnerProcess, prompt: str, options: dict):
    async def run():
        text, done = [], None
        async for event in runner.request("complete", {"prompt": prompt, "options": options, "truncate": True}):
            if event["event"] == "token":
                text.append(event["text"])
            else:
                done = event
        return "".join(text), done

    return run()


def test_runner_reuses_a_cached_prefix_in_its_own_slot_and_across_slots(tiny_gguf):
    config = {"model_path": str(tiny_gguf), "n_ctx": 512, "n_threads": 2, "n_parallel": 2, "embedding": False}
    system = "<|im_start|>system\nYou answer only from the documents given below, citing each claim.<|im_end|>\n"

    async def scenario():
        runner = RunnerProcess(config)
        await runner.start(60)
        try:
            first_text, first = await _complete(runner, system + "first question", {**GREEDY, "num_predict": 8})
            assert first["prompt_cache_count"] == 0
            # The same conversation continued: its previous turn (prompt and answer) is already in the cache.
            follow_up = system + "first question" + first_text + "<|im_end|>\nnext"
            _, second = await _complete(runner, follow_up, {**GREEDY, "num_predict": 4})
            assert second["prompt_cache_count"] >= first["prompt_eval_count"]
            # Two at once: the second slot shares the system prompt held by the first (no re-processing).
            a, b = await asyncio.gather(
                _complete(runner, system + "another question", {**GREEDY, "num_predict": 8}),
                _complete(runner, system + "yet another question", {**GREEDY, "num_predict": 8}),
            )
            vocab = llama_cpp.Llama(str(tiny_gguf), vocab_only=True, verbose=False)
            system_tokens = len(vocab.tokenize(system.encode(), add_bos=False, special=True))
            assert a[1]["prompt_cache_count"] >= system_tokens and b[1]["prompt_cache_count"] >= system_tokens
            # Reuse does not change the answer: the same prompt from a cold runner gives the same text.
            fresh = RunnerProcess(config)
            await fresh.start(60)
            try:
                cold_text, cold = await _complete(fresh, system + "another question", {**GREEDY, "num_predict": 8})
            finally:
                await fresh.stop()
            assert cold["prompt_cache_count"] == 0 and cold_text == a[0]
        finally:
            await runner.stop()

    asyncio.run(scenario())


def test_embedding_runner_answers_concurrent_requests_in_one_call(tiny_gguf):
    config = {"model_path": str(tiny_gguf), "n_ctx": 256, "n_threads": 2, "embedding": True, "pooling_type": 1}
    texts = [[f"text {i} about records", f"and {i} more"] for i in range(16)]

    async def embed(runner, batch):
        async for event in runner.request("embed", {"texts": batch, "truncate": True}):
            return event

    async def scenario():
        runner = RunnerProcess(config)
        await runner.start(60)
        try:
            alone = [await embed(runner, batch) for batch in texts]
            together = []
            for _ in range(3):
                together = await asyncio.gather(*(embed(runner, batch) for batch in texts))
                if any(event["batched_with"] for event in together):
                    break
            return alone, together
        finally:
            await runner.stop()

    alone, together = asyncio.run(scenario())
    assert any(event["batched_with"] > 0 for event in together), "no two requests were ever answered together"
    for one, other in zip(alone, together, strict=True):
        assert len(one["embeddings"]) == 2
        for x, y in zip(one["embeddings"], other["embeddings"], strict=True):
            assert max(abs(p - q) for p, q in zip(x, y, strict=True)) < 1e-4


# --- fair admission ----------------------------------------------------------------------------------
def test_fair_queue_gives_the_next_place_to_the_user_with_fewest_running():
    async def scenario():
        queue = FairQueue(2)
        order: list[str] = []

        async def request(user: str, label: str, hold: asyncio.Event):
            await queue.acquire(user)
            order.append(label)
            await hold.wait()
            queue.release(user)

        release = asyncio.Event()
        tasks = [asyncio.create_task(request("alice", f"alice-{i}", release)) for i in range(20)]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(request("bob", "bob-0", release)))
        await asyncio.sleep(0)
        assert order == ["alice-0", "alice-1"] and queue.waiting_total == 19
        release.set()
        await asyncio.gather(*tasks)
        return order

    order = asyncio.run(scenario())
    # Bob came after twenty of Alice's requests but gets the first place that frees.
    assert order.index("bob-0") == 2
    assert len(order) == 21


def test_fair_queue_cancelled_waiter_does_not_keep_a_place():
    async def scenario():
        queue = FairQueue(1)
        await queue.acquire("alice")
        waiter = asyncio.create_task(queue.acquire("bob"))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        queue.release("alice")
        assert queue.running_total == 0 and queue.waiting_total == 0
        await asyncio.wait_for(queue.acquire("carol"), 1)  # the place is free again
        assert queue.running == {"carol": 1}

    asyncio.run(scenario())


def _wait_for_scheduler(server, queued: int, running: int, timeout: float = 60) -> None:
    """Poll /metrics until the scheduler holds exactly `queued` waiting and `running` running requests."""
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(f"{server.url}/metrics", timeout=30).text
        found = {
            name: float(number)
            for name, number in re.findall(r"^(appliance_queue_depth|appliance_requests_running) (\S+)$", text, re.M)
        }
        if found == {"appliance_queue_depth": queued, "appliance_requests_running": running}:
            return
        assert time.monotonic() < deadline, f"scheduler never reached {queued} queued, {running} running: {found}"
        time.sleep(0.02)


def test_one_users_many_requests_do_not_starve_another(batch_server):
    """Twelve requests from the admin fill the four sequences and the queue; the reader's one is next in.

    In arrival order the reader would wait until at least four of the admin's queued requests had
    finished; admitted fairly it takes the first place that frees and is done two tokens later.
    The four streams would run to the end of the context and are closed once the server holds the
    admin's eight and the reader's request in its queue. They decode the slow model (16k tokens, well over
    a minute): on CI, streams of the fast one ran out of context (16k tokens) before the queue was full.
    """
    admin = _client(batch_server)
    until_closed = {**LONG, "num_predict": -1}
    stop = threading.Event()
    ended_early: list[str] = []

    def stream_until_stopped(index: int) -> None:
        stream = admin.generate(model="tiny-slow", prompt=LONG_PROMPT, stream=True, options=until_closed)
        for chunk in stream:
            if stop.is_set():
                stream.close()
                return
            if chunk.done:
                ended_early.append(f"stream {index}: {chunk.done_reason} after {chunk.eval_count} tokens")

    finished_at: dict[str, float] = {}

    def request(key: str | None, label: str, num_predict: int) -> None:
        reply = _client(batch_server, key).generate(
            model="tiny-slow", prompt=LONG_PROMPT, options={**LONG, "num_predict": num_predict}
        )
        assert reply.eval_count == num_predict
        finished_at[label] = time.monotonic()

    _wait_for_scheduler(batch_server, queued=0, running=0)
    with ThreadPoolExecutor(13) as pool:
        streams = [pool.submit(stream_until_stopped, i) for i in range(4)]
        try:
            _wait_for_scheduler(batch_server, queued=0, running=4)
            waiting = [pool.submit(request, None, f"admin {i}", 200) for i in range(8)]
            _wait_for_scheduler(batch_server, queued=8, running=4)
            reader = pool.submit(request, batch_server.reader_key, "reader", 2)
            _wait_for_scheduler(batch_server, queued=9, running=4)
        finally:
            stop.set()  # the streams close at their next token, freeing the four places one by one
        for future in [*streams, reader, *waiting]:
            future.result(300)
    assert ended_early == [], "a stream ended before the queue was full: the test proved nothing"
    before_reader = sorted(label for label, at in finished_at.items() if at < finished_at["reader"])
    assert before_reader == []
