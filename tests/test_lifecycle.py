"""Runner processes under the scheduler: crashes, eviction, keep_alive expiry, the queue bound."""

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import ollama
import pytest

from appliance.config import SchedulerSettings
from appliance.errors import InsufficientMemory
from appliance.inference.hardware import detect
from appliance.inference.scheduler import Scheduler
from appliance.models.create import create_model
from appliance.models.modelfile import Modelfile
from appliance.models.store import ModelStore
from tests.conftest import start_server, stop_server

# Greedy decoding of the synthetic model never samples its end-of-generation token: a long, steady stream.
LONG = {"num_predict": 2500, "temperature": 0, "repeat_penalty": 1.0}
LONG_PROMPT = "tell me a story"


@pytest.fixture(scope="module")
def small_server(tmp_path_factory, tiny_gguf, tiny_long_gguf):
    srv = start_server(
        tmp_path_factory.mktemp("lifecycle"),
        {"tiny": tiny_gguf, "tiny-long": tiny_long_gguf},
        APPLIANCE_MAX_LOADED_MODELS="1",
        APPLIANCE_MAX_QUEUE="1",
        APPLIANCE_NUM_PARALLEL="1",  # one sequence per runner, so a second request has to wait
        APPLIANCE_NUM_CTX="16384",
    )
    yield srv
    stop_server(srv)


@pytest.fixture
def client(small_server):
    return ollama.Client(host=small_server.url, headers=small_server.auth(), timeout=300)


def _runner_pid(server, name="tiny-long:latest") -> int:
    for _ in range(100):
        for model in httpx.get(f"{server.url}/api/ps", headers=server.auth()).json()["models"]:
            if model["name"] == name:
                return model["runner"]["pid"]
        time.sleep(0.05)
    raise AssertionError("runner never appeared")


def test_runner_crash_mid_stream_ends_with_error_line_and_next_request_works(client, small_server):
    stream = client.generate(model="tiny-long", prompt=LONG_PROMPT, stream=True, options=LONG)
    first = next(stream)
    assert not first.done
    pid = _runner_pid(small_server)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ollama.ResponseError) as error:
        for _chunk in stream:
            pass
    assert "runner process died (SIGKILL)" in error.value.error
    small_server.assert_alive()
    again = client.generate(model="tiny-long", prompt="again", options={"num_predict": 3})
    assert again.done and again.eval_count <= 3
    assert _runner_pid(small_server) != pid


def test_runner_crash_without_streaming_is_a_500(client, small_server):
    client.generate(model="tiny-long", prompt="", keep_alive="5m")  # load first, so the pid is known
    pid = _runner_pid(small_server)
    result: dict = {}

    def ask():
        with small_server.http() as http:
            options = {**LONG, "num_predict": -1}  # to the end of the 16k context: seconds, not a fraction of one
            result["response"] = http.post(
                "/api/generate", json={"model": "tiny-long", "prompt": LONG_PROMPT, "stream": False, "options": options}
            )

    worker = threading.Thread(target=ask)
    worker.start()
    # Killed once the request holds its place on the runner (a fixed sleep once let the tiny model finish first,
    # a 200); a kill before the request reaches the runner would be the same 500 ("the model runner died").
    deadline = time.monotonic() + 30
    while "appliance_requests_running 1.0" not in httpx.get(f"{small_server.url}/metrics", timeout=30).text:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    worker.join(120)
    response = result["response"]
    assert response.status_code == 500
    assert "runner" in response.json()["error"]
    small_server.assert_alive()
    assert client.chat(model="tiny-long", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 2}).done


def test_only_max_loaded_models_stay_loaded(client):
    client.generate(model="tiny", prompt="a", options={"num_predict": 1})
    assert [m.model for m in client.ps().models] == ["tiny:latest"]
    client.generate(model="tiny-long", prompt="b", options={"num_predict": 1})
    assert [m.model for m in client.ps().models] == ["tiny-long:latest"]


def test_keep_alive_expiry_unloads(client):
    client.generate(model="tiny", prompt="a", options={"num_predict": 1}, keep_alive="1s")
    assert "tiny:latest" in {m.model for m in client.ps().models}
    deadline = time.time() + 30
    while time.time() < deadline and client.ps().models:
        time.sleep(0.2)
    assert client.ps().models == []


