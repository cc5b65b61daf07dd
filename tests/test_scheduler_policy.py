"""The scheduler's policies with runners that are not processes: loading, reuse, eviction, expiry, queueing.

`FakeRunner` follows the runner contract (`appliance.inference.runner_process.Runner`) without llama.cpp,
so these run in milliseconds. test_lifecycle.py, test_reload.py and test_batching.py check the same
policies through real runner processes.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from appliance.cluster.coordinator import Cluster
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
    """A runner in this process: answers "complete" with `num_predict` tokens, can die.

    It loads at once unless given a `load_gate` (then once the gate is set, or fails once stopped, as
    the contract asks), and stops at once unless given a `stop_gate`.
    """

    def __init__(
        self,
        config: dict[str, Any],
        fail_load: bool = False,
        load_gate: asyncio.Event | None = None,
        stop_gate: asyncio.Event | None = None,
    ):
        self.config = config
        self.fail_load = fail_load
        self.load_gate = load_gate
        self.stop_gate = stop_gate
        self.pid: int | None = None
        self.loading = False
        self.stopped = False  # from the moment stop is called
        self.exited = False  # once stop has returned
        self.dead = False
        self._stop_called = asyncio.Event()

    @property
    def alive(self) -> bool:
        return self.pid is not None and not self.stopped and not self.dead

    async def start(self, timeout_s: float) -> dict[str, Any]:
        self.loading = True
        try:
            await asyncio.sleep(0)  # a load lets other tasks run
            if self.load_gate is not None and not self.load_gate.is_set():
                waits = {asyncio.ensure_future(self.load_gate.wait()), asyncio.ensure_future(self._stop_called.wait())}
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for wait in waits:
                        wait.cancel()
            if self.stopped:
                raise RunnerFailed("failed to load model: the model runner was stopped while loading")
            if self.fail_load:
                raise RunnerFailed("failed to load model: the model runner process exited with status 1")
            self.pid = next(_pids)
            return {"event": "ready", "n_ctx": self.config["n_ctx"], "pid": self.pid}
        finally:
            self.loading = False

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
        self._stop_called.set()
        if self.stop_gate is not None:
            await self.stop_gate.wait()
        self.exited = True


class Runners:
    """The runner factory the scheduler is given: remembers every runner it made, in order.

    `holding_loads()` and `holding_stops()` give the runners made meanwhile a gate their load (stop)
    waits for; the gate opens when the block ends, or when the test sets it.
    """

    def __init__(self) -> None:
        self.made: list[FakeRunner] = []
        self.fail_next_load = False
        self.load_gate: asyncio.Event | None = None
        self.stop_gate: asyncio.Event | None = None
        self.others_when_made: list[list[FakeRunner]] = []  # for each runner, those loading or not exited then

    def __call__(self, config: dict[str, Any]) -> FakeRunner:
        runner = FakeRunner(config, self.fail_next_load, self.load_gate, self.stop_gate)
        self.fail_next_load = False
        self.others_when_made.append([r for r in self.made if r.loading or (r.pid is not None and not r.exited)])
        self.made.append(runner)
        return runner

    @contextmanager
    def holding_loads(self) -> Iterator[asyncio.Event]:
        self.load_gate = gate = asyncio.Event()
        try:
            yield gate
        finally:
            gate.set()
            self.load_gate = None

    @contextmanager
    def holding_stops(self) -> Iterator[asyncio.Event]:
        self.stop_gate = gate = asyncio.Event()
        try:
            yield gate
        finally:
            gate.set()
            self.stop_gate = None


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


# --- loads and stops do not hold up the others ---------------------------------------------------
def test_a_model_loading_slowly_does_not_hold_up_requests_for_a_loaded_model(store, runners, tiny_gguf):
    a, b = _model(store, "a", tiny_gguf), _model(store, "b", tiny_gguf)
    scheduler = _scheduler(store, runners, num_parallel=1)

    async def scenario():
        await _generate(scheduler, b)
        with runners.holding_loads() as gate:
            loading = asyncio.create_task(_generate(scheduler, a))
            await _until(lambda: len(runners.made) == 2 and runners.made[1].loading)
            async with asyncio.timeout(2):  # not served before a's load ends: the test fails here
                events = await _generate(scheduler, b)
                runners.load_gate = None  # the next load is quick, and not held up by a's either
                async with scheduler.use(b, {}, embedding=True) as embedder:
                    assert embedder.runner is runners.made[2]
            assert events[-1]["event"] == "done" and not loading.done()
            assert {m.slot for m in scheduler.loaded()} == {(b.name.display, False), (b.name.display, True)}
            assert scheduler.loading() == [(a.name.display, False)]  # /api/ps lists a model once it has loaded
            gate.set()
            assert (await loading)[-1]["event"] == "done"
        assert scheduler.loading() == [] and len(scheduler.loaded()) == 3

    _run(scheduler, scenario)
    assert len(runners.made) == 3


def test_probing_the_workers_for_a_sharded_load_does_not_hold_up_requests_for_other_models(
    store, runners, tiny_gguf, tmp_path
):
    """A paired worker that does not answer takes PROBE_TIMEOUT_S (5 s) to give up on. The probe runs without
    the scheduler's lock: meanwhile a request for another model loads it and is served."""
    a, b = _model(store, "a", tiny_gguf), _model(store, "b", tiny_gguf)
    cluster = Cluster(tmp_path / "cluster")
    with socket.create_server(("127.0.0.1", 0)) as silent:  # connections wait in its backlog; it never speaks
        cluster.directory.mkdir(parents=True)
        worker = {"address": f"127.0.0.1:{silent.getsockname()[1]}", "node_id": "silent", "paired_at": time.time()}
        (cluster.directory / "nodes.json").write_text(json.dumps([worker]))
        scheduler = Scheduler(SchedulerSettings(num_parallel=1), store, HARDWARE, cluster, runner_factory=runners)

        async def scenario():
            sharded = asyncio.create_task(_generate(scheduler, a, {"num_nodes": 1}))
            await asyncio.sleep(0.3)  # it is probing the silent worker by now
            async with asyncio.timeout(3):  # not served before the probe ends: the test fails here
                events = await _generate(scheduler, b)
            assert events[-1]["event"] == "done" and not sharded.done()
            with pytest.raises(
                InsufficientMemory, match=r"only 0 of the 1 paired workers can be used \(127.0.0.1:\d+ unreachable"
            ):
                await sharded
            assert [m.slot for m in scheduler.loaded()] == [(b.name.display, False)]

        _run(scheduler, scenario)


