"""The runner: a child process that holds one loaded model (llama-cpp-python) and serves requests.

Run as `python -m appliance.inference.runner`. It speaks JSON lines: the first line on stdin is the
load configuration, then one command per line; events go to the original stdout, while the C
library's own output (fd 1) is redirected to stderr so it can never corrupt the protocol.
A crash here (out of memory, a bad file, an abort in ggml) ends this process only; the server
notices the closed pipe and answers the request with a clear error.

Commands:  {"id", "op": "complete", "prompt", "options", "grammar", "truncate"}
           {"id", "op": "embed", "texts", "truncate"}
           {"id", "op": "cancel"}
Events:    {"event": "ready", ...} once loaded, or {"event": "error", "message"} and exit
           {"id", "event": "token", "text"} ... {"id", "event": "done", counts and durations}
           {"id", "event": "embeddings", "embeddings", "prompt_eval_count"}
           {"id", "event": "error", "status", "message"}
"""

from __future__ import annotations

import codecs
import json
import os
import queue
import random
import sys
import threading
import time
from typing import Any

from appliance.inference.stops import StopMatcher


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class Runner:
    def __init__(self, config: dict[str, Any], out):
        import llama_cpp  # imported here: the server process never loads a model

        self._llama_cpp = llama_cpp
        self._out = out
        self._write_lock = threading.Lock()
        self.embedding = bool(config.get("embedding"))
        self.llm = llama_cpp.Llama(
            model_path=config["model_path"],
            n_ctx=int(config["n_ctx"]),
            n_batch=int(config.get("n_batch", 512)),
            n_threads=int(config["n_threads"]),
            n_threads_batch=int(config["n_threads"]),
            n_gpu_layers=int(config.get("n_gpu_layers", 0)),
            use_mmap=bool(config.get("use_mmap", True)),
            embedding=self.embedding,
            pooling_type=int(config.get("pooling_type", -1)),
            verbose=bool(config.get("verbose", False)),
        )
        self.cancelled: set[str] = set()

    def send(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, ensure_ascii=False) + "\n"
        with self._write_lock:
            self._out.write(line.encode())
            self._out.flush()

    # --- generation ------------------------------------------------------------------------------
    def _prompt_tokens(self, prompt: str, truncate: bool, num_predict: int) -> list[int]:
        tokens = self.llm.tokenize(prompt.encode(), add_bos=self._add_bos(), special=True)
        n_ctx = self.llm.n_ctx()
        if len(tokens) < n_ctx:
            return tokens
        if not truncate:
            raise RequestError(400, f"input length ({len(tokens)} tokens) exceeds the context length ({n_ctx} tokens)")
        room = num_predict if 0 < num_predict < n_ctx // 2 else n_ctx // 4
        return tokens[-(n_ctx - room) :]

    def _add_bos(self) -> bool:
        value = self.llm.metadata.get("tokenizer.ggml.add_bos_token")
        return value is None or str(value).lower() == "true"

    def complete(self, request_id: str, request: dict[str, Any]) -> None:
        options = request.get("options") or {}
        num_predict = int(options.get("num_predict", -1))
        tokens = self._prompt_tokens(request.get("prompt", ""), bool(request.get("truncate", True)), num_predict)
        seed = options.get("seed")
        self.llm.set_seed(int(seed) if seed is not None and int(seed) >= 0 else random.randint(0, 2**31 - 1))
        grammar = None
        if request.get("grammar"):
            try:
                grammar = self._llama_cpp.LlamaGrammar.from_string(request["grammar"], verbose=False)
            except Exception as exc:
                raise RequestError(400, f"invalid grammar: {exc}") from None
        stops = StopMatcher([str(s) for s in options.get("stop") or []])
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        n_ctx = self.llm.n_ctx()
        limit = n_ctx - len(tokens) if num_predict < 0 else min(num_predict, n_ctx - len(tokens))
        vocab = self.llm._model.vocab
        # llama-cpp-python re-uses the KV cache for the prompt's prefix that matches what it holds.
        cached = self.llm.longest_token_prefix(self.llm._input_ids.tolist(), tokens)
        started = time.perf_counter_ns()
        first_token_at = None
        generated = 0
        done_reason = "length"
        hit_stop_string = False
        generator = self.llm.generate(
            tokens,
            top_k=int(options.get("top_k", 40)),
            top_p=float(options.get("top_p", 0.9)),
            min_p=float(options.get("min_p", 0.0)),
            typical_p=float(options.get("typical_p", 1.0)),
            temp=float(options.get("temperature", 0.8)),
            repeat_penalty=float(options.get("repeat_penalty", 1.1)),
            frequency_penalty=float(options.get("frequency_penalty", 0.0)),
            presence_penalty=float(options.get("presence_penalty", 0.0)),
            tfs_z=float(options.get("tfs_z", 1.0)),
            mirostat_mode=int(options.get("mirostat", 0)),
            mirostat_tau=float(options.get("mirostat_tau", 5.0)),
            mirostat_eta=float(options.get("mirostat_eta", 0.1)),
            penalize_nl=bool(options.get("penalize_newline", True)),
            grammar=grammar,
        )
        try:
            while generated < limit:
                if request_id in self.cancelled:
                    done_reason = "cancelled"
                    break
                token = next(generator)
                if first_token_at is None:
                    first_token_at = time.perf_counter_ns()
                generated += 1
                if self._llama_cpp.llama_vocab_is_eog(vocab, token):
                    done_reason = "stop"
                    break
                text, hit = stops.feed(decoder.decode(self.llm.detokenize([token])))
                if text:
                    self.send({"id": request_id, "event": "token", "text": text})
                if hit:
                    done_reason, hit_stop_string = "stop", True
                    break
        finally:
            generator.close()
        tail = "" if hit_stop_string else stops.feed(decoder.decode(b"", final=True))[0] + stops.flush()
        if tail:
            self.send({"id": request_id, "event": "token", "text": tail})
        finished = time.perf_counter_ns()
        first_token_at = first_token_at or finished
        self.send(
            {
                "id": request_id,
                "event": "done",
                "done_reason": done_reason,
                "prompt_eval_count": len(tokens),
                "prompt_cache_count": min(cached, max(len(tokens) - 1, 0)),
                "prompt_eval_duration": first_token_at - started,
                "eval_count": generated,
                "eval_duration": finished - first_token_at,
            }
        )

    # --- embeddings ------------------------------------------------------------------------------
    def embed(self, request_id: str, request: dict[str, Any]) -> None:
        if not self.embedding:
            raise RequestError(400, "this runner was not loaded for embeddings")
        texts = [str(t) for t in request.get("texts", [])]
        n_ctx = self.llm.n_ctx()
        count = 0
        for text in texts:
            n = len(self.llm.tokenize(text.encode(), add_bos=True))
            if n > n_ctx and not request.get("truncate", True):
                raise RequestError(400, f"input length ({n} tokens) exceeds the context length ({n_ctx} tokens)")
            count += min(n, n_ctx)
        vectors = self.llm.embed(texts, normalize=True, truncate=True)
        self.send({"id": request_id, "event": "embeddings", "embeddings": vectors, "prompt_eval_count": count})