def test_queue_bound_answers_503_and_a_disconnect_frees_the_runner(client, small_server):
    # Longer than LONG: the unread stream must still be running when the third request arrives (the server
    # goes on generating into the socket's buffers while the client reads nothing).
    running = client.generate(
        model="tiny-long", prompt=LONG_PROMPT, stream=True, options={**LONG, "num_predict": 12000}
    )
    next(running)  # the first request holds the runner
    second: dict = {}

    def wait_in_queue():
        with small_server.http() as http:
            second["response"] = http.post(
                "/api/generate",
                json={"model": "tiny-long", "prompt": "second", "stream": False, "options": {"num_predict": 4}},
            )

    waiter = threading.Thread(target=wait_in_queue)
    waiter.start()
    time.sleep(1.0)  # the second request is now waiting: the queue (bound 1) is full
    with small_server.http() as http:
        third = http.post("/api/generate", json={"model": "tiny-long", "prompt": "third", "stream": False})
    assert third.status_code == 503
    assert "busy" in third.json()["error"] and third.headers["retry-after"]
    running.close()  # the client goes away: its generation is cancelled and the waiting request runs
    waiter.join(120)
    assert second["response"].status_code == 200
    assert second["response"].json()["eval_count"] <= 4


def test_model_larger_than_the_memory_budget_is_refused(tmp_path, tiny_gguf):
    store = ModelStore(tmp_path / "models")
    record = create_model(store, "tiny", Modelfile(from_=str(tiny_gguf)), base_dir=Path("/"))
    scheduler = Scheduler(SchedulerSettings(max_memory_bytes=1024 * 1024), store, detect())

    async def attempt():
        async with scheduler.use(record, {}):
            pass

    with pytest.raises(InsufficientMemory, match="requires more memory"):
        asyncio.run(attempt())
    assert scheduler.loaded() == []


def test_runners_exit_when_the_server_is_killed(tmp_path, tiny_gguf):
    """No orphaned runner keeps gigabytes of memory after the server dies (SIGKILL, OOM killer)."""
    srv = start_server(tmp_path / "home", {"tiny": tiny_gguf})
    try:
        client = ollama.Client(host=srv.url, headers=srv.auth())
        client.generate(model="tiny", prompt="", keep_alive=-1)
        pid = _runner_pid(srv, "tiny:latest")
        os.kill(srv.process.pid, signal.SIGKILL)
        srv.process.wait(30)
        deadline = time.time() + 30
        while time.time() < deadline and _process_exists(pid):
            time.sleep(0.1)
        assert not _process_exists(pid), "the runner outlived its server"
    finally:
        if srv.process.poll() is None:
            srv.process.kill()
    assert srv.netguard_log.read_text() == ""


def _process_exists(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_unloading_a_busy_model_waits_for_its_request(client, small_server):
    stream = client.generate(model="tiny-long", prompt=LONG_PROMPT, stream=True, options={**LONG, "num_predict": 400})
    next(stream)
    assert client.generate(model="tiny-long", prompt="", keep_alive=0).done_reason == "unload"
    chunks = list(stream)  # the running generation is not cut off
    assert chunks[-1].done and chunks[-1].eval_count == 400
    deadline = time.time() + 10
    while time.time() < deadline and client.ps().models:
        time.sleep(0.1)
    assert client.ps().models == []


def test_a_runner_that_dies_at_its_first_decode_names_the_likely_cause(client, small_server):
    """A crash before the runner ever finished a request points at the model file or llama.cpp's CPU path
    (on AMX CPUs, the repack crash and the setting that avoids it), not at a lost request only."""
    client.generate(model="tiny-long", prompt="", keep_alive=0)  # unloaded: the stream below starts a new runner
    stream = client.generate(model="tiny-long", prompt=LONG_PROMPT, stream=True, options=LONG)
    next(stream)
    os.kill(_runner_pid(small_server), signal.SIGSEGV)
    with pytest.raises(ollama.ResponseError) as failure:
        for _ in stream:
            pass
    assert "SIGSEGV" in str(failure.value) and "at its first decode" in str(failure.value)
    assert "the GGUF file may be damaged" in str(failure.value)
    assert client.generate(model="tiny", prompt="hi", options={"num_predict": 2}).done  # the server stays up


def test_the_amx_repack_crash_is_named_with_the_setting_that_avoids_it():
    from appliance.inference.cpu_path import LIKELY_AMX_CRASH
    from appliance.inference.runner_process import RunnerProcess

    runner = RunnerProcess({"model_path": "m.gguf"})
    runner.info = {"event": "ready", "amx": True, "extra_buffers": True}
    assert LIKELY_AMX_CRASH in runner._exit_description(-signal.SIGSEGV)
    assert "APPLIANCE_CPU_EXTRA_BUFFERS=off" in LIKELY_AMX_CRASH
    runner.answered = True  # it had decoded before: not a first-decode crash
    assert "first decode" not in runner._exit_description(-signal.SIGSEGV)
    runner.answered, runner.info = False, {"event": "ready", "amx": True, "extra_buffers": False}
    assert LIKELY_AMX_CRASH not in runner._exit_description(-signal.SIGSEGV)
