"""The model store on a real temp directory: import, manifests, digests, GGUF validation, quantize."""

import json
import math
import os
import struct
from pathlib import Path

import pytest

from appliance.errors import BadRequest, NotFound
from appliance.models.create import create_model
from appliance.models.gguf_info import InvalidGGUF, read_gguf
from appliance.models.modelfile import Modelfile
from appliance.models.store import CorruptBlob, DigestMismatch, ModelStore
from appliance.models.synthetic_gguf import TINY_QUANTIZABLE, write_gguf


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return ModelStore(tmp_path / "models")


def test_gguf_metadata_is_read(tiny_gguf):
    info = read_gguf(tiny_gguf)
    assert info.architecture == "llama"
    assert info.context_length == 512
    assert info.quantization == "F32"
    assert info.parameter_count == sum(math.prod(t.shape) for t in info.tensors)
    assert "<|im_start|>" in info.chat_template
    model_info = info.model_info()
    assert model_info["llama.block_count"] == 2
    assert "tokenizer.ggml.tokens" not in model_info  # large arrays left out, as Ollama does


def test_create_list_show_copy_remove(store, tiny_gguf):
    record = create_model(
        store,
        "clinic/tiny:v1",
        Modelfile(from_=str(tiny_gguf), parameters={"temperature": 0.1}, system="Be brief."),
        base_dir=Path("/"),
    )
    assert record.name.display == "clinic/tiny:v1"
    blob = store.blob_path(record.model_digest)
    assert blob.name == f"sha256-{record.model_digest}" and blob.read_bytes() == tiny_gguf.read_bytes()
    manifest = json.loads((store.manifests_dir / "local/clinic/tiny/v1").read_text())
    assert manifest["layers"][0]["mediaType"] == "application/vnd.ollama.image.model"
    assert record.parameters == {"temperature": 0.1} and record.system == "Be brief."
    assert record.details["family"] == "llama" and record.details["quantization_level"] == "F32"

    copy = store.copy("clinic/tiny:v1", "tiny2")
    assert copy.model_digest == record.model_digest
    assert {r.name.display for r in store.list()} == {"clinic/tiny:v1", "tiny2:latest"}

    store.remove("clinic/tiny:v1")
    assert blob.exists(), "a blob still used by tiny2 must survive"
    store.remove("tiny2")
    assert not blob.exists() and store.list() == []
    assert list(store.blobs_dir.iterdir()) == []
    with pytest.raises(NotFound):
        store.resolve("tiny2")


def test_derived_model_keeps_base_layers(store, tiny_gguf):
    create_model(store, "base", Modelfile(from_=str(tiny_gguf), system="base system"), base_dir=Path("/"))
    derived = create_model(store, "derived", Modelfile(from_="base", parameters={"num_ctx": 256}))
    assert derived.system == "base system" and derived.parameters == {"num_ctx": 256}


def test_digest_verified_on_load(store, tiny_gguf):
    record = create_model(store, "tiny", Modelfile(from_=str(tiny_gguf)), base_dir=Path("/"))
    assert store.verify_blob(record.model_digest) == record.model_path
    with record.model_path.open("r+b") as handle:  # flip one byte of a tensor
        handle.seek(-10, os.SEEK_END)
        byte = handle.read(1)
        handle.seek(-10, os.SEEK_END)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CorruptBlob, match="corrupt"):
        store.verify_blob(record.model_digest)


def test_blob_writer_refuses_wrong_digest(store):
    writer = store.blob_writer()
    writer.write(b"some bytes")
    with pytest.raises(DigestMismatch):
        writer.commit("0" * 64)
    assert list(store.blobs_dir.iterdir()) == [], "nothing is left behind"


def _truncated(src: Path, dst: Path, keep: int) -> Path:
    dst.write_bytes(src.read_bytes()[:keep])
    return dst


def test_truncated_and_corrupt_ggufs_are_refused(store, tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()
    cases = {
        "header only": _truncated(tiny_gguf, tmp_path / "a.gguf", 100),
        "tensor data cut": _truncated(tiny_gguf, tmp_path / "b.gguf", len(data) - 1000),
        "not gguf": tmp_path / "c.gguf",
    }
    cases["not gguf"].write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    for path in cases.values():
        with pytest.raises(InvalidGGUF):
            create_model(store, "broken", Modelfile(from_=str(path)), base_dir=Path("/"))
    assert store.list() == [] and list(store.blobs_dir.iterdir()) == []


def test_tensor_offset_past_end_is_refused(tiny_gguf, tmp_path):
    info = read_gguf(tiny_gguf)
    data = bytearray(tiny_gguf.read_bytes())
    # Find the last tensor's offset field in the tensor table and point it far past the end.
    name = info.tensors[-1].name.encode()
    position = data.rfind(struct.pack("<Q", len(name)) + name)
    n_dims = struct.unpack_from("<I", data, position + 8 + len(name))[0]
    offset_at = position + 8 + len(name) + 4 + 8 * n_dims + 4
    struct.pack_into("<Q", data, offset_at, len(data) * 4 // 32 * 32)
    bad = tmp_path / "offsets.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(InvalidGGUF, match="past the end"):
        read_gguf(bad)


def test_bad_names_never_touch_the_filesystem(store, tiny_gguf, tmp_path):
    with pytest.raises(BadRequest):
        create_model(store, "../../escape", Modelfile(from_=str(tiny_gguf)), base_dir=Path("/"))
    assert not (tmp_path / "escape").exists()
    assert list(store.manifests_dir.rglob("*")) == []


def test_api_form_refuses_server_paths(store, tiny_gguf):
    with pytest.raises(BadRequest, match="only possible from the command line"):
        create_model(store, "x", Modelfile(from_=str(tiny_gguf)))


@pytest.mark.slow
def test_quantize_to_q4_k_m(store, tmp_path):
    source = write_gguf(tmp_path / "f16.gguf", TINY_QUANTIZABLE, quant="f16", seed=3)
    record = create_model(store, "tiny-q4", Modelfile(from_=str(source)), base_dir=Path("/"), quantize="q4_K_M")
    assert record.details["quantization_level"] == "Q4_K_M"
    info = store.gguf_info(record.model_digest)
    assert info.quantization == "Q4_K_M"
    assert record.model_path.stat().st_size < source.stat().st_size / 2
    with pytest.raises(BadRequest, match="unknown quantization type"):
        create_model(store, "tiny-bad", Modelfile(from_=str(source)), base_dir=Path("/"), quantize="q3_bogus")
    # A 4-bit model may be re-quantized (a second rounding: e.g. the bundled Q4_1 model into a faster type) ...
    requantized = create_model(store, "tiny-requant", Modelfile(from_="tiny-q4"), quantize="q4_0")
    assert store.gguf_info(requantized.model_digest).quantization == "Q4_0"
    # ... a 2-bit one may not: nothing would be left to round.
    create_model(store, "tiny-q2", Modelfile(from_=str(source)), base_dir=Path("/"), quantize="q2_K")
    with pytest.raises(BadRequest, match="only F32, F16, BF16, Q8_0 and 4/5/6-bit models"):
        create_model(store, "tiny-q2-requant", Modelfile(from_="tiny-q2"), quantize="q4_0")