def test_requests_for_a_model_that_is_loading_wait_for_that_load_and_share_its_runner(store, runners, tiny_gguf):
    record = _model(store, "tiny", tiny_gguf)
    scheduler = _scheduler(store, runners, num_parallel=2)

    async def scenario():
        with runners.holding_loads() as gate:
            requests = [asyncio.create_task(_generate(scheduler, record, user=user)) for user in ("alice", "bob")]
            await _until(lambda: scheduler.queued == 2 and len(runners.made) == 1)
            assert scheduler.loading() == [(record.name.display, False)] and scheduler.loaded() == []
            gate.set()
            results = await asyncio.gather(*requests)
        assert all(events[-1]["event"] == "done" for events in results)

    _run(scheduler, scenario)
    assert len(runners.made) == 1


def test_a_request_for_other_options_waits_for_the_load_and_its_request_then_reloads(store, runners, tiny_gguf):
    record = _model(store, "tiny", tiny_gguf)
    scheduler = _scheduler(store, runners, num_parallel=1)

    async def scenario():
        with runners.holding_loads() as gate:
            first = asyncio.create_task(_generate(scheduler, record))
            await _until(lambda: len(runners.made) == 1)
            other = asyncio.create_task(_generate(scheduler, record, {"num_batch": 256}))
            await _until(lambda: scheduler.queued == 2)
            assert len(runners.made) == 1
            gate.set()
            await asyncio.gather(first, other)

    _run(scheduler, scenario)
    assert [runner.config["n_batch"] for runner in runners.made] == [512, 256]
    assert runners.others_when_made[1] == [] and runners.made[0].stopped


def test_a_load_that_fails_frees_its_place_and_the_request_waiting_for_it_loads_again(store, runners, tiny_gguf):
    record = _model(store, "tiny", tiny_gguf)
    scheduler = _scheduler(store, runners, num_parallel=1, max_loaded_models=1)

    async def scenario():
        with runners.holding_loads() as gate:
            runners.fail_next_load = True
            failing = asyncio.create_task(_generate(scheduler, record))
            await _until(lambda: len(runners.made) == 1)
            waiting = asyncio.create_task(_generate(scheduler, record))
            await _until(lambda: scheduler.queued == 2)
            gate.set()
            with pytest.raises(RunnerFailed, match="failed to load model"):
                await failing
            events = await waiting
        assert events[-1]["event"] == "done" and scheduler.queued == 0
        assert [m.runner for m in scheduler.loaded()] == [runners.made[1]] and scheduler.loading() == []

    _run(scheduler, scenario)
    assert [runner.pid is not None for runner in runners.made] == [False, True]


