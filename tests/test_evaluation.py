"""`appliance eval`: BEIR metrics computed by hand, a tiny BEIR dataset through the real CLI (its own
throw-away index), and clear errors for a malformed dataset."""

import json
import math
from pathlib import Path

import pytest

from appliance.errors import BadRequest
from appliance.evaluation import collapse, load_beir, mrr_at, ndcg_at, question_metrics, recall_at
from tests.conftest import run_cli

DOCUMENTS = {
    "d1": ("Maternity records retention", "Maternity records are kept for twenty-five years after the birth."),
    "d2": ("Adult records retention", "Adult medical records are kept for eight years after the last treatment."),
    "d3": ("Chemotherapy dose checks", "Two registered nurses check every chemotherapy dose before it is given."),
    "d4": ("Conflict checks", "Every new legal matter is checked against the conflicts database."),
    "d5": ("Hand hygiene", "Staff clean their hands with alcohol rub before and after touching a patient."),
    "d6": ("Parking permits", "Staff parking permits are renewed every April at the security office."),
    "d7": ("Fire drills", "Each ward holds a fire evacuation drill twice a year."),
    "d8": ("Billing disputes", "A client may dispute an invoice within thirty days of receiving it."),
    "d9": ("Document destruction", "Paper records are destroyed by cross-cut shredding or incineration."),
    "d10": ("Visiting hours", "Visitors are welcome on the wards between 14:00 and 20:00."),
    "d11": ("Court filing deadlines", "Appeals must be filed with the court within twenty-eight days of judgment."),
    "d12": ("Blood transfusion", "Two staff members verify the patient identity before a blood transfusion."),
}
QUERIES = {
    "q1": "How long are maternity records kept?",
    "q2": "Who checks chemotherapy doses before they are given?",
    "q3": "How are paper records destroyed?",
    "q4": "When can visitors come to the wards?",
    "perfect": "Staff parking permits are renewed every April at the security office.",
}


def write_dataset(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with (root / "corpus.jsonl").open("w") as out:
        for doc_id, (title, text) in DOCUMENTS.items():
            out.write(json.dumps({"_id": doc_id, "title": title, "text": text}) + "\n")
    with (root / "queries.jsonl").open("w") as out:
        for query_id, text in QUERIES.items():
            out.write(json.dumps({"_id": query_id, "text": text}) + "\n")
    (root / "qrels").mkdir(exist_ok=True)
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td2\t1\nq2\td3\t1\nq3\td9\t1\nq4\td10\t1\nq4\td5\t0\n"
    )
    (root / "qrels" / "perfect.tsv").write_text("query-id\tcorpus-id\tscore\nperfect\td6\t1\n")
    return root


# --- metrics by hand -----------------------------------------------------------------------------
def test_ndcg_with_graded_relevance_by_hand():
    ranked = ["a", "b", "c", "d"]
    relevance = {"b": 2, "d": 1, "e": 1, "c": 0}
    dcg = 2 / math.log2(3) + 1 / math.log2(5)
    idcg = 2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at(ranked, relevance, 10) == pytest.approx(dcg / idcg)
    assert ndcg_at(ranked, relevance, 10) == pytest.approx(0.540586, abs=1e-6)
    assert ndcg_at(["b", "e", "d"], relevance, 10) == pytest.approx(1.0)
    assert ndcg_at(["x", "y"], relevance, 10) == 0.0
    assert ndcg_at(["b"], relevance, 1) == pytest.approx(1.0)  # the ideal list is cut at k too


def test_recall_and_mrr_by_hand():
    relevance = {"b": 2, "d": 1, "e": 1, "c": 0}
    ranked = ["a", "b", "c", "d"]
    assert recall_at(ranked, relevance, 10) == pytest.approx(2 / 3)
    assert recall_at(ranked, relevance, 2) == pytest.approx(1 / 3)
    assert recall_at(ranked, relevance, 1) == 0.0
    assert mrr_at(ranked, relevance, 10) == pytest.approx(0.5)
    assert mrr_at(["c", "a"], relevance, 10) == 0.0  # score 0 is not relevant
    assert mrr_at(["a"] * 10 + ["b"], relevance, 10) == 0.0  # beyond the cut-off


def test_chunks_collapse_to_their_documents_best_rank():
    documents = {"x:0": "X", "y:0": "Y", "x:1": "X", "z:3": None, "y:1": "Y", "w:0": "W"}
    assert collapse(list(documents), documents.get) == ["X", "Y", "W"]
    assert question_metrics(["X", "Y", "W"], "W") == {"hit@1": 0.0, "hit@5": 1.0, "mrr@10": pytest.approx(1 / 3)}


