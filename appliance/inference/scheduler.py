"""The scheduler: which models are loaded, in which runner, for how long, and who waits.

Loads on demand, keeps a model loaded for its `keep_alive` (0 unloads after the request, a negative
value keeps it), bounds the number of loaded models and their estimated memory (least recently
used idle model unloads first), lets up to `n_parallel` requests share a generation runner (which
decodes them together) with the waiting ones admitted fairly across users (`FairQueue`), and answers
`Busy` (503 with Retry-After) once more than `max_queue` requests are waiting. A runner that crashes
is discarded; the next request for that model starts a new one. A request reloads its model only
when its effective load options (defaults filled in) need another runner; see `_obtain`.

Sharding: a model larger than the memory budget, or one whose options ask for `num_nodes` workers,
is split across this machine and the paired workers (`appliance.cluster`): the workers are probed
(a dead or busy one is left out, with the reason), the layers planned by free memory, and the runner
given the tunnels and split. ggml's RPC server serves one client at a time, so one sharded model is
loaded at a time (an idle one is unloaded for the next).

No request waits for another model's load or unload: the lock (`_changed`) is held only for bookkeeping,
never across a runner's start or stop. A load first reserves its place under the lock (a `_Loading`,
counted toward `max_loaded_models` and the memory budget like a loaded model), starts the runner without
the lock, and takes the lock again to install it; a request for a slot that is loading waits for that
load and then shares the runner (or, for other options, waits as for a busy runner). A runner being
stopped still counts toward both limits until it has exited (`_stopping`), so a load that needs its room
waits for it, and only the requests that need that room wait.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from appliance.cluster.coordinator import Cluster
from appliance.config import SchedulerSettings
from appliance.errors import BadRequest, Busy, InsufficientMemory, RunnerFailed
from appliance.inference.fair_queue import FairQueue
from appliance.inference.hardware import Hardware, gpu_layers_for
from appliance.inference.runner_process import Runner, RunnerFactory, RunnerProcess
from appliance.models.store import ModelRecord, ModelStore

log = logging.getLogger(__name__)
EMBEDDING_PARALLEL = 8  # embed requests an embedding runner may hold at once (answered in one batch)
FOREVER = datetime(2318, 1, 1, tzinfo=UTC)  # what /api/ps shows for a model kept loaded indefinitely
STOP_TIMEOUT_S = 30.0  # a runner's stop kills it after a few seconds; past this it is logged and forgotten
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any) -> float | None:
    """Seconds to stay loaded: None means forever (negative), 0 means unload after the request.

    Accepts numbers (seconds) and Go-style durations ("5m", "1h30m", "-1", "-1m", "0").
    """
    if isinstance(value, bool):
        raise BadRequest("keep_alive must be a duration like '5m' or a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        negative = text.startswith("-")
        body = text.lstrip("-+")
        if re.fullmatch(r"\d+(\.\d+)?", body):
            seconds = float(body)
        else:
            parts = _DURATION_PART.findall(body)
            if not parts or "".join(n + u for n, u in parts) != body:
                raise BadRequest(f"invalid keep_alive duration '{value}'")
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
        seconds = -seconds if negative else seconds
    else:
        raise BadRequest("keep_alive must be a duration like '5m' or a number of seconds")
    return None if seconds < 0 else seconds


@dataclass
class LoadedModel:
    slot: tuple[str, bool]  # (model name, embedding runner?)
    key: tuple
    record: ModelRecord
    runner: Runner
    size: int
    n_ctx: int
    gpu_layers: int
    load_duration_ns: int
    n_parallel: int = 1
    admission: FairQueue = field(default_factory=lambda: FairQueue(1))
    users: int = 0
    unload_requested: bool = False  # unload as soon as the requests using it are done
    last_used: float = field(default_factory=time.monotonic)
    expires_at: datetime | None = None
    placement: list[dict[str, Any]] | None = None  # nodes and their layers, for a sharded model
    _expiry: asyncio.TimerHandle | None = None

    def cancel_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None


@dataclass
class _Loading:
    """A load under way: the place it reserved (slot, memory, one of `max_loaded_models`) until it ends."""

    slot: tuple[str, bool]
    size: int
    sharded: bool
    runner: Runner | None = None  # once made; `shutdown` stops it
    unload_requested: bool = False  # an unload asked for during the load: unload after the request
    abandoned: bool = False  # the scheduler shut down meanwhile: the load fails


@dataclass
class _Stopping:
    """A runner being stopped: its memory counts until it has exited (a sharded one holds the workers)."""

    slot: tuple[str, bool]
    size: int
    sharded: bool


class Scheduler:
    def __init__(
        self,
        settings: SchedulerSettings,
        store: ModelStore,
        hardware: Hardware,
        cluster: Cluster | None = None,
        *,
        runner_factory: RunnerFactory = RunnerProcess,
    ):
        self.settings = settings
        self.store = store
        self.hardware = hardware
        self.cluster = cluster
        self.runner_factory = runner_factory
        self.memory_budget = settings.max_memory_bytes or int(hardware.available_memory * 0.9)
        self.default_keep_alive = parse_keep_alive(settings.keep_alive)
        self._models: dict[tuple[str, bool], LoadedModel] = {}  # loaded runners, by slot
        self._loading: dict[tuple[str, bool], _Loading] = {}  # loads under way (a slot is in one of the two)
        self._stopping: dict[asyncio.Task, _Stopping] = {}  # runners being stopped, by the task stopping them
        self._changed = asyncio.Condition()
        self._queued = 0
        self._expiring: set[asyncio.Task] = set()

    # --- public ----------------------------------------------------------------------------------
    def loaded(self) -> list[LoadedModel]:
        """The loaded runners (what /api/ps lists); a model appears once its runner has started."""
        return list(self._models.values())

    def loading(self) -> list[tuple[str, bool]]:
        """The slots (model name, embedding?) whose runner is starting."""
        return list(self._loading)

    @property
    def queued(self) -> int:
        """Requests waiting for a runner (to load, or for a free sequence on it)."""
        return self._queued

    @property
    def running(self) -> int:
        """Requests holding a sequence on a loaded runner."""
        return sum(model.admission.running_total for model in self._models.values())

    @asynccontextmanager
    async def use(
        self,
        record: ModelRecord,
        options: dict[str, Any],
        keep_alive: Any = None,
        embedding: bool = False,
        user: str = "",
    ) -> AsyncIterator[LoadedModel]:
        """Hold a place on a loaded runner for one request (loading it first if needed).

        `user` names who asks, for fair admission: waiting requests are served across users in turn.
        """
        keep = self.default_keep_alive if keep_alive is None else parse_keep_alive(keep_alive)
        if self._queued >= self.settings.max_queue:
            raise Busy(
                f"server busy: {self._queued} requests are already waiting; retry later",
                retry_after=self.settings.retry_after_s,
            )
        self._queued += 1
        queued = True
        model: LoadedModel | None = None
        try:
            model = await self._obtain(record, options, embedding)
            await model.admission.acquire(user)
            try:
                self._queued -= 1
                queued = False
                model.cancel_expiry()
                if not model.runner.alive:
                    await self._discard(model)
                    raise RunnerFailed("the model runner died before the request started; retry")
                try:
                    yield model
                except RunnerFailed:
                    await self._discard(model)
                    raise
            finally:
                model.admission.release(user)
        finally:
            if queued:
                self._queued -= 1
            if model is not None:
                model.users -= 1
                model.last_used = time.monotonic()
                self._schedule_expiry(model, 0 if model.unload_requested else keep)
                async with self._changed:
                    self._changed.notify_all()

    async def load_only(self, record: ModelRecord, options: dict[str, Any], keep_alive: Any = None) -> LoadedModel:
        """Load (or keep loaded) without running anything: Ollama's empty-prompt request."""
        async with self.use(record, options, keep_alive) as model:
            return model

    async def unload(self, name: str) -> bool:
        """Unload every runner of `name`: idle ones now, busy ones when their requests are done.

        A runner still loading is busy: its load's request keeps it, then it unloads (keep_alive 0).
        """
        stops = []
        async with self._changed:
            victims = [m for m in self._models.values() if m.slot[0] == name]
            for model in victims:
                if model.users:
                    model.unload_requested = True
                else:
                    stops.append(self._unload_locked(model))
            loads = [load for load in self._loading.values() if load.slot[0] == name]
            for load in loads:
                load.unload_requested = True
        await self._stopped(stops)
        return bool(victims or loads)

    async def shutdown(self) -> None:
        """Unload everything; a load under way is cut short (its runner stopped) and its request fails."""
        async with self._changed:
            while True:
                for load in self._loading.values():
                    if not load.abandoned:
                        load.abandoned = True
                        if load.runner is not None:
                            self._retire(load.runner, load.slot, 0, False)  # ends its start; the load retires it
                for model in list(self._models.values()):
                    self._unload_locked(model)
                if not self._loading:
                    break
                await self._changed.wait()  # a request waiting for a load that failed may start another
        await self._stopped(list(self._stopping))

    # --- loading ---------------------------------------------------------------------------------
    def _num_ctx(self, record: ModelRecord, options: dict[str, Any]) -> int:
        """The effective context: num_ctx (a model PARAMETER is merged into `options`), else the setting;
        at most the length the model was trained on."""
        n_ctx = int(options.get("num_ctx") or self.settings.num_ctx)
        n_ctx_train = self.store.gguf_info(record.model_digest).context_length or 0
        return min(n_ctx, n_ctx_train) if n_ctx_train else n_ctx

    def _num_thread(self, options: dict[str, Any]) -> int:
        return int(options.get("num_thread") or self.settings.num_thread or self.hardware.physical_cores)

    def _num_gpu(self, options: dict[str, Any]) -> int:
        return int(options["num_gpu"]) if "num_gpu" in options else self.settings.num_gpu

    def _runner_key(self, record: ModelRecord, options: dict[str, Any], embedding: bool) -> tuple:
        """The effective load options a loaded runner must match to serve a request (num_ctx aside).

        Defaults are filled in first, so stating an option at the value it would take anyway changes
        nothing. `main_gpu` is not compared: the runner does not use it.
        """
        return (
            record.model_digest,
            embedding,
            int(options.get("num_batch") or 512),
            self._num_thread(options),
            self._num_gpu(options),
            bool(options.get("use_mmap", True)),
            int(options.get("num_nodes") or 0),
        )

    def _load_config(self, record: ModelRecord, options: dict[str, Any], embedding: bool) -> tuple[dict, int]:
        info = self.store.gguf_info(record.model_digest)
        n_ctx = self._num_ctx(record, options)
        n_layers = int(info.arch_value("block_count", 0) or 0)
        n_embd = int(info.arch_value("embedding_length", 0) or 0)
        n_head = int(info.arch_value("attention.head_count", 1) or 1)
        n_head_kv = int(info.arch_value("attention.head_count_kv", n_head) or n_head)
        kv_bytes = n_ctx * n_layers * (n_embd // max(n_head, 1) * n_head_kv) * 2 * 2  # K and V, f16
        weights = record.model_path.stat().st_size + 64 * 1024 * 1024
        n_parallel = EMBEDDING_PARALLEL if embedding else self._parallel_for(weights, kv_bytes)
        size = weights + kv_bytes * (1 if embedding else n_parallel)
        config = {
            "model_path": str(record.model_path),
            "n_ctx": n_ctx,
            "n_batch": int(options.get("num_batch") or 512),
            "n_threads": self._num_thread(options),
            "n_gpu_layers": gpu_layers_for(self.hardware, size, n_layers, self._num_gpu(options)),
            "use_mmap": bool(options.get("use_mmap", True)),
            "cpu_extra_buffers": self.settings.cpu_extra_buffers,
            "embedding": embedding,
            "n_parallel": n_parallel,
            # Chat models carry no pooling type; mean pooling gives one vector per input for them.
            "pooling_type": -1 if info.arch_value("pooling_type") is not None else 1,
        }
        return config, size

    def _parallel_for(self, weights: int, kv_bytes_per_sequence: int) -> int:
        """APPLIANCE_NUM_PARALLEL, or the most sequences (16, 8, 4, 2) whose model fits half the budget."""
        if self.settings.num_parallel:
            return self.settings.num_parallel
        for n in (16, 8, 4, 2):
            if weights + n * kv_bytes_per_sequence <= self.memory_budget // 2:
                return n
        return 1

    async def _obtain(self, record: ModelRecord, options: dict[str, Any], embedding: bool) -> LoadedModel:
        """The loaded runner that can serve `options`, or a new one once the old one is idle.

        A runner serves a request when the effective load options match (`_runner_key`) and its context
        is at least the request's effective num_ctx: a smaller num_ctx is served by the larger runner
        (the generation runner still limits that request to its own num_ctx), a larger one reloads.
        So clients that state num_ctx and clients that do not reload the model at most once between them.
        """
        slot = (record.name.display, embedding)
        key = self._runner_key(record, options, embedding)
        n_ctx = self._num_ctx(record, options)
        # The workers' status for a sharded load. Probing them can take seconds (PROBE_TIMEOUT_S for one that
        # does not answer), so it happens with the lock released, and again after any wait (it may be stale).
        statuses: list | None = None
        while True:
            probe = False
            async with self._changed:
                while True:
                    current = self._models.get(slot)
                    if current is not None and current.key == key and current.n_ctx >= n_ctx and current.runner.alive:
                        current.unload_requested = False  # a new request's keep_alive decides again
                        current.users += 1
                        return current
                    if current is not None and current.users == 0:
                        self._unload_locked(current)  # changed model or options, or a dead runner
                        continue
                    if current is not None or slot in self._loading:
                        # A reload waits for the current users; any request for a slot that is loading waits
                        # for that load (and then shares its runner, or waits for its users like a reload).
                        await self._changed.wait()
                        statuses = None
                        continue
                    if any(stop.slot == slot for stop in self._stopping.values()):
                        await self._changed.wait()  # a reload starts once the runner it replaces has exited
                        statuses = None
                        continue
                    config, size = self._load_config(record, options, embedding)
                    sharded = self._wants_sharding(options, embedding, size)
                    if sharded:
                        holders = [m for m in self._models.values() if m.placement]
                        if any(m.users for m in holders) or any(load.sharded for load in self._loading.values()):
                            await self._changed.wait()  # the workers serve one sharded model at a time
                            statuses = None
                            continue
                        for holder in holders:
                            self._unload_locked(holder)
                        if any(stop.sharded for stop in self._stopping.values()):
                            await self._changed.wait()  # the workers are free once the old runner has exited
                            statuses = None
                            continue
                        if statuses is None:
                            probe = True
                            break
                        config, size = await self._shard(record, options, config, statuses)
                    if size > self.memory_budget:
                        raise InsufficientMemory(
                            f"model requires more memory ({size / 2**30:.1f} GiB) than the appliance may use "
                            f"({self.memory_budget / 2**30:.1f} GiB, APPLIANCE_MAX_MEMORY_BYTES)"
                        )
                    if not self._make_room(size):
                        await self._changed.wait()
                        statuses = None
                        continue
                    load = self._loading[slot] = _Loading(slot, size, sharded)
                    break
            if not probe:
                break
            statuses = await self._probe_workers(options)
        return await self._load(load, key, record, config)

    def _wants_sharding(self, options: dict[str, Any], embedding: bool, size: int) -> bool:
        if embedding:
            return False
        if int(options.get("num_nodes") or 0) > 0:
            return True
        return size > self.memory_budget and self.cluster is not None and bool(self.cluster.nodes())

    async def _probe_workers(self, options: dict[str, Any]) -> list:
        """The paired workers' status, probed without the lock (BadRequest when none is paired)."""
        if self.cluster is None or not self.cluster.nodes():
            raise BadRequest(
                f"num_nodes {int(options.get('num_nodes') or 0)} asks for sharding, but no worker is paired "
                "(pair one with `appliance cluster pair HOST:PORT --code CODE`)"
            )
        return await asyncio.to_thread(self.cluster.probe_all)

    async def _shard(
        self, record: ModelRecord, options: dict[str, Any], config: dict, statuses: list
    ) -> tuple[dict, int]:
        """Plan the split over this machine and the usable workers (`statuses`, just probed); the config a sharded
        runner needs."""
        assert self.cluster is not None  # _probe_workers made sure
        num_nodes = int(options.get("num_nodes") or 0)
        in_use = sum(m.size for m in self._models.values() if m.users) + self._reserved()
        info = self.store.gguf_info(record.model_digest)
        plan, usable = await asyncio.to_thread(
            self.cluster.plan,
            info,
            config["n_ctx"],
            config["n_parallel"],
            self.memory_budget - in_use,
            num_nodes,
            statuses,
        )
        config = {**config, "cluster": self.cluster.shard_config(plan, usable), "n_gpu_layers": plan.n_gpu_layers}
        log.info(
            "sharding %s: %s",
            record.name.display,
            ", ".join(f"{s.node} {s.n_layers} layers" for s in plan.shares),
        )
        return config, plan.local_bytes

    def _reserved(self) -> int:
        """Memory held by loads under way and by runners still stopping."""
        return sum(load.size for load in self._loading.values()) + sum(stop.size for stop in self._stopping.values())

    def _make_room(self, size: int) -> bool:
        """Evict idle models, least recently used first, until `size` fits; False if it cannot yet.

        Loads under way count as loaded models. Runners still stopping count too, but are not evicted
        again: once enough is evicted, the answer is False until they have exited.
        """

        def fits(counting_stops: bool) -> bool:
            stopping = self._stopping.values() if counting_stops else ()
            count = len(self._models) + len(self._loading) + len(stopping)
            used = sum(m.size for m in self._models.values()) + sum(load.size for load in self._loading.values())
            return (
                count < self.settings.max_loaded_models
                and used + sum(stop.size for stop in stopping) + size <= self.memory_budget
            )

        while not fits(counting_stops=False):
            idle = [m for m in self._models.values() if m.users == 0]
            if not idle:
                return False
            victim = min(idle, key=lambda m: m.last_used)
            log.info("unloading %s to make room", victim.slot[0])
            self._unload_locked(victim)
        return fits(counting_stops=True)

    async def _load(self, load: _Loading, key: tuple, record: ModelRecord, config: dict) -> LoadedModel:
        """Start the runner for the place `load` reserved, without the lock; install it, with the lock.

        However the load ends otherwise (the runner fails or times out, the request is cancelled, the
        scheduler shuts down), the reservation goes, the runner is stopped and waiting requests wake.
        """
        started = time.perf_counter_ns()
        installed = False
        try:
            await asyncio.to_thread(self.store.verify_blob, record.model_digest)
            if load.abandoned:
                raise RunnerFailed("the appliance is shutting down; the model was not loaded")
            load.runner = self.runner_factory(config)
            info = await load.runner.start(self.settings.load_timeout_s)
            async with self._changed:
                if load.abandoned:
                    raise RunnerFailed("the appliance is shutting down; the model was not loaded")
                model = LoadedModel(
                    slot=load.slot,
                    key=key,
                    record=record,
                    runner=load.runner,
                    size=load.size,
                    n_ctx=int(info.get("n_ctx", config["n_ctx"])),
                    gpu_layers=config["n_gpu_layers"],
                    load_duration_ns=time.perf_counter_ns() - started,
                    n_parallel=config["n_parallel"],
                    admission=FairQueue(config["n_parallel"]),
                    users=1,
                    unload_requested=load.unload_requested,
                    placement=config["cluster"]["placement"] if config.get("cluster") else None,
                )
                del self._loading[load.slot]
                self._models[load.slot] = model
                installed = True
                self._changed.notify_all()
        finally:
            if not installed:
                # No await before the reservation is gone: this runs even for a cancelled request.
                if self._loading.get(load.slot) is load:
                    del self._loading[load.slot]
                self._retire(load.runner, load.slot, load.size if load.runner else 0, load.sharded)  # wakes waiters
        log.info(
            "loaded %s in runner pid %s (ctx %s, gpu layers %s)",
            load.slot[0],
            model.runner.pid,
            model.n_ctx,
            model.gpu_layers,
        )
        return model

    # --- unloading -------------------------------------------------------------------------------
    def _unload_locked(self, model: LoadedModel) -> asyncio.Task:
        """Take `model` out of the loaded ones and stop its runner in the background (the task)."""
        model.cancel_expiry()
        if self._models.get(model.slot) is model:
            del self._models[model.slot]
        self._changed.notify_all()
        return self._retire(model.runner, model.slot, model.size, bool(model.placement))

    def _retire(self, runner: Runner | None, slot: tuple[str, bool], size: int, sharded: bool) -> asyncio.Task:
        """Stop `runner` (if any) in a task that holds its room (`_stopping`) until it has exited, then
        wakes the waiting requests; no lock is needed to call it, none is held while the runner stops."""
        task = asyncio.get_running_loop().create_task(self._stop(runner))
        self._stopping[task] = _Stopping(slot, size, sharded)
        return task

    async def _stop(self, runner: Runner | None) -> None:
        try:
            if runner is not None:
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await runner.stop()
        except TimeoutError:
            log.error(
                "runner pid %s did not stop within %.0f s; its memory is no longer counted", runner.pid, STOP_TIMEOUT_S
            )
        except Exception:
            log.exception("stopping runner pid %s failed", runner.pid if runner else None)
        finally:
            async with self._changed:
                self._stopping.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
                self._changed.notify_all()

    @staticmethod
    async def _stopped(stops: list[asyncio.Task]) -> None:
        """Wait for these stops; cancelling the wait leaves them running."""
        if stops:
            await asyncio.wait(stops)

    async def _discard(self, model: LoadedModel) -> None:
        async with self._changed:
            stop = self._unload_locked(model)
        await self._stopped([stop])

    def _schedule_expiry(self, model: LoadedModel, keep: float | None) -> None:
        model.cancel_expiry()
        if self._models.get(model.slot) is not model:
            return
        if keep is None:
            model.expires_at = FOREVER
            return
        model.expires_at = datetime.now(UTC) + timedelta(seconds=keep)
        model._expiry = asyncio.get_running_loop().call_later(keep, self._start_expiry, model)

    def _start_expiry(self, model: LoadedModel) -> None:
        task = asyncio.get_running_loop().create_task(self._expire(model))
        self._expiring.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._expiring.discard)

    async def _expire(self, model: LoadedModel) -> None:
        async with self._changed:
            if model.users == 0 and self._models.get(model.slot) is model:
                log.info("keep_alive expired: unloading %s", model.slot[0])
                self._unload_locked(model)
