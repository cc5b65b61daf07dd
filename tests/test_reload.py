"""When a request reloads its model: only when the effective load options need a different runner.

Clients differ in what they send: one states num_ctx (LlamaIndex sends show's context length), another
sends nothing. Requests whose options come to the same runner must not restart it; each runner is counted
by its process id.
"""

import asyncio
from pathlib import Path

import httpx
import ollama
import pytest

from appliance.config import SchedulerSettings
from appliance.inference.engine import merge_options
from appliance.inference.hardware import detect
from appliance.inference.scheduler import Scheduler
from appliance.models.create import create_model
from appliance.models.modelfile import Modelfile
from appliance.models.store import ModelStore
from tests.conftest import start_server, stop_server


def _runner_pids(scheduler: Scheduler, record, requests: list[dict]) -> list[int]:
    """The runner pid that served each request's options (model PARAMETERs merged in, as the engine does)."""

    async def run() -> list[int]:
        pids = []
        try:
            for options in requests:
                async with scheduler.use(record, merge_options(record.parameters, options)) as model:
                    pids.append(model.runner.pid)
        finally:
            await scheduler.shutdown()
        return pids

    return asyncio.run(run())


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return ModelStore(tmp_path / "models")


def test_num_ctx_at_its_default_value_does_not_reload(store, tiny_long_gguf):
    record = create_model(store, "tiny-long", Modelfile(from_=str(tiny_long_gguf)), base_dir=Path("/"))
    hardware = detect()
    scheduler = Scheduler(SchedulerSettings(num_ctx=2048, num_parallel=1), store, hardware)
    pids = _runner_pids(
        scheduler,
        record,
        [
            {},
            {"num_ctx": 2048},
            {},
            {"num_ctx": 2048, "num_thread": hardware.physical_cores, "num_batch": 512, "use_mmap": True},
            {"num_ctx": 2048, "num_gpu": -1, "num_nodes": 0, "temperature": 0.2},
            {},
        ],
    )
    assert len(set(pids)) == 1, pids


def test_a_different_effective_load_option_does_reload(store, tiny_long_gguf):
    record = create_model(store, "tiny-long", Modelfile(from_=str(tiny_long_gguf)), base_dir=Path("/"))
    scheduler = Scheduler(SchedulerSettings(num_ctx=2048, num_parallel=1), store, detect())
    pids = _runner_pids(scheduler, record, [{}, {"num_ctx": 4096}, {"num_ctx": 4096, "num_batch": 256}])
    assert len(set(pids)) == 3, pids


def test_a_smaller_num_ctx_is_served_by_the_larger_loaded_runner(store, tiny_long_gguf):
    record = create_model(store, "tiny-long", Modelfile(from_=str(tiny_long_gguf)), base_dir=Path("/"))
    scheduler = Scheduler(SchedulerSettings(num_ctx=2048, num_parallel=1), store, detect())
    # The default (2048) loads; 8192 needs a larger runner; after that every smaller request fits in it.
    pids = _runner_pids(scheduler, record, [{}, {"num_ctx": 8192}, {}, {"num_ctx": 1024}, {"num_ctx": 8192}, {}])
    assert pids[0] != pids[1]
    assert set(pids[1:]) == {pids[1]}, pids


def test_the_model_parameter_and_the_trained_length_decide_the_effective_num_ctx(store, tiny_gguf, tiny_long_gguf):
    # tiny was trained on 512 tokens: any num_ctx above that (the 4096 default too) loads a 512 context.
    tiny = create_model(store, "tiny", Modelfile(from_=str(tiny_gguf)), base_dir=Path("/"))
    scheduler = Scheduler(SchedulerSettings(num_ctx=4096, num_parallel=1), store, detect())
    pids = _runner_pids(scheduler, tiny, [{}, {"num_ctx": 512}, {"num_ctx": 100_000}, {}])
    assert len(set(pids)) == 1, pids
    # A model's own PARAMETER num_ctx is its default: stating that value changes nothing.
    spec = Modelfile(from_=str(tiny_long_gguf), parameters={"num_ctx": 3000})
    record = create_model(store, "long-3000", spec, base_dir=Path("/"))
    scheduler = Scheduler(SchedulerSettings(num_ctx=2048, num_parallel=1), store, detect())
    pids = _runner_pids(scheduler, record, [{}, {"num_ctx": 3000}, {}, {"num_ctx": 4000}])
    assert pids[0] == pids[1] == pids[2] != pids[3], pids


@pytest.fixture(scope="module")
def reload_server(tmp_path_factory, tiny_long_gguf):
    srv = start_server(tmp_path_factory.mktemp("reload"), {"tiny-long": tiny_long_gguf}, APPLIANCE_NUM_PARALLEL="1")
    yield srv
    stop_server(srv)


def _ps(server) -> dict:
    models = httpx.get(f"{server.url}/api/ps", headers=server.auth()).json()["models"]
    return {m["name"]: m for m in models}


def test_alternating_a_client_that_states_num_ctx_with_one_that_does_not_loads_at_most_twice(reload_server):
    """LlamaIndex states num_ctx as show's context length; the ollama client states nothing."""
    client = ollama.Client(host=reload_server.url, headers=reload_server.auth(), timeout=120)
    shown = client.show("tiny-long").modelinfo["llama.context_length"]
    pids, contexts = [], []
    for options in [{}, {"num_ctx": shown}, {}, {"num_ctx": shown}, {}, {"num_ctx": 4096}]:
        reply = client.generate(model="tiny-long", prompt="hello", options={**options, "num_predict": 2})
        assert reply.done
        loaded = _ps(reload_server)["tiny-long:latest"]
        pids.append(loaded["runner"]["pid"])
        contexts.append(loaded["context_length"])
    assert pids[0] != pids[1] and set(pids[1:]) == {pids[1]}, pids
    assert contexts == [4096] + [shown] * 5


def test_a_request_keeps_its_own_num_ctx_on_a_larger_runner(reload_server):
    """Served by a larger runner, a request is still cut to the num_ctx it asked for (as if loaded for it)."""
    client = ollama.Client(host=reload_server.url, headers=reload_server.auth(), timeout=120)
    client.generate(model="tiny-long", prompt="hi", options={"num_ctx": 8192, "num_predict": 1})
    pid = _ps(reload_server)["tiny-long:latest"]["runner"]["pid"]
    prompt = " ".join(f"word{i}" for i in range(400))
    # Greedy: a random-weight model that samples may draw its end-of-text token before the 4th token.
    greedy = {"temperature": 0, "seed": 1, "repeat_penalty": 1.0}
    reply = client.generate(
        model="tiny-long", prompt=prompt, raw=True, options={"num_ctx": 256, "num_predict": 4, **greedy}
    )
    assert _ps(reload_server)["tiny-long:latest"]["runner"]["pid"] == pid
    assert 0 < reply.prompt_eval_count < 256
    assert reply.eval_count == 4
