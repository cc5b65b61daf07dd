"""The runner: a child process that holds one loaded model (llama-cpp-python) and serves requests.

Run as `python -m appliance.inference.runner`. It speaks JSON lines: the first line on stdin is the
load configuration, then one command per line; events go to the original stdout, while the C
library's own output (fd 1) is redirected to stderr so it can never corrupt the protocol.
A crash here (out of memory, a bad file, an abort in ggml) ends this process only; the server
notices the closed pipe and answers the request with a clear error.

A generation runner decodes up to `n_parallel` requests together (`batching.BatchedGenerator`); an
embedding runner answers every embed request waiting at the same moment with one batched call.
Commands are read on a thread and handled between decode steps, so a new request joins the running
batch and a cancel takes effect after at most one step.

Commands:  {"id", "op": "complete", "prompt", "options", "grammar", "truncate"}
           {"id", "op": "embed", "texts", "truncate"}
           {"id", "op": "cancel"}
Events:    {"event": "ready", ...} once loaded, or {"event": "error", "message"} and exit
           {"id", "event": "token", "text"} ... {"id", "event": "done", counts and durations}
           {"id", "event": "embeddings", "embeddings", "prompt_eval_count"}
           {"id", "event": "error", "status", "message"}
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from appliance.inference.batching import BatchedGenerator, RequestError

Send = Callable[[dict[str, Any]], None]


class EmbeddingRunner:
    """An embedding model: every embed request waiting at one moment is answered by one batched call."""

    def __init__(self, config: dict[str, Any], send: Send):
        import llama_cpp  # imported here: the server process never loads a model

        from appliance.inference import cpu_path, llama_log

        llama_log.quiet(bool(config.get("verbose", False)))
        self.send = send
        self.cpu_path = cpu_path.current(config.get("cpu_extra_buffers", "auto"))
        with cpu_path.model_params_with_extra_buffers(self.cpu_path.extra_buffers):
            self.llm = self._load(llama_cpp, config)
        self.pending: list[tuple[str, dict[str, Any]]] = []
        self.batches = 0  # batched calls made, reported with each result

    @staticmethod
    def _load(llama_cpp, config: dict[str, Any]):
        return llama_cpp.Llama(
            model_path=config["model_path"],
            n_ctx=int(config["n_ctx"]),
            n_batch=int(config.get("n_batch", 512)),
            n_threads=int(config["n_threads"]),
            n_threads_batch=int(config["n_threads"]),
            n_gpu_layers=int(config.get("n_gpu_layers", 0)),
            use_mmap=bool(config.get("use_mmap", True)),
            embedding=True,
            pooling_type=int(config.get("pooling_type", -1)),
            verbose=bool(config.get("verbose", False)),
        )

    def info(self) -> dict[str, Any]:
        return {
            "n_ctx": self.llm.n_ctx(),
            "n_ctx_train": self.llm._model.n_ctx_train(),
            "n_vocab": self.llm.n_vocab(),
            "amx": self.cpu_path.amx,
            "extra_buffers": self.cpu_path.extra_buffers,
        }

    @property
    def busy(self) -> bool:
        return bool(self.pending)

    def submit(self, request_id: str, request: dict[str, Any]) -> None:
        self.pending.append((request_id, request))

    def cancel(self, request_id: str) -> None:
        pass  # an embed call is short and answered whole

    def close(self) -> None:
        self.llm.close()

    def step(self) -> None:
        taken, self.pending = self.pending, []
        n_ctx = self.llm.n_ctx()
        accepted: list[tuple[str, list[str], int]] = []
        for request_id, request in taken:
            texts = [str(t) for t in request.get("texts", [])]
            count = 0
            try:
                for text in texts:
                    n = len(self.llm.tokenize(text.encode(), add_bos=True))
                    if n > n_ctx and not request.get("truncate", True):
                        raise RequestError(
                            400, f"input length ({n} tokens) exceeds the context length ({n_ctx} tokens)"
                        )
                    count += min(n, n_ctx)
            except RequestError as exc:
                self.send({"id": request_id, "event": "error", "status": exc.status, "message": exc.message})
                continue
            accepted.append((request_id, texts, count))
        if not accepted:
            return
        started = time.perf_counter_ns()
        try:
            vectors = self.llm.embed([t for _, texts, _ in accepted for t in texts], normalize=True, truncate=True)
        except Exception as exc:  # noqa: BLE001 - reported to each caller; the runner stays up
            for request_id, _, _ in accepted:
                self.send({"id": request_id, "event": "error", "status": 500, "message": f"runner error: {exc}"})
            return
        self.batches += 1
        duration = time.perf_counter_ns() - started
        offset = 0
        for request_id, texts, count in accepted:
            mine = vectors[offset : offset + len(texts)]
            offset += len(texts)
            self.send(
                {
                    "id": request_id,
                    "event": "embeddings",
                    "embeddings": mine,
                    "prompt_eval_count": count,
                    "batched_with": len(accepted) - 1,
                    "duration": duration,
                }
            )


def _read_commands(stream, commands: queue.Queue) -> None:
    for raw in stream:
        try:
            command = json.loads(raw)
        except ValueError:
            continue
        if isinstance(command, dict):
            commands.put(command)
    commands.put(None)


def _dispatch(worker: BatchedGenerator | EmbeddingRunner, command: dict[str, Any], send: Send) -> None:
    request_id = str(command.get("id"))
    op = command.get("op")
    if op == "cancel":
        worker.cancel(request_id)
    elif (op == "complete" and isinstance(worker, BatchedGenerator)) or (
        op == "embed" and isinstance(worker, EmbeddingRunner)
    ):
        worker.submit(request_id, command)
    elif op in ("complete", "embed"):
        kind = "embeddings" if isinstance(worker, EmbeddingRunner) else "generation"
        send({"id": request_id, "event": "error", "status": 400, "message": f"this runner was loaded for {kind}"})
    else:
        send({"id": request_id, "event": "error", "status": 400, "message": f"unknown runner operation {op!r}"})


def serve(worker: BatchedGenerator | EmbeddingRunner, commands: queue.Queue, send: Send) -> None:
    """Take every command that is waiting (block only when idle), then run one step; until stdin closes."""
    while True:
        block = not worker.busy
        while True:
            try:
                command = commands.get(block=block)
            except queue.Empty:
                break
            if command is None:
                return
            _dispatch(worker, command, send)
            block = False
        if worker.busy:
            worker.step()


def main() -> int:
    protocol_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever the C library prints goes to stderr, not into the protocol
    stdin = sys.stdin.buffer
    config = json.loads(stdin.readline() or "{}")
    write_lock = threading.Lock()

    def send(event: dict[str, Any]) -> None:
        line = json.dumps(event, ensure_ascii=False) + "\n"
        with write_lock:
            protocol_out.write(line.encode())
            protocol_out.flush()

    try:
        worker = EmbeddingRunner(config, send) if config.get("embedding") else BatchedGenerator(config, send)
    except Exception as exc:  # the model could not be loaded: say why, then exit
        send({"event": "error", "message": f"failed to load model: {exc}"})
        return 1
    send({"event": "ready", **worker.info(), "pid": os.getpid()})
    commands: queue.Queue = queue.Queue()
    threading.Thread(target=_read_commands, args=(stdin, commands), daemon=True).start()
    serve(worker, commands, send)
    worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
