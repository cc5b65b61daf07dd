"""The scheduler's policies with runners that are not processes: loading, reuse, eviction, expiry, queueing.

`FakeRunner` follows the runner contract (`appliance.inference.runner_process.Runner`) without llama.cpp,
so these run in milliseconds. test_lifecycle.py, test_reload.py and test_batching.py check the same
policies through real runner processes.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from appliance.config import SchedulerSettings
from appliance.errors import Busy, InsufficientMemory, RunnerFailed
from appliance.inference.engine import merge_options
from appliance.inference.hardware import Hardware
from appliance.inference.scheduler import EMBEDDING_PARALLEL, FOREVER, Scheduler
from appliance.models.create import create_model
from appliance.models.modelfile import Modelfile
from appliance.models.store import ModelRecord, ModelStore

MiB = 2**20
HARDWARE = Hardware(physical_cores=2, total_memory=16 * 1024 * MiB, available_memory=16 * 1024 * MiB)
# The scheduler estimates a tiny model at its file (a few hundred KiB) plus 64 MiB, plus its KV cache.
ONE_TINY_MODEL = 100 * MiB
TWO_TINY_MODELS = 160 * MiB
_pids = itertools.count(100_000)


class FakeRunner:
    """A runner in this process: loads at once, answers "complete" with `num_predict` tokens, can die."""

    def __init__(self, config: dict[str, Any], fail_load: bool = False):
        self.config = config
        self.fail_load = fail_load
        self.pid: int | None = None
        self.stopped = False
        self.dead = False

    @property
    def alive(self) -> bool:
        return self.pid is not None and not self.stopped and not self.dead

    async def start(self, timeout_s: float) -> dict[str, Any]:
        await asyncio.sleep(0)  # a load lets other tasks run
        if self.fail_load:
            raise RunnerFailed("failed to load model: the model runner process exited with status 1")
        self.pid = next(_pids)
        return {"event": "ready", "n_ctx": self.config["n_ctx"], "pid": self.pid}

    async def request(self, op: str, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        if not self.alive:
            raise RunnerFailed("the model runner is not running")
        count = int(payload.get("num_predict", 2))
        for index in range(count):
            await asyncio.sleep(0)  # one decode step
            if not self.alive:
                raise RunnerFailed("the model runner process died (SIGKILL); the request was not completed")
            yield {"event": "token", "text": f" t{index}"}
        yield {"event": "done", "eval_count": count}

    def die(self) -> None:
        """What a crash does: the runner is gone, and a request it is serving fails at its next event."""
        self.dead = True

    async def stop(self) -> None:
        self.stopped = True


class Runners:
    """The runner factory the scheduler is given: remembers every runner it made, in order."""

    def __init__(self) -> None:
        self.made: list[FakeRunner] = []
        self.fail_next_load = False

    def __call__(self, config: dict[str, Any]) -> FakeRunner:
        runner = FakeRunner(config, fail_load=self.fail_next_load)
        self.fail_next_load = False
        self.made.append(runner)
        return runner


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return ModelStore(tmp_path / "models")


@pytest.fixture
def runners():
    made = Runners()
    yield made
    assert [runner.pid for runner in made.made if runner.alive] == [], "a runner outlived the scheduler's shutdown"


def _model(store: ModelStore, name: str, gguf: Path, **parameters: Any) -> ModelRecord:
    return create_model(store, name, Modelfile(from_=str(gguf), parameters=parameters), base_dir=Path("/"))


def _scheduler(store: ModelStore, runners: Runners, **settings: Any) -> Scheduler:
    return Scheduler(SchedulerSettings(**settings), store, HARDWARE, runner_factory=runners)


def _run(scheduler: Scheduler, scenario: Callable[[], Awaitable[Any]]) -> Any:
    """Run a scenario on a new event loop; the scheduler is shut down after it, as the server's lifespan does."""

    async def main() -> Any:
        try:
            async with asyncio.timeout(10):  # a request left waiting for ever fails the test, not the run
                return await scenario()
        finally:
            await scheduler.shutdown()

    return asyncio.run(main())


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Let the event loop run until `condition` holds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.001)