# --- the loader ----------------------------------------------------------------------------------
def test_loader_reads_graded_qrels_and_keeps_judged_queries(tmp_path):
    dataset = load_beir(write_dataset(tmp_path / "tiny"), "test")
    assert len(dataset.corpus) == 12
    assert list(dataset.queries) == ["q1", "q2", "q3", "q4"]  # only queries judged in the split
    assert dataset.qrels["q1"] == {"d1": 2, "d2": 1}
    assert dataset.qrels["q4"] == {"d10": 1, "d5": 0}
    assert dataset.corpus["d3"][0] == "Chemotherapy dose checks"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda root: (root / "corpus.jsonl").unlink(), "corpus.jsonl not found"),
        (lambda root: (root / "qrels" / "test.tsv").unlink(), "qrels/test.tsv not found"),
        (lambda root: _append(root / "corpus.jsonl", "{not json\n"), "corpus.jsonl line 13: not JSON"),
        (lambda root: _append(root / "corpus.jsonl", '{"title": "no id"}\n'), "'_id' is missing"),
        (lambda root: _append(root / "queries.jsonl", "[1, 2]\n"), "queries.jsonl line 6: expected a JSON object"),
        (lambda root: _append(root / "qrels" / "test.tsv", "q1\td1\n"), "line 8: expected query-id"),
        (lambda root: _append(root / "qrels" / "test.tsv", "q1\td1\thigh\n"), "score 'high' is not an integer"),
        (lambda root: _append(root / "qrels" / "test.tsv", "q9\td1\t1\n"), "query 'q9' is not in queries.jsonl"),
    ],
)
def test_malformed_dataset_is_a_clear_error(tmp_path, damage, message):
    root = write_dataset(tmp_path / "tiny")
    damage(root)
    with pytest.raises(BadRequest, match=message):
        load_beir(root, "test")


def _append(path: Path, text: str) -> None:
    with path.open("a") as out:
        out.write(text)


# --- through the CLI -----------------------------------------------------------------------------
def test_eval_on_a_tiny_beir_dataset(tmp_path, fresh_home):
    root = write_dataset(tmp_path / "tiny")
    work = tmp_path / "work"
    report = json.loads(run_cli(fresh_home, "eval", "--dataset", str(root), "--workdir", str(work), "--json").stdout)
    assert report["queries"] == 4 and report["documents"] == 12 and report["chunks"] >= 12
    assert report["split"] == "test"
    for method in ("dense", "bm25", "hybrid"):
        metrics = report["metrics"][method]
        assert set(metrics) == {"ndcg@10", "recall@10", "recall@100", "mrr@10"}
        assert all(0.0 <= value <= 1.0 for value in metrics.values())
        assert metrics["recall@100"] == 1.0  # twelve documents: everything is in the top 100
        assert metrics["ndcg@10"] > 0.7, (method, metrics)
    # The user's own index was never touched: the eval used a home of its own.
    assert (work / "appliance.db").is_file()
    assert not (fresh_home / "appliance.db").exists() or "eval" not in run_cli(fresh_home, "documents", "list").stdout

    # A second split reuses the kept index (same chunks, nothing indexed twice).
    again = ("eval", "--dataset", str(root), "--split", "perfect", "--workdir", str(work), "--json")
    perfect = json.loads(run_cli(fresh_home, *again).stdout)
    assert perfect["queries"] == 1 and perfect["chunks"] == report["chunks"]
    for method in ("dense", "bm25", "hybrid"):
        assert perfect["metrics"][method]["ndcg@10"] == pytest.approx(1.0)
        assert perfect["metrics"][method]["mrr@10"] == pytest.approx(1.0)


def test_eval_table_and_limit(tmp_path, fresh_home):
    root = write_dataset(tmp_path / "tiny")
    out = run_cli(fresh_home, "eval", "--dataset", str(root), "--limit", "2").stdout
    lines = out.splitlines()
    assert "2 queries, 12 documents" in lines[0]
    assert lines[1].split() == ["method", "ndcg@10", "recall@10", "recall@100", "mrr@10"]
    assert [line.split()[0] for line in lines[2:5]] == ["dense", "bm25", "hybrid"]


def test_eval_on_a_malformed_dataset_fails_clearly(tmp_path, fresh_home):
    root = write_dataset(tmp_path / "tiny")
    _append(root / "corpus.jsonl", "{broken\n")
    result = run_cli(fresh_home, "eval", "--dataset", str(root), check=False)
    assert result.returncode == 1
    assert "error: corpus.jsonl line 13: not JSON" in result.stderr
    missing = run_cli(fresh_home, "eval", "--dataset", str(tmp_path / "nowhere"), check=False)
    assert missing.returncode == 1 and "not found" in missing.stderr
    split = run_cli(fresh_home, "eval", "--dataset", str(root), "--split", "dev", check=False)
    assert split.returncode == 1 and "qrels/dev.tsv not found" in split.stderr and "perfect, test" in split.stderr
