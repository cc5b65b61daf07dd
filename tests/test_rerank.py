"""The optional cross-encoder re-ranker, loaded from a local directory (a tiny one written here from
the bundled tokenizer and a random classification head; nothing is downloaded)."""

import shutil

import pytest

from appliance.access.rbac import OPERATOR
from appliance.config import RetrievalSettings
from appliance.errors import BadRequest
from appliance.retrieval.embeddings import bundled_model_path
from appliance.retrieval.retrieve import Retriever
from tests.conftest import local_ingestor


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification

    directory = tmp_path_factory.mktemp("cross-encoder")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(bundled_model_path() / name, directory / name)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=1,
    )
    BertForSequenceClassification(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    home = tmp_path_factory.mktemp("rerank-home")
    ingestor = local_ingestor(home)
    for n, text in enumerate(
        [
            "Maternity records are kept for 25 years.",
            "Visitors may park for free.",
            "Adult records are kept for ten years.",
        ]
    ):
        path = home / f"doc{n}.md"
        path.write_text(f"# Policy {n}\n\n{text}\n")
        assert ingestor.ingest(path, "hospital", ["collection:hospital"]).status == "added"
    ingestor.parser.stop()
    return ingestor.index, ingestor.embedder


def test_reranker_scores_replace_fusion_scores(index, cross_encoder_dir):
    from sentence_transformers import CrossEncoder

    chunk_index, embedder = index
    plain = Retriever(chunk_index, embedder, RetrievalSettings())
    reranked = Retriever(chunk_index, embedder, RetrievalSettings(reranker_model_path=str(cross_encoder_dir)))
    question = "How long are maternity records kept?"
    before = plain.search(question, OPERATOR, top_k=3)
    after = reranked.search(question, OPERATOR, top_k=3)
    assert {h.chunk_id for h in before} == {h.chunk_id for h in after}
    expected = CrossEncoder(str(cross_encoder_dir), device="cpu").predict([(question, h.text) for h in after])
    assert [h.score for h in after] == pytest.approx(sorted(map(float, expected), reverse=True), rel=1e-4)


def test_a_missing_reranker_model_is_a_clear_error(index, tmp_path):
    chunk_index, embedder = index
    retriever = Retriever(chunk_index, embedder, RetrievalSettings(reranker_model_path=str(tmp_path)))
    with pytest.raises(BadRequest, match="APPLIANCE_RERANKER_MODEL_PATH"):
        retriever.search("maternity records", OPERATOR)
