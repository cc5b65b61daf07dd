"""llama.cpp's own log lines (appliance/inference/llama_log.py): errors reach stderr, warnings and information
only when verbose."""

import subprocess
import sys

LOAD = """
import sys
import llama_cpp
from appliance.inference import llama_log
path, ours, theirs = sys.argv[1:]
llama_log.quiet(ours == "verbose")
llama_cpp.Llama(path, vocab_only=True, verbose=theirs == "verbose", n_ctx=8)
print("loaded")
"""


def load(path, ours: str, theirs: str = "quiet") -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", LOAD, str(path), ours, theirs]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_warnings_only_when_verbose(tiny_gguf):
    quiet = load(tiny_gguf, "quiet")
    assert quiet.stdout.strip() == "loaded" and quiet.stderr == ""
    verbose = load(tiny_gguf, "verbose")
    # A vocabulary-only load warns that its context (at least 256) exceeds the training context it has not read.
    assert "possible training context overflow" in verbose.stderr
    assert "llama_context: n_seq_max" in verbose.stderr  # information too


def test_errors_still_reach_stderr(tmp_path, tiny_gguf):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    # llama-cpp-python itself hides everything while loading unless it is verbose: let it, and filter here.
    failed = load(broken, "quiet", theirs="verbose")
    assert failed.returncode != 0 and "loaded" not in failed.stdout
    assert "error loading model" in failed.stderr
    loaded = load(tiny_gguf, "quiet", theirs="verbose")
    assert loaded.stdout.strip() == "loaded"
    assert "Model metadata" in loaded.stderr  # llama-cpp-python's own verbose lines (Python's prints) remain
    assert "llama_context: n_seq_max" not in loaded.stderr  # llama.cpp's information is held back
    assert "possible training context overflow" not in loaded.stderr
