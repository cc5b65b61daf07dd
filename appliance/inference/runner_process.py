"""The server's handle on one runner child process: start, stream a request, cancel, stop."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from appliance.errors import ApplianceError, RunnerFailed
from appliance.inference.cpu_path import LIKELY_AMX_CRASH

log = logging.getLogger(__name__)
_ids = itertools.count(1)
_LINE_LIMIT = 64 * 1024 * 1024  # embeddings of a large batch come back as one line


def _exit_description(code: int | None) -> str:
    if code is None:
        return "the model runner stopped responding"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the model runner process died ({name})"
    return f"the model runner process exited with status {code}"


class Runner(Protocol):
    """What the scheduler and the engine use of a runner; `RunnerProcess` is the real one.

    `start` loads the model and returns the runner's ready event (its `n_ctx` among others), or raises
    `RunnerFailed`. `request` yields the events of one command ("token" ... "done", or "embeddings") and
    raises `RunnerFailed` when the runner dies meanwhile; closing it early cancels the command. `alive`
    turns false once the runner has died or stopped; `stop` may be called more than once, and while
    `start` is still under way (the scheduler's shutdown does), which should then fail soon. The
    scheduler calls `start` and `stop` without holding its lock, and gives up waiting for a `stop` after
    `scheduler.STOP_TIMEOUT_S`.
    """

    @property
    def pid(self) -> int | None: ...

    @property
    def alive(self) -> bool: ...

    async def start(self, timeout_s: float) -> dict[str, Any]: ...

    def request(self, op: str, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]: ...

    async def stop(self) -> None: ...


RunnerFactory = Callable[[dict[str, Any]], Runner]  # a runner for one load config (not yet started)


class RunnerProcess:
    def __init__(self, config: dict[str, Any]):
        self.config = config
        self.process: asyncio.subprocess.Process | None = None
        self.info: dict[str, Any] = {}
        self._queues: dict[str, asyncio.Queue] = {}
        self._reader: asyncio.Task | None = None
        self._dead = False
        self.cluster_error: str | None = None  # the last worker the runner reported lost (sharded models)
        self.answered = False  # a request was completed: a crash after that is not the model's first decode

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None and not self._dead

    async def start(self, timeout_s: float) -> dict[str, Any]:
        # GGML_RPC_NO_RDMA: ggml-rpc must never upgrade a worker connection past our TLS tunnel.
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", GGML_RPC_NO_RDMA="1")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "appliance.inference.runner",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            limit=_LINE_LIMIT,
        )
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write((json.dumps(self.config) + "\n").encode())
        await self.process.stdin.drain()
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    line = await self.process.stdout.readline()
                    event = json.loads(line) if line else {}
                    if event.get("event") != "cluster_error":
                        break
                    self.cluster_error = event.get("message")
        except TimeoutError:
            await self.stop()
            raise RunnerFailed(f"the model did not load within {timeout_s:.0f} s") from None
        if not line:
            code = await self.process.wait()
            raise RunnerFailed(f"failed to load model: {self._exit_description(code)}")
        if event.get("event") != "ready":
            await self.stop()
            raise RunnerFailed(event.get("message") or "failed to load model")
        self.info = event
        self._reader = asyncio.create_task(self._read_events())
        return event

    def _exit_description(self, code: int | None) -> str:
        """Why the runner ended; for a sharded model, which worker it lost (ggml-rpc then aborts it)."""
        description = _exit_description(code)
        if self.cluster_error:
            return f"{self.cluster_error}; {description}"
        if self.config.get("cluster") and code is not None and code < 0:
            return f"a cluster worker stopped responding; {description}"
        crashed = code is not None and -code in (signal.SIGSEGV, signal.SIGILL, signal.SIGBUS, signal.SIGABRT)
        if crashed and self.info and not self.answered:
            if self.info.get("amx") and self.info.get("extra_buffers"):
                return f"{description} at its first decode: {LIKELY_AMX_CRASH}"
            return (
                f"{description} at its first decode: the GGUF file may be damaged, or use an architecture or "
                "quantization this build of llama.cpp does not support; try another model"
            )
        return description

    async def _read_events(self) -> None:
        assert self.process and self.process.stdout
        try:
            while line := await self.process.stdout.readline():
                try:
                    event = json.loads(line)
                except ValueError:
                    log.warning("runner %s wrote a line that is not JSON", self.pid)
                    continue
                if event.get("event") == "cluster_error":
                    self.cluster_error = event.get("message")
                    log.error("runner %s: %s", self.pid, self.cluster_error)
                    continue
                if event.get("event") in ("done", "embeddings"):
                    self.answered = True
                target = self._queues.get(str(event.get("id")))
                if target is not None:
                    target.put_nowait(event)
        except (ValueError, asyncio.LimitOverrunError) as exc:
            log.error("runner %s protocol error: %s", self.pid, exc)
        finally:
            self._dead = True
            code = None
            try:
                code = await asyncio.wait_for(self.process.wait(), 5)
            except TimeoutError:
                self.process.kill()
            message = self._exit_description(code)
            if self._queues:
                log.error("%s while serving %d request(s)", message, len(self._queues))
            for target in self._queues.values():
                target.put_nowait({"event": "crashed", "message": message})

    async def request(self, op: str, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Send one command and yield its events until it is done; closing early cancels it."""
        if not self.alive:
            raise RunnerFailed("the model runner is not running")
        assert self.process and self.process.stdin
        request_id = str(next(_ids))
        events: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = events
        finished = False
        try:
            self.process.stdin.write((json.dumps({"id": request_id, "op": op, **payload}) + "\n").encode())
            await self.process.stdin.drain()
            while True:
                event = await events.get()
                kind = event.get("event")
                if kind == "crashed":
                    finished = True
                    raise RunnerFailed(
                        f"{event['message']}; the request was not completed, the next request starts a new runner"
                    )
                if kind == "error":
                    finished = True
                    error = ApplianceError(event.get("message", "runner error"))
                    error.status = int(event.get("status", 500))
                    raise error
                if kind in ("done", "embeddings"):
                    finished = True  # before yielding: a caller that stops reading now leaves nothing to cancel
                    yield event
                    return
                yield event
        except (BrokenPipeError, ConnectionResetError):
            finished = True
            raise RunnerFailed("the model runner process is gone; the next request starts a new runner") from None
        finally:
            if not finished and self.alive:
                try:
                    self.process.stdin.write((json.dumps({"id": request_id, "op": "cancel"}) + "\n").encode())
                    # Drain what the runner still sends for this request so the next one starts clean.
                    await asyncio.wait_for(self._drain(events), 30)
                except (BrokenPipeError, ConnectionResetError, TimeoutError):
                    pass
            self._queues.pop(request_id, None)

    @staticmethod
    async def _drain(events: asyncio.Queue) -> None:
        while (await events.get()).get("event") not in ("done", "embeddings", "error", "crashed"):
            pass

    async def stop(self, grace_s: float = 5.0) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        try:
            if self.process.stdin:
                self.process.stdin.close()
            await asyncio.wait_for(self.process.wait(), grace_s)
        except (TimeoutError, BrokenPipeError, ConnectionResetError):
            self.process.kill()
            await self.process.wait()
        if self._reader:
            await asyncio.gather(self._reader, return_exceptions=True)