async def _generate(scheduler: Scheduler, record: ModelRecord, options: dict | None = None, user: str = "") -> list:
    """One request as the engine makes it: a place on a runner, then the runner's events."""
    async with scheduler.use(record, merge_options(record.parameters, options), user=user) as model:
        return [event async for event in model.runner.request("complete", {"num_predict": 2})]


def _runner_pids(scheduler: Scheduler, record: ModelRecord, requests: list[dict]) -> list[int]:
    """The runner pid that served each request's options (model PARAMETERs merged in, as the engine does)."""

    async def scenario() -> list[int]:
        pids = []
        for options in requests:
            async with scheduler.use(record, merge_options(record.parameters, options)) as model:
                pids.append(model.runner.pid)
        return pids

    return _run(scheduler, scenario)


# --- loading and reuse ---------------------------------------------------------------------------
def test_the_first_request_loads_the_model_and_the_same_effective_options_reuse_its_runner(
    store, runners, tiny_long_gguf
):
    record = _model(store, "tiny-long", tiny_long_gguf)
    scheduler = _scheduler(store, runners, num_ctx=2048, num_parallel=1)

    async def scenario():
        events = await _generate(scheduler, record)
        assert [event["event"] for event in events] == ["token", "token", "done"]
        assert [model.slot for model in scheduler.loaded()] == [(record.name.display, False)]
        for options in (
            {"num_ctx": 2048},
            {"num_ctx": 2048, "num_thread": HARDWARE.physical_cores, "num_batch": 512, "use_mmap": True},
            {"num_gpu": -1, "num_nodes": 0, "temperature": 0.2},
        ):
            await _generate(scheduler, record, options)

    _run(scheduler, scenario)
    assert len(runners.made) == 1
    config = runners.made[0].config
    assert config["model_path"] == str(record.model_path)
    assert (config["n_ctx"], config["n_parallel"], config["embedding"]) == (2048, 1, False)


def test_a_different_effective_load_option_starts_another_runner_in_place_of_the_idle_one(
    store, runners, tiny_long_gguf
):
    record = _model(store, "tiny-long", tiny_long_gguf)
    scheduler = _scheduler(store, runners, num_ctx=2048, num_parallel=1)
    pids = _runner_pids(scheduler, record, [{}, {"num_ctx": 4096}, {"num_ctx": 4096, "num_batch": 256}])
    assert len(set(pids)) == 3, pids
    assert [runner.config["n_batch"] for runner in runners.made] == [512, 512, 256]
    assert all(runner.stopped for runner in runners.made)


def test_a_smaller_num_ctx_is_served_by_the_larger_loaded_runner(store, runners, tiny_long_gguf):
    record = _model(store, "tiny-long", tiny_long_gguf)
    scheduler = _scheduler(store, runners, num_ctx=2048, num_parallel=1)
    pids = _runner_pids(scheduler, record, [{}, {"num_ctx": 8192}, {}, {"num_ctx": 1024}, {"num_ctx": 8192}])
    assert pids[0] != pids[1] and set(pids[1:]) == {pids[1]}, pids
    assert [runner.config["n_ctx"] for runner in runners.made] == [2048, 8192]


def test_the_trained_length_and_the_model_parameter_decide_the_effective_num_ctx(
    store, runners, tiny_gguf, tiny_long_gguf
):
    tiny = _model(store, "tiny", tiny_gguf)  # trained on 512 tokens
    scheduler = _scheduler(store, runners, num_ctx=4096, num_parallel=1)
    pids = _runner_pids(scheduler, tiny, [{}, {"num_ctx": 512}, {"num_ctx": 100_000}])
    assert len(set(pids)) == 1 and runners.made[0].config["n_ctx"] == 512
    long_3000 = _model(store, "long-3000", tiny_long_gguf, num_ctx=3000)
    scheduler = _scheduler(store, runners, num_ctx=2048, num_parallel=1)
    pids = _runner_pids(scheduler, long_3000, [{}, {"num_ctx": 3000}, {}, {"num_ctx": 4000}])
    assert pids[0] == pids[1] == pids[2] != pids[3], pids


