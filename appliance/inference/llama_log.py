"""llama.cpp's own log lines: which reach stderr.

llama-cpp-python's log callback reads ggml's levels by an older numbering (WARN taken for ERROR), so with
`verbose=False` every warning still reached stderr (e.g. "n_ctx_seq (256) > n_ctx_train (0) -- possible
training context overflow" on each `appliance ask`). `quiet()` installs a callback that reads today's
numbering (ggml.h: DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5) and lets through errors only, or everything
when verbose, written to stderr as llama.cpp wrote it.
"""

from __future__ import annotations

import ctypes
import sys

import llama_cpp

ERROR = 4
CONTINUED = 5
_threshold = ERROR
_last_level = ERROR


@llama_cpp.llama_log_callback
def _write(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    global _last_level
    if level != CONTINUED:  # a continued line keeps the level of the line it continues
        _last_level = level
    if _last_level >= _threshold:
        print(text.decode("utf-8", errors="replace"), end="", file=sys.stderr, flush=True)


def quiet(verbose: bool = False) -> None:
    """From now on in this process: llama.cpp's errors only on stderr, or everything when `verbose`."""
    global _threshold
    _threshold = 0 if verbose else ERROR
    llama_cpp.llama_log_set(_write, ctypes.c_void_p(0))
