"""The embedding backend is a setting: torch, or the bundled MiniLM exported to ONNX (fp32 or int8). The export
is checked against its recorded sha256 before it is loaded, and the chunk index refuses vectors of another kind
than those it holds."""

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from pydantic import ValidationError

from appliance.config import EmbeddingSettings, Settings, load_settings
from appliance.db import create_db_engine
from appliance.errors import BadRequest, Conflict
from appliance.retrieval.embeddings import SentenceEmbedder
from appliance.retrieval.index import ChunkIndex, open_vector_store
from appliance.retrieval.onnx_embedder import EmbedderUnavailable, OnnxModel, export_path
from tests.conftest import APPLIANCE, cli_env
from tests.test_index import _document

TEXTS = [
    "Adult records are kept for ten years after the last entry.",
    "The patient was given two doses of amoxicillin after the ward round and reviewed at noon. " * 12,
    "Counsel for the defendant moved to dismiss.",
    "",
    "What is the retention period for the records of minors?",
]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A home whose ONNX exports (fp32 and int8) are made once for this module."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def torch_embedder():
    return SentenceEmbedder(EmbeddingSettings(embedding_backend="torch"))


@pytest.fixture(scope="module")
def onnx_embedder(home):
    return SentenceEmbedder(EmbeddingSettings(embedding_backend="onnx", embedding_export_dir=""), home=home)


@pytest.fixture(scope="module")
def int8_embedder(home):
    return SentenceEmbedder(EmbeddingSettings(embedding_backend="onnx-int8", embedding_export_dir=""), home=home)


def _cosines(a, b) -> np.ndarray:
    return (a.vectors * b.vectors).sum(axis=1)


def test_onnx_fp32_gives_torchs_vectors_and_token_counts(torch_embedder, onnx_embedder, home):
    expected, got = torch_embedder.encode(TEXTS), onnx_embedder.encode(TEXTS)
    assert got.vectors.shape == expected.vectors.shape == (len(TEXTS), 384)
    assert _cosines(got, expected).min() > 0.9999
    assert np.allclose(np.linalg.norm(got.vectors, axis=1), 1, atol=1e-5)
    assert got.prompt_tokens == expected.prompt_tokens
    assert onnx_embedder.max_tokens == torch_embedder.max_tokens == 256
    # One text alone takes the single-thread session, and gives the same vector as in a batch.
    alone = onnx_embedder.encode(TEXTS[:1])
    assert float(alone.vectors[0] @ got.vectors[0]) > 0.99999
    assert onnx_embedder.encode(TEXTS, dimensions=128).vectors.shape == (len(TEXTS), 128)
    with pytest.raises(BadRequest, match="context length"):
        onnx_embedder.encode([TEXTS[1] * 3], truncate=False)
    record = json.loads(export_path(home / "embeddings", "onnx").with_suffix(".json").read_text())
    assert record["sha256"] == hashlib.sha256(export_path(home / "embeddings", "onnx").read_bytes()).hexdigest()


def test_onnx_int8_vectors_stay_close_to_torchs(torch_embedder, int8_embedder):
    cosines = _cosines(int8_embedder.encode(TEXTS), torch_embedder.encode(TEXTS))
    assert cosines.min() > 0.98 and cosines.mean() > 0.99, cosines
    assert int8_embedder.encode(TEXTS).prompt_tokens == torch_embedder.encode(TEXTS).prompt_tokens


def test_the_backend_is_a_setting(monkeypatch):
    monkeypatch.delenv("APPLIANCE_EMBEDDING_BACKEND", raising=False)
    assert Settings().embeddings.embedding_backend == "auto"
    monkeypatch.setenv("APPLIANCE_EMBEDDING_BACKEND", "onnx-int8")
    assert load_settings().embeddings.embedding_backend == "onnx-int8"
    with pytest.raises(ValidationError, match="embedding_backend"):
        EmbeddingSettings(embedding_backend="openvino")