def test_an_embedding_runner_is_loaded_beside_the_generation_runner_of_the_same_model(store, runners, tiny_gguf):
    record = _model(store, "tiny", tiny_gguf)
    scheduler = _scheduler(store, runners, num_parallel=1)

    async def scenario():
        async with scheduler.use(record, {}, embedding=True) as embedder:
            pass
        await _generate(scheduler, record)
        return embedder, {model.slot for model in scheduler.loaded()}

    embedder, slots = _run(scheduler, scenario)
    assert slots == {(record.name.display, True), (record.name.display, False)}
    assert embedder.n_parallel == EMBEDDING_PARALLEL
    assert [(r.config["embedding"], r.config["n_parallel"]) for r in runners.made] == [
        (True, EMBEDDING_PARALLEL),
        (False, 1),
    ]


def test_a_runner_that_fails_to_load_leaves_nothing_loaded_and_the_next_request_loads_again(store, runners, tiny_gguf):
    record = _model(store, "tiny", tiny_gguf)
    scheduler = _scheduler(store, runners, num_parallel=1)
    runners.fail_next_load = True

    async def scenario():
        with pytest.raises(RunnerFailed, match="failed to load model"):
            await _generate(scheduler, record)
        assert scheduler.loaded() == [] and scheduler.queued == 0
        return await _generate(scheduler, record)

    assert _run(scheduler, scenario)[-1]["event"] == "done"
    assert [runner.pid is not None for runner in runners.made] == [False, True]


def test_a_reload_for_other_options_waits_until_the_old_runner_is_idle(store, runners, tiny_gguf):
    record = _model(store, "tiny", tiny_gguf)
    scheduler = _scheduler(store, runners, num_parallel=1)

    async def scenario():
        async with scheduler.use(record, {}) as old:
            stream = old.runner.request("complete", {"num_predict": 3})
            await anext(stream)
            reload = asyncio.create_task(_generate(scheduler, record, {"num_batch": 256}))
            await _until(lambda: scheduler.queued == 1)
            await asyncio.sleep(0.01)
            assert len(runners.made) == 1 and old.runner.alive  # not stopped under a running request
            rest = [event async for event in stream]
        assert rest[-1] == {"event": "done", "eval_count": 3}
        await reload
        return old

    old = _run(scheduler, scenario)
    assert len(runners.made) == 2 and runners.made[0] is old.runner


# --- eviction ------------------------------------------------------------------------------------
def test_only_max_loaded_models_stay_loaded(store, runners, tiny_gguf, tiny_long_gguf):
    tiny, tiny_long = _model(store, "tiny", tiny_gguf), _model(store, "tiny-long", tiny_long_gguf)
    scheduler = _scheduler(store, runners, max_loaded_models=1, num_parallel=1)

    async def scenario():
        await _generate(scheduler, tiny)
        assert [m.slot[0] for m in scheduler.loaded()] == [tiny.name.display]
        await _generate(scheduler, tiny_long)
        assert [m.slot[0] for m in scheduler.loaded()] == [tiny_long.name.display]
        assert runners.made[0].stopped

    _run(scheduler, scenario)


def test_the_memory_budget_unloads_the_least_recently_used_idle_model(store, runners, tiny_gguf):
    a, b, c = (_model(store, name, tiny_gguf) for name in ("a", "b", "c"))
    scheduler = _scheduler(store, runners, max_memory_bytes=TWO_TINY_MODELS, num_parallel=1)

    async def scenario():
        for record in (a, b, a):  # a was used last: b is the least recently used
            await _generate(scheduler, record)
        await _generate(scheduler, c)
        return {m.slot[0] for m in scheduler.loaded()}

    assert _run(scheduler, scenario) == {a.name.display, c.name.display}
    assert [runner.config["model_path"] for runner in runners.made] == [str(r.model_path) for r in (a, b, c)]
    assert runners.made[1].stopped


def test_a_busy_model_is_not_evicted_and_the_next_model_waits_for_room(store, runners, tiny_gguf):
    a, b = _model(store, "a", tiny_gguf), _model(store, "b", tiny_gguf)
    scheduler = _scheduler(store, runners, max_memory_bytes=ONE_TINY_MODEL, num_parallel=1)

    async def scenario():
        async with scheduler.use(a, {}) as busy:
            waiting = asyncio.create_task(_generate(scheduler, b))
            await _until(lambda: scheduler.queued == 1)
            await asyncio.sleep(0.01)
            assert scheduler.loaded() == [busy] and len(runners.made) == 1
        events = await waiting
        return busy, events, [m.slot[0] for m in scheduler.loaded()]

    busy, events, loaded = _run(scheduler, scenario)
    assert events[-1]["event"] == "done" and loaded == [b.name.display]
    assert busy.runner.stopped


