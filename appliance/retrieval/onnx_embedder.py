"""MiniLM through ONNX Runtime: exported once from the bundled sentence-transformers model, kept in the home.

`ensure_export` writes `<home>/embeddings/<model>-<variant>.onnx` (fp32, or int8 dynamically quantized) with a
sidecar `.json` holding the file's sha256 and the digest of the model directory it came from. A file that is
missing, altered or exported from other weights is exported again; the bytes loaded are the bytes checked, so a
file changed after the check is never half-loaded. The graph returns mean-pooled, L2-normalised vectors, as the
sentence-transformers model does; texts are tokenized with the model's own `tokenizer.json`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
import warnings
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import numpy as np

from appliance.checksums import file_sha256
from appliance.errors import ApplianceError

log = logging.getLogger(__name__)

VARIANTS = {"onnx": "fp32", "onnx-int8": "int8"}
# How the files are made; a file made otherwise is exported again. A change that changes int8's vectors must
# also change its kind in VARIANTS, so that indexes built with the old vectors refuse the new ones.
RECIPE = 2
# Files of a sentence-transformers model directory that decide its vectors (README and the like do not).
_MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "pytorch_model.bin",
    "tokenizer.json",
    "vocab.txt",
    "sentence_bert_config.json",
    "modules.json",
    "1_Pooling/config.json",
)
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class EmbedderUnavailable(ApplianceError):
    """The embedding backend asked for cannot run here (not installed, or the model does not suit it)."""

    status = 503


def model_digest(model_dir: Path) -> str:
    """sha256 over the files of `model_dir` that decide its vectors (names and contents)."""
    files = [model_dir / name for name in _MODEL_FILES if (model_dir / name).is_file()]
    stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _digest(stamp)


@cache
def _digest(stamp: tuple) -> str:
    total = hashlib.sha256()
    for name, _size, _mtime in stamp:
        total.update(Path(name).name.encode() + b"\0")
        total.update(file_sha256(Path(name)).encode())
    return total.hexdigest()


def require_runtime():
    try:
        import onnxruntime
    except ImportError as error:
        raise EmbedderUnavailable(
            "APPLIANCE_EMBEDDING_BACKEND asks for ONNX Runtime, which is not installed: "
            "install the onnxruntime package or set APPLIANCE_EMBEDDING_BACKEND=torch"
        ) from error
    return onnxruntime


def check_model_shape(model_dir: Path) -> int:
    """The ONNX graph does mean pooling and L2 normalisation: refuse a model directory that pools otherwise.
    Returns the model's max_seq_length."""
    modules = json.loads((model_dir / "modules.json").read_text()) if (model_dir / "modules.json").exists() else []
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    pooling_file = model_dir / "1_Pooling" / "config.json"
    pooling = json.loads(pooling_file.read_text()) if pooling_file.exists() else {}
    if kinds != ["Transformer", "Pooling", "Normalize"] or not pooling.get("pooling_mode_mean_tokens"):
        raise EmbedderUnavailable(
            f"the model in {model_dir} is not a mean-pooled, normalised sentence-transformers model, which the "
            "ONNX backends expect: set APPLIANCE_EMBEDDING_BACKEND=torch"
        )
    config = json.loads((model_dir / "sentence_bert_config.json").read_text())
    return int(config["max_seq_length"])


def export_path(directory: Path, variant: str) -> Path:
    return directory / f"all-minilm-{VARIANTS[variant]}.onnx"


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _read_checked(path: Path, source_digest: str) -> bytes | None:
    """The file's bytes when its sidecar vouches for them and for the model they came from; else None (logged)."""
    if not path.exists() or not _sidecar(path).exists():
        log.info("no ONNX export at %s yet", path)
        return None
    try:
        record = json.loads(_sidecar(path).read_text())
    except ValueError:
        log.warning("the record beside %s is unreadable: exporting again", path)
        return None
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != record.get("sha256"):
        log.warning("%s does not match its recorded sha256 (altered or cut short): exporting again", path)
        return None
    if record.get("source_digest") != source_digest or record.get("recipe") != RECIPE:
        log.info("%s was exported from other model weights or otherwise: exporting again", path)
        return None
    return data


@contextmanager
def _export_lock(directory: Path):
    """Several processes starting together export once: the others wait, then find the export done."""
    with (directory / ".export.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_export(model_dir: Path, directory: Path, variant: str) -> bytes:
    """The checked bytes of the ONNX model for `variant`, exported first when missing, altered or stale."""
    require_runtime()
    check_model_shape(model_dir)
    source_digest = model_digest(model_dir)
    path = export_path(directory, variant)
    data = _read_checked(path, source_digest)
    if data is not None:
        return data
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _export_lock(directory):
        data = _read_checked(path, source_digest)  # another process may have exported it meanwhile
        if data is not None:
            return data
        data = _export(model_dir, directory, variant)
        record = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "source_digest": source_digest,
            "variant": variant,
            "recipe": RECIPE,
        }
        _atomic_write(path, data)
        _atomic_write(_sidecar(path), json.dumps(record, indent=2).encode())
        log.info("exported %s (%s, %d MB)", path, variant, len(data) >> 20)
    return data


