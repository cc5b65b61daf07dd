"""Creating models: from a GGUF file (CLI), an uploaded blob (API), or an existing model, with an
optional TEMPLATE/SYSTEM/PARAMETER overlay and optional re-quantization."""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.errors import BadRequest, NotFound
from appliance.models.gguf_info import read_gguf
from appliance.models.modelfile import Modelfile, coerce_parameter
from appliance.models.names import parse_digest, parse_name
from appliance.models.quantize import quantize_file
from appliance.models.store import ModelRecord, ModelStore
from appliance.models.template import check_template

log = logging.getLogger(__name__)
Progress = Callable[[str], None]
# A file in /api/create's `files` is named as a plain file: no directories, no hidden names, no control characters.
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9 _.+-]{0,254}")


def check_file_names(files: dict[str, str]) -> None:
    """Refuse `files` entries whose names are paths (`../x.gguf`, `/x.gguf`, `dir/x.gguf`) or not text."""
    for filename, digest in files.items():
        if not isinstance(filename, str) or not _FILE_NAME.fullmatch(filename) or ".." in filename:
            raise BadRequest(
                f"invalid file name {filename!r} in files: use a plain file name such as model.gguf "
                "(letters, digits, space and _.+-; no directories and no '..')"
            )
        if not isinstance(digest, str):
            raise BadRequest(f"files[{filename!r}] must be a digest string (sha256:...)")


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or value.lower().endswith(".gguf")


def create_model(
    store: ModelStore,
    name: str,
    spec: Modelfile,
    *,
    base_dir: Path | None = None,
    files: dict[str, str] | None = None,
    quantize: str | None = None,
    progress: Progress = lambda _: None,
    on_bytes: Callable[[int], None] | None = None,
) -> ModelRecord:
    """Create `name`. `base_dir` (CLI only) lets FROM name a local file; the API gives `files` instead."""
    parse_name(name)
    if spec.template:
        check_template(spec.template)
    parameters = {key: coerce_parameter(key, value) for key, value in spec.parameters.items()}
    base: ModelRecord | None = None
    if files:
        check_file_names(files)
        ggufs = [digest for filename, digest in files.items() if str(filename).lower().endswith(".gguf")]
        if len(ggufs) != 1:
            raise BadRequest("files must name exactly one .gguf file (split GGUFs are not supported)")
        model_hex = parse_digest(ggufs[0])
        if not store.has_blob(ggufs[0]):
            raise BadRequest(f"blob {ggufs[0]} not found; upload it with POST /api/blobs first")
    elif not spec.from_:
        raise BadRequest("a model needs FROM (a GGUF file or an existing model) or files")
    elif base_dir is not None and _looks_like_path(spec.from_):
        path = (base_dir / Path(spec.from_).expanduser()).resolve()
        if not path.is_file():
            raise BadRequest(f"FROM file not found: {path}")
        progress(f"importing {path.name}")
        read_gguf(path)  # refuse a broken file before copying gigabytes
        model_hex = store.import_file(path, on_bytes)
    elif _looks_like_path(spec.from_):
        raise BadRequest(
            "FROM a file path is only possible from the command line; upload the file as a blob and pass it in 'files'"
        )
    else:
        try:
            base = store.resolve(spec.from_)
        except NotFound:
            raise NotFound(f"FROM model '{spec.from_}' not found") from None
        model_hex = base.model_digest
    progress(f"using model layer sha256:{model_hex}")
    info = store.gguf_info(model_hex)

    if quantize:
        progress(f"quantizing {info.quantization} model to {quantize}")
        with tempfile.TemporaryDirectory(dir=store.blobs_dir, prefix=".quantize-") as scratch:
            output = Path(scratch) / "model.gguf"
            quantize_file(store.blob_path(model_hex), output, quantize, info.quantization)
            read_gguf(output)
            model_hex = store.import_file(output)

    merged_parameters = dict(base.parameters) if base else {}
    merged_parameters.update(parameters)
    progress("writing manifest")
    record = store.create(
        name,
        model_digest=model_hex,
        template=spec.template if spec.template is not None else (base.template if base else None),
        system=spec.system if spec.system is not None else (base.system if base else None),
        parameters=merged_parameters,
        license_text=spec.license if spec.license is not None else (base.license if base else None),
        messages=spec.messages or (base.messages if base else []),
    )
    progress("success")
    return record


def modelfile_from_api(body: dict[str, Any]) -> Modelfile:
    """The JSON form of /api/create as a Modelfile value (`from`, `template`, `system`, `parameters`, ...)."""
    parameters = body.get("parameters") or {}
    messages = body.get("messages") or []
    if not isinstance(parameters, dict) or not isinstance(messages, list):
        raise BadRequest("parameters must be an object and messages a list")
    for field_name in ("from", "template", "system", "license"):
        if body.get(field_name) is not None and not isinstance(body[field_name], str):
            raise BadRequest(f"{field_name} must be a string")
    license_value = body.get("license")
    return Modelfile(
        from_=body.get("from") or "",
        parameters=dict(parameters),
        template=body.get("template"),
        system=body.get("system"),
        license=license_value,
        messages=messages,
    )