def test_a_model_larger_than_the_memory_budget_is_refused_without_starting_a_runner(store, runners, tiny_gguf):
    record = _model(store, "tiny", tiny_gguf)
    scheduler = _scheduler(store, runners, max_memory_bytes=MiB)
    with pytest.raises(InsufficientMemory, match="requires more memory"):
        _run(scheduler, lambda: _generate(scheduler, record))
    assert runners.made == [] and scheduler.loaded() == [] and scheduler.queued == 0


# --- keep_alive and unload -----------------------------------------------------------------------
def test_keep_alive_expiry_unloads_an_idle_model(store, runners, tiny_gguf):
    record = _model(store, "tiny", tiny_gguf)
    scheduler = _scheduler(store, runners, num_parallel=1)

    async def scenario():
        async with scheduler.use(record, {}, keep_alive="50ms") as model:
            pass
        assert scheduler.loaded() == [model] and model.runner.alive
        await _until(lambda: scheduler.loaded() == [])
        return model

    assert _run(scheduler, scenario).runner.stopped


def test_a_model_in_use_does_not_expire_and_a_later_request_restarts_its_keep_alive(store, runners, tiny_gguf):
    record = _model(store, "tiny", tiny_gguf)
    scheduler = _scheduler(store, runners, num_parallel=1)

    async def scenario():
        async with scheduler.use(record, {}, keep_alive=0.01) as first:
            pass
        async with scheduler.use(record, {}, keep_alive="1m") as second:
            await asyncio.sleep(0.05)  # past the first request's keep_alive
            assert scheduler.loaded() == [second] and second.runner is first.runner
        assert second.runner.alive and second.expires_at > datetime.now(UTC) + timedelta(seconds=30)

    _run(scheduler, scenario)
    assert len(runners.made) == 1


def test_keep_alive_zero_unloads_after_the_request_and_a_negative_one_keeps_the_model(store, runners, tiny_gguf):
    record = _model(store, "tiny", tiny_gguf)
    scheduler = _scheduler(store, runners, num_parallel=1, keep_alive="50ms")

    async def scenario():
        async with scheduler.use(record, {}, keep_alive=-1) as kept:
            pass
        assert kept.expires_at == FOREVER
        await asyncio.sleep(0.1)  # past the default keep_alive
        assert scheduler.loaded() == [kept]
        async with scheduler.use(record, {}, keep_alive=0) as model:
            assert model is kept
        await _until(lambda: scheduler.loaded() == [])
        return kept

    assert _run(scheduler, scenario).runner.stopped


def test_unloading_a_busy_model_waits_for_its_request(store, runners, tiny_gguf):
    record = _model(store, "tiny", tiny_gguf)
    scheduler = _scheduler(store, runners, num_parallel=1, keep_alive="-1")

    async def scenario():
        async with scheduler.use(record, {}) as model:
            stream = model.runner.request("complete", {"num_predict": 4})
            await anext(stream)
            assert await scheduler.unload(record.name.display) is True
            assert scheduler.loaded() == [model] and model.runner.alive  # the request is not cut off
            rest = [event async for event in stream]
        await _until(lambda: scheduler.loaded() == [])
        return model, rest

    model, rest = _run(scheduler, scenario)
    assert rest[-1] == {"event": "done", "eval_count": 4}
    assert model.runner.stopped


def test_unloading_an_idle_model_stops_its_runners_at_once(store, runners, tiny_gguf):
    record = _model(store, "tiny", tiny_gguf)
    scheduler = _scheduler(store, runners, num_parallel=1, keep_alive="-1")

    async def scenario():
        await _generate(scheduler, record)
        async with scheduler.use(record, {}, embedding=True):
            pass
        assert len(scheduler.loaded()) == 2
        assert await scheduler.unload(record.name.display) is True
        assert scheduler.loaded() == [] and all(runner.stopped for runner in runners.made)
        assert await scheduler.unload(record.name.display) is False  # nothing of it is loaded any more

    _run(scheduler, scenario)