def _atomic_write(path: Path, data: bytes) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".part")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)  # a full disk leaves no half-written file behind
        raise


def _export(model_dir: Path, directory: Path, variant: str) -> bytes:
    """Export the transformer with pooling and normalisation (dynamic batch and sequence axes); for `onnx-int8`,
    quantize the MatMul weights to int8 per channel, except the feed-forward output projections (their inputs,
    after GELU, have outliers: kept in fp32 they lift the cosine with torch from ~0.994 to ~0.997 for ~15% of the
    speed-up). Quantizing the embedding tables too, the quantizer's default, gave cosines of 0.90-0.95."""
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # no bars on a server's or the CLI's stderr

    class Pooled(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    model = Pooled(AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval())
    sample = torch.ones(2, 16, dtype=torch.long)
    axes = {name: {0: "batch", 1: "sequence"} for name in _INPUTS} | {"sentence_embedding": {0: "batch"}}
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        fp32 = Path(scratch) / "fp32.onnx"
        # The tracer warns of shape tests it fixes (mask present, no extra padding): true of every input here, and
        # the tests compare the graph with torch over several batch sizes and lengths.
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (sample, sample, torch.zeros_like(sample)),
                str(fp32),
                input_names=list(_INPUTS),
                output_names=["sentence_embedding"],
                dynamic_axes=axes,
                opset_version=17,
                dynamo=False,  # the TorchScript exporter: the dynamo one needs onnxscript, not installed
            )
        if VARIANTS[variant] == "fp32":
            return fp32.read_bytes()
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        matmuls = [n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "MatMul"]
        feed_forward_out = [name for name in matmuls if "/output/dense/" in name and "attention" not in name]
        int8 = Path(scratch) / "int8.onnx"
        with _quiet_root_logger():
            quantize_dynamic(
                str(fp32),
                str(int8),
                weight_type=QuantType.QInt8,
                per_channel=True,
                op_types_to_quantize=["MatMul"],
                nodes_to_exclude=feed_forward_out,
            )
        return int8.read_bytes()


@contextmanager
def _quiet_root_logger():
    """The quantizer logs a line per tensor on the root logger: keep the export's log to our own lines."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


class OnnxModel:
    """The exported MiniLM in ONNX Runtime: `embed` returns L2-normalised vectors and token counts.

    Two sessions share the model bytes: one on `threads` threads for batches, one on a single thread for small
    passes (questions), for the reason `embeddings.SMALL_PASS_TOKENS` gives."""

    def __init__(self, model_dir: Path, directory: Path, variant: str, threads: int):
        ort = require_runtime()
        from tokenizers import Tokenizer

        self.variant = variant
        self.max_seq_length = check_model_shape(model_dir)
        data = ensure_export(model_dir, directory, variant)
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        # tokenizer.json carries its own truncation and fixed padding (128): use the model's length, and no
        # padding at all (each text runs alone, see `embed`).
        self.tokenizer.enable_truncation(self.max_seq_length)
        self.tokenizer.no_padding()
        self.counter = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.counter.no_truncation()
        self.counter.no_padding()
        self.batch_session = self._session(ort, data, threads)  # 0: ONNX Runtime's default (physical cores)
        self.small_session = self._session(ort, data, 1)
        self.dimensions = int(self.embed(["x"])[0].shape[1])

    @staticmethod
    def _session(ort, data: bytes, threads: int):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # warnings about unused initializers and the like are noise here
        # Waiting threads sleep rather than spin, as torch's do under `appliance ingest` (OMP_WAIT_POLICY=PASSIVE):
        # the parser processes need the cores they would spin on.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])

    def get_embedding_dimension(self) -> int:
        return self.dimensions

    def token_lengths(self, texts: list[str]) -> list[int]:
        """Token counts before truncation (special tokens included)."""
        return [len(e.ids) for e in self.counter.encode_batch(texts)]

    def embed(self, texts: list[str], *, small_tokens: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Vectors and token counts (after truncation) of `texts`, each text in a forward pass of its own.

        One at a time, because int8's activations are quantized with one scale per input tensor: in a batch a
        text's vector would depend on its batch-mates and their padding (cosine down to ~0.995 with its vector
        alone), so the same question or chunk would not always get the same vector. Alone, it always does; and
        without padding a batch of chunks of mixed lengths runs no slower (measured: 23 chunks/s alone against 19
        in batches of 16, int8, 2 cores)."""
        encodings = self.tokenizer.encode_batch(texts)
        session = self.small_session if sum(len(e.ids) for e in encodings) <= small_tokens else self.batch_session
        rows = []
        for encoding in encodings:
            feeds = {
                "input_ids": np.array([encoding.ids], dtype=np.int64),
                "attention_mask": np.array([encoding.attention_mask], dtype=np.int64),
                "token_type_ids": np.array([encoding.type_ids], dtype=np.int64),
            }
            rows.append(session.run(None, feeds)[0][0])
        vectors = np.asarray(rows, dtype=np.float32) if rows else np.zeros((0, self.dimensions), dtype=np.float32)
        return vectors, np.array([len(e.ids) for e in encodings], dtype=np.int64)
