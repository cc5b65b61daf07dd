"""Builds and installs the offline stand-in for spaCy's `en_core_web_sm`.

`unstructured` loads `en_core_web_sm` for sentence splitting and, when it is missing, downloads it
from the internet; offline that fails (and `partition_pdf` then returns nothing, silently). spaCy
models are not on PyPI, so the install builds a blank English pipeline with a sentencizer,
packages it under that name with `spacy package`, and installs the wheel. Classification then
relies on unstructured's heuristics that need no part-of-speech tags.

    python -m ingest.spacy_standin          # build and install into the running interpreter
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from importlib.util import find_spec
from pathlib import Path

NAME = "core_web_sm"  # spaCy prefixes the language: en_core_web_sm
VERSION = "3.8.0"


def build_wheel(out_dir: Path) -> Path:
    import spacy

    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    nlp.meta.update(
        name=NAME,
        version=VERSION,
        description="Offline stand-in: blank English pipeline with a sentencizer (no download)",
    )
    model_dir = out_dir / "model"
    nlp.to_disk(model_dir)
    package_dir = out_dir / "package"
    package_dir.mkdir()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "spacy",
            "package",
            str(model_dir),
            str(package_dir),
            "--name",
            NAME,
            "--version",
            VERSION,
            "--build",
            "wheel",
            "--force",
        ],
        check=True,
        capture_output=True,
    )
    return next(package_dir.rglob("*.whl"))


def main() -> int:
    if find_spec("en_core_web_sm") is not None:
        print("en_core_web_sm is already installed")
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        wheel = build_wheel(Path(scratch))
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)], check=True
        )
    print("installed the offline en_core_web_sm stand-in")
    return 0


if __name__ == "__main__":
    sys.exit(main())