# --- the queue bound, crashes, fairness ----------------------------------------------------------
def test_more_than_max_queue_waiting_requests_is_busy(store, runners, tiny_gguf):
    record = _model(store, "tiny", tiny_gguf)
    scheduler = _scheduler(store, runners, num_parallel=1, max_queue=1, retry_after_s=7)

    async def scenario():
        async with scheduler.use(record, {}):
            gives_up = asyncio.create_task(_generate(scheduler, record))
            await _until(lambda: scheduler.queued == 1)
            with pytest.raises(Busy, match="busy") as busy:
                await _generate(scheduler, record)
            assert busy.value.retry_after == 7
            assert (scheduler.queued, scheduler.running) == (1, 1)
            gives_up.cancel()  # a client that goes away leaves the queue
            with pytest.raises(asyncio.CancelledError):
                await gives_up
            assert scheduler.queued == 0
            waiting = asyncio.create_task(_generate(scheduler, record))
            await _until(lambda: scheduler.queued == 1)
        events = await waiting
        return events, scheduler.queued, scheduler.running

    events, queued, running = _run(scheduler, scenario)
    assert events[-1]["event"] == "done" and (queued, running) == (0, 0)


def test_a_runner_that_dies_is_discarded_and_a_request_waiting_for_it_fails(store, runners, tiny_gguf):
    record = _model(store, "tiny", tiny_gguf)
    scheduler = _scheduler(store, runners, num_parallel=1)

    async def scenario():
        with pytest.raises(RunnerFailed, match="died"):
            async with scheduler.use(record, {}) as crashed:
                stream = crashed.runner.request("complete", {"num_predict": 5})
                await anext(stream)
                waiting = asyncio.create_task(_generate(scheduler, record))
                await _until(lambda: crashed.admission.waiting_total == 1)
                crashed.runner.die()
                async for _event in stream:
                    pass
        assert scheduler.loaded() == [] and crashed.runner.stopped
        with pytest.raises(RunnerFailed, match="died before the request started"):
            await waiting
        async with scheduler.use(record, {}) as replacement:
            return crashed.runner.pid, replacement.runner.pid

    crashed_pid, replacement_pid = _run(scheduler, scenario)
    assert replacement_pid != crashed_pid and len(runners.made) == 2


def test_a_runner_that_died_while_idle_is_replaced_by_the_next_request(store, runners, tiny_gguf):
    record = _model(store, "tiny", tiny_gguf)
    scheduler = _scheduler(store, runners, num_parallel=1)

    async def scenario():
        await _generate(scheduler, record)
        runners.made[0].die()
        return await _generate(scheduler, record)

    assert _run(scheduler, scenario)[-1]["event"] == "done"
    assert len(runners.made) == 2 and runners.made[0].stopped


def test_one_users_many_requests_do_not_starve_another(store, runners, tiny_gguf):
    """Alice holds both places and queues three more; Bob's one request takes the first place that frees."""
    record = _model(store, "tiny", tiny_gguf)
    scheduler = _scheduler(store, runners, num_parallel=2)
    admitted: list[str] = []

    async def ask(user: str, label: str, hold: asyncio.Event | None = None) -> None:
        async with scheduler.use(record, {}, user=user) as model:
            admitted.append(label)
            if hold is not None:
                await hold.wait()
            async for _event in model.runner.request("complete", {"num_predict": 2}):
                pass

    async def scenario():
        holds = [asyncio.Event(), asyncio.Event()]
        requests = [asyncio.create_task(ask("alice", f"alice {i}", holds[i])) for i in range(2)]
        await _until(lambda: scheduler.running == 2)
        requests += [asyncio.create_task(ask("alice", f"alice {i}")) for i in range(2, 5)]
        await _until(lambda: scheduler.queued == 3)
        requests.append(asyncio.create_task(ask("bob", "bob")))
        await _until(lambda: scheduler.queued == 4)
        holds[0].set()
        await _until(lambda: "bob" in admitted)
        holds[1].set()
        await asyncio.gather(*requests)

    _run(scheduler, scenario)
    assert admitted == ["alice 0", "alice 1", "bob", "alice 2", "alice 3", "alice 4"]