def test_an_altered_or_missing_export_is_exported_again(onnx_embedder, home, tmp_path):
    directory = tmp_path / "embeddings"
    shutil.copytree(home / "embeddings", directory)
    path = export_path(directory, "onnx")
    good = hashlib.sha256(path.read_bytes()).hexdigest()
    with path.open("r+b") as file:  # altered: a few bytes inside the weights
        file.seek(len(path.read_bytes()) // 2)
        file.write(b"\xff" * 16)
    assert hashlib.sha256(path.read_bytes()).hexdigest() != good
    model = OnnxModel(onnx_embedder.path, directory, "onnx", threads=1)
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() == model.sha256
    vectors, _tokens = model.embed(TEXTS[:1])
    assert float(vectors[0] @ onnx_embedder.encode(TEXTS[:1]).vectors[0]) > 0.9999

    path.unlink()  # missing
    OnnxModel(onnx_embedder.path, directory, "onnx", threads=1)
    assert json.loads(path.with_suffix(".json").read_text())["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_model_the_export_does_not_suit_and_a_missing_runtime_are_refused(onnx_embedder, tmp_path, monkeypatch):
    model = tmp_path / "cls-model"
    shutil.copytree(onnx_embedder.path, model)
    pooling = json.loads((model / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    (model / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    with pytest.raises(EmbedderUnavailable, match="APPLIANCE_EMBEDDING_BACKEND=torch"):
        OnnxModel(model, tmp_path / "embeddings", "onnx", threads=1)
    assert not (tmp_path / "embeddings").exists()

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the package were not installed
    embedder = SentenceEmbedder(EmbeddingSettings(embedding_backend="onnx", embedding_export_dir=""), home=tmp_path)
    with pytest.raises(EmbedderUnavailable, match="APPLIANCE_EMBEDDING_BACKEND.*not installed"):
        embedder.encode(["x"])
    # 'auto' falls back to torch where ONNX Runtime is missing, as it does for a model the export does not suit.
    assert SentenceEmbedder(EmbeddingSettings()).backend == "torch"
    monkeypatch.delitem(sys.modules, "onnxruntime")
    assert SentenceEmbedder(EmbeddingSettings(embedding_model_path=str(model))).backend == "torch"
    assert SentenceEmbedder(EmbeddingSettings()).backend == "onnx-int8"


def _index(home) -> ChunkIndex:
    settings = Settings(home=home)
    settings.ensure_dirs()
    return ChunkIndex(create_db_engine(settings.resolved_database_url), open_vector_store(settings))


def test_an_index_refuses_vectors_of_another_kind_until_rebuilt(
    tmp_path, torch_embedder, onnx_embedder, int8_embedder, monkeypatch
):
    index = _index(tmp_path)
    index.require_embedder(torch_embedder.fingerprint)
    document, text, chunks, _random = _document("a" * 64)
    index.add(document, text, chunks, torch_embedder.encode([c.text for c in chunks]).vectors)
    assert index.check().embedder["backend"] == "torch"

    index.require_embedder(onnx_embedder.fingerprint)  # same vectors: accepted, the record stays
    assert index.embedder_record()["backend"] == "torch"
    with pytest.raises(Conflict, match=r"APPLIANCE_EMBEDDING_BACKEND=onnx-int8.*appliance index rebuild"):
        _index(tmp_path).require_embedder(int8_embedder.fingerprint)

    # Re-embedding with int8 records it; a writer still holding torch's fingerprint is then refused.
    other = _index(tmp_path)
    assert other.rebuild(lambda texts: int8_embedder.encode(texts).vectors, embedder=int8_embedder.fingerprint)
    assert other.check().embedder["vectors"] == "int8" and other.check().clean
    second, text, chunks, _random = _document("b" * 64)
    with pytest.raises(Conflict, match="int8"):
        index.add(second, text, chunks, torch_embedder.encode([c.text for c in chunks]).vectors)

    # Reloading Chroma from the database keeps the record; `appliance index check` shows it.
    other.reload_vectors()
    assert _index(tmp_path).embedder_record()["backend"] == "onnx-int8"
    shown = subprocess.run(
        [APPLIANCE, "index", "check"], env=cli_env(tmp_path), capture_output=True, text=True, timeout=120
    )
    assert "vectors built by: onnx-int8 (int8 vectors" in shown.stdout, shown.stdout + shown.stderr


def test_an_index_built_before_embedders_were_recorded_counts_as_torchs(tmp_path, torch_embedder, int8_embedder):
    index = _index(tmp_path)
    document, text, chunks, _random = _document("c" * 64)
    index.add(document, text, chunks, torch_embedder.encode([c.text for c in chunks]).vectors)
    assert index.embedder_record() is None
    with pytest.raises(Conflict, match="built by the torch"):
        index.require_embedder(int8_embedder.fingerprint)
    assert index.embedder_record()["backend"] == "torch"


def _settings(home, **embeddings) -> Settings:
    settings = Settings(home=home)
    settings.embeddings = EmbeddingSettings(**embeddings)
    return settings


def test_auto_takes_the_fastest_backend_whose_vectors_match_the_index(tmp_path, torch_embedder, int8_embedder):
    from appliance.retrieval.embeddings import open_embedder

    # A new index: int8 weights, recorded as soon as it is opened.
    fresh = _index(tmp_path / "new")
    assert open_embedder(_settings(tmp_path / "new"), fresh).backend == "onnx-int8"
    assert fresh.embedder_record()["vectors"] == "int8"

    # An index of torch's vectors (recorded, or from before embedders were recorded): ONNX fp32, the same vectors.
    for name, record in (("recorded", True), ("unrecorded", False)):
        index = _index(tmp_path / name)
        if record:
            index.require_embedder(torch_embedder.fingerprint)
        document, text, chunks, _random = _document("d" * 64)
        index.add(document, text, chunks, torch_embedder.encode([c.text for c in chunks]).vectors)
        embedder = open_embedder(_settings(tmp_path / name), index)
        assert embedder.backend == "onnx", name
        assert index.embedder_record()["backend"] == "torch"  # the record names what built the vectors
        # A backend named outright is refused when its vectors differ, with what to do.
        with pytest.raises(Conflict, match="appliance index rebuild"):
            open_embedder(_settings(tmp_path / name, embedding_backend="onnx-int8"), index)


def test_an_index_recorded_in_chroma_by_an_earlier_version_moves_its_record_to_the_database(tmp_path, int8_embedder):
    index = _index(tmp_path)
    document, text, chunks, _random = _document("e" * 64)
    index.add(document, text, chunks, int8_embedder.encode([c.text for c in chunks]).vectors)
    index.vectors.modify(metadata={"embedder": json.dumps(int8_embedder.fingerprint)})  # where 0.x kept it
    assert index.embedder_record()["vectors"] == "int8"
    index.client.delete_collection("chunks")  # Chroma emptied (a restore reloads it from the database)
    index.vectors = index.client.get_or_create_collection("chunks", metadata={"hnsw:space": "cosine"})
    again = _index(tmp_path)
    assert again.embedder_record()["vectors"] == "int8"
    again.reload_vectors()
    assert _index(tmp_path).embedder_record()["backend"] == "onnx-int8"


def test_index_rebuild_moves_a_torch_index_to_the_default_backend_with_progress(tmp_path, torch_embedder):
    index = _index(tmp_path)
    index.require_embedder(torch_embedder.fingerprint)
    document, text, chunks, _random = _document("f" * 64)
    index.add(document, text, chunks, torch_embedder.encode([c.text for c in chunks]).vectors)
    seen = []
    index.rebuild(
        lambda texts: torch_embedder.encode(texts).vectors, batch=2, progress=lambda d, t: seen.append((d, t))
    )
    assert seen and seen[-1] == (len(chunks), len(chunks)) and [d for d, _ in seen] == sorted(d for d, _ in seen)

    named = subprocess.run(
        [APPLIANCE, "index", "rebuild"],
        env=cli_env(tmp_path, APPLIANCE_EMBEDDING_BACKEND="torch"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "embedded by torch" in named.stdout, named.stdout + named.stderr
    moved = subprocess.run(
        [APPLIANCE, "index", "rebuild"], env=cli_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert "embedded by onnx-int8" in moved.stdout and "vectors built by: onnx-int8 (int8 vectors" in moved.stdout
    refused = subprocess.run(
        [APPLIANCE, "search", "retention"],
        env=cli_env(tmp_path, APPLIANCE_EMBEDDING_BACKEND="torch"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode != 0 and "APPLIANCE_EMBEDDING_BACKEND=onnx-int8 again" in refused.stderr, refused.stderr


def test_a_server_asked_for_a_backend_the_index_does_not_match_refuses_to_start(tmp_path, int8_embedder):
    from tests.conftest import free_port

    index = _index(tmp_path)
    index.require_embedder(int8_embedder.fingerprint)
    document, text, chunks, _random = _document("9" * 64)
    index.add(document, text, chunks, int8_embedder.encode([c.text for c in chunks]).vectors)
    started = subprocess.run(
        [APPLIANCE, "serve", "--port", str(free_port())],
        env=cli_env(tmp_path, APPLIANCE_EMBEDDING_BACKEND="torch"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert started.returncode != 0
    assert "cannot start: the index was built by the onnx-int8" in started.stderr, started.stderr[-2000:]
    assert "APPLIANCE_EMBEDDING_BACKEND=onnx-int8 again" in started.stderr