def _read_commands(stream, commands: queue.Queue, runner: Runner) -> None:
    for raw in stream:
        try:
            command = json.loads(raw)
        except ValueError:
            continue
        if command.get("op") == "cancel":
            runner.cancelled.add(str(command.get("id")))
        else:
            commands.put(command)
    commands.put(None)


def main() -> int:
    protocol_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever the C library prints goes to stderr, not into the protocol
    stdin = sys.stdin.buffer
    config = json.loads(stdin.readline() or "{}")
    try:
        runner = Runner(config, protocol_out)
    except Exception as exc:  # the model could not be loaded: say why, then exit
        protocol_out.write((json.dumps({"event": "error", "message": f"failed to load model: {exc}"}) + "\n").encode())
        protocol_out.flush()
        return 1
    llm = runner.llm
    runner.send(
        {
            "event": "ready",
            "n_ctx": llm.n_ctx(),
            "n_ctx_train": llm._model.n_ctx_train(),
            "n_vocab": llm.n_vocab(),
            "pid": os.getpid(),
        }
    )
    commands: queue.Queue = queue.Queue()
    threading.Thread(target=_read_commands, args=(stdin, commands, runner), daemon=True).start()
    while (command := commands.get()) is not None:
        request_id = str(command.get("id"))
        try:
            if command.get("op") == "complete":
                runner.complete(request_id, command)
            elif command.get("op") == "embed":
                runner.embed(request_id, command)
            else:
                raise RequestError(400, f"unknown runner operation {command.get('op')!r}")
        except RequestError as exc:
            runner.send({"id": request_id, "event": "error", "status": exc.status, "message": exc.message})
        except Exception as exc:
            runner.send({"id": request_id, "event": "error", "status": 500, "message": f"runner error: {exc}"})
        finally:
            runner.cancelled.discard(request_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