def test_a_cancelled_load_stops_its_runner_and_frees_its_place(store, runners, tiny_gguf):
    record = _model(store, "tiny", tiny_gguf)
    scheduler = _scheduler(store, runners, num_parallel=1, max_loaded_models=1, max_memory_bytes=ONE_TINY_MODEL)

    async def scenario():
        with runners.holding_loads():
            cancelled = asyncio.create_task(_generate(scheduler, record))
            await _until(lambda: len(runners.made) == 1 and runners.made[0].loading)
            cancelled.cancel()  # the client went away while its model loaded
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            assert scheduler.loading() == [] and scheduler.loaded() == [] and scheduler.queued == 0
            await _until(lambda: runners.made[0].stopped)
        return await _generate(scheduler, record)

    assert _run(scheduler, scenario)[-1]["event"] == "done"
    assert len(runners.made) == 2 and runners.made[0].stopped and runners.made[0].pid is None


def test_two_models_that_do_not_fit_together_are_never_loading_at_once(store, runners, tiny_gguf):
    a, b = _model(store, "a", tiny_gguf), _model(store, "b", tiny_gguf)
    scheduler = _scheduler(store, runners, max_memory_bytes=ONE_TINY_MODEL, num_parallel=1)

    async def scenario():
        with runners.holding_loads() as gate:
            first = asyncio.create_task(_generate(scheduler, a))
            await _until(lambda: len(runners.made) == 1)
            second = asyncio.create_task(_generate(scheduler, b))
            await _until(lambda: scheduler.queued == 2)
            assert scheduler.loading() == [(a.name.display, False)] and len(runners.made) == 1
            gate.set()
            await asyncio.gather(first, second)
        return [m.slot[0] for m in scheduler.loaded()]

    assert _run(scheduler, scenario) == [b.name.display]
    assert len(runners.made) == 2 and runners.others_when_made[1] == []
    assert runners.made[0].stopped


def test_a_model_evicted_for_room_has_exited_before_the_next_one_loads(store, runners, tiny_gguf):
    a, b = _model(store, "a", tiny_gguf), _model(store, "b", tiny_gguf)
    scheduler = _scheduler(store, runners, max_memory_bytes=ONE_TINY_MODEL, num_parallel=1)

    async def scenario():
        with runners.holding_stops() as gate:
            await _generate(scheduler, a)
            loading = asyncio.create_task(_generate(scheduler, b))
            await _until(lambda: runners.made[0].stopped)  # a is stopping, to make room for b
            assert scheduler.loaded() == [] and scheduler.loading() == [] and len(runners.made) == 1
            gate.set()
            assert (await loading)[-1]["event"] == "done"

    _run(scheduler, scenario)
    assert len(runners.made) == 2 and runners.others_when_made[1] == []


def test_unloading_a_model_while_it_loads_unloads_it_after_its_request(store, runners, tiny_gguf):
    """A DELETE or keep_alive=0 during the load is an unload of a busy model: it happens once its request is done."""
    record = _model(store, "tiny", tiny_gguf)
    scheduler = _scheduler(store, runners, num_parallel=1, keep_alive="-1")

    async def scenario():
        with runners.holding_loads() as gate:
            loading = asyncio.create_task(_generate(scheduler, record))
            await _until(lambda: len(runners.made) == 1)
            assert await scheduler.unload(record.name.display) is True
            gate.set()
            events = await loading
        await _until(lambda: scheduler.loaded() == [])
        return events

    assert _run(scheduler, scenario)[-1]["event"] == "done"
    assert len(runners.made) == 1 and runners.made[0].stopped


def test_a_slow_runner_stop_does_not_hold_up_requests_for_other_models(store, runners, tiny_gguf):
    a, b = _model(store, "a", tiny_gguf), _model(store, "b", tiny_gguf)
    scheduler = _scheduler(store, runners, num_parallel=1, keep_alive="-1")

    async def scenario():
        with runners.holding_stops() as gate:
            await _generate(scheduler, a)
            await _generate(scheduler, b)
            unloading = asyncio.create_task(scheduler.unload(a.name.display))
            await _until(lambda: runners.made[0].stopped)  # its stop has begun
            async with asyncio.timeout(2):  # not served before a's runner has stopped: the test fails here
                events = await _generate(scheduler, b)
            assert events[-1]["event"] == "done" and not unloading.done()
            assert [m.slot[0] for m in scheduler.loaded()] == [b.name.display]
            gate.set()
            assert await unloading is True

    _run(scheduler, scenario)


def test_a_load_under_way_at_shutdown_fails_and_leaves_no_runner(store, runners, tiny_gguf):
    record = _model(store, "tiny", tiny_gguf)
    scheduler = _scheduler(store, runners, num_parallel=1)

    async def scenario():
        with runners.holding_loads():
            loading = asyncio.create_task(_generate(scheduler, record))
            await _until(lambda: len(runners.made) == 1 and runners.made[0].loading)
            await scheduler.shutdown()
            with pytest.raises(RunnerFailed):
                await loading
        assert scheduler.loaded() == [] and scheduler.loading() == []

    _run(scheduler, scenario)
    assert runners.made[0].stopped
