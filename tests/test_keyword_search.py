"""The in-memory BM25 index (appliance/retrieval/keyword_search.py): it ranks as SQLite's FTS5 bm25() does,
masks unreadable documents before the top-k, and follows writes made by another process. Runs on the
embedded stores (SQLite + Chroma) and on PostgreSQL + a Chroma server, where it is the only BM25 (the
comparisons with FTS5 on SQLite only)."""

import hashlib
import itertools
import random

import numpy as np
import pytest
from sqlalchemy import text as sql

from appliance.access.rbac import OPERATOR, Access
from appliance.config import EmbeddingSettings, RetrievalSettings, Settings
from appliance.db import FTS_TABLE, Chunk, Document, create_db_engine, session
from appliance.errors import ApplianceError
from appliance.retrieval import keyword_search
from appliance.retrieval.index import ChunkIndex, open_vector_store
from appliance.retrieval.keyword_search import KeywordMirror, term
from appliance.retrieval.retrieve import Retriever, match_expression, query_words

WORDS = (
    "adult maternity records retention retained retaining kept years treatment birth nurse nurses check checked "
    "chemotherapy dose prescription given matter matters conflicts database engagement letter sent staff park "
    "parking car laboratory building flu vaccine offered seasonal october patient patients ward night shift "
    "handover consent form signed café naïve theatre surgeon surgery infection control hand washing gloves"
).split()


pytestmark = pytest.mark.usefixtures("stores")


def open_index(home) -> ChunkIndex:
    """The chunk index of a home (on the stores the `stores` fixture chose); each call opens its own engine
    and Chroma client, as another process would."""
    settings = Settings(home=home)
    return ChunkIndex(create_db_engine(settings.resolved_database_url), open_vector_store(settings))


@pytest.fixture
def index(tmp_path, fresh_stores) -> ChunkIndex:
    return open_index(tmp_path)


@pytest.fixture
def fts_index(index) -> ChunkIndex:
    if index.engine.dialect.name != "sqlite":
        pytest.skip("FTS5 is SQLite's")
    return index


def add(
    index: ChunkIndex, name: str, texts: list[str], acl: tuple[str, ...] = ("user:a",), collection: str = "c"
) -> str:
    """Index a document of the given chunk texts (random vectors: only the keyword side is under test)."""
    document_id = hashlib.sha256(name.encode()).hexdigest()
    document = Document(
        id=document_id, collection=collection, source=name, filename=f"{name}.md", kind="md", size=1, acl=list(acl)
    )
    chunks = [
        Chunk(id=f"{document_id}:{n}", document_id=document_id, position=n, start=0, end=len(t), headings=[], text=t)
        for n, t in enumerate(texts)
    ]
    vectors = np.random.default_rng(len(texts)).standard_normal((len(texts), 8)).astype(np.float32)
    index.add(document, "\n\n".join(texts), chunks, vectors)
    return document_id


def fts5(index: ChunkIndex, query: str) -> dict[str, float]:
    """chunk id -> FTS5's bm25() (lower is better) of every chunk matching any word of the query, best first."""
    statement = sql(
        f"SELECT chunk_id, bm25({FTS_TABLE}) FROM {FTS_TABLE} WHERE {FTS_TABLE} MATCH :m ORDER BY rank"  # noqa: S608
    )
    with session(index.engine) as db:
        return dict(db.exec(statement, params={"m": match_expression(query_words(query))}).all())


def corpus(rng: random.Random, documents: int, chunks: int) -> list[list[str]]:
    weights = [1 / (n + 1) for n in range(len(WORDS))]
    return [
        [" ".join(rng.choices(WORDS, weights=weights, k=rng.randint(4, 60))) for _ in range(chunks)]
        for _ in range(documents)
    ]


def test_ranks_as_fts5_bm25(fts_index):
    index = fts_index
    rng = random.Random(7)
    for n, texts in enumerate(corpus(rng, 12, 20)):
        add(index, f"d{n}", texts)
    add(index, "policy", ["Adult medical records are kept for eight years after the last treatment."])
    mirror = KeywordMirror(index)
    queries = ["records retention", "how long are maternity records kept", "Nurses checking the dose", "flu"]
    queries += [" ".join(rng.sample(WORDS, rng.randint(1, 6))) for _ in range(30)]
    for query in queries:
        expected = fts5(index, query)
        found = mirror.search(query_words(query), None, 20)
        # The same scores, and the same order: chunks with equal scores as FTS5 orders them (as indexed).
        assert [expected[c] for c in found] == pytest.approx(sorted(expected.values())[:20], rel=1e-9, abs=1e-12)
        assert found == list(expected)[:20], query
    # A query that is a text: its words, as `query_words` finds them.
    assert mirror.search("Records, RETENTION!", None, 5) == mirror.search(["records", "retention"], None, 5)


def test_stems_and_folds_as_the_porter_unicode61_tokenizer(fts_index):
    index = fts_index
    kept = add(index, "kept", ["Records are retained for eight years."])
    cafe = add(index, "cafe", ["The CAFÉ on the ground floor opens at seven."])
    other = add(index, "other", ["Retention of records: see the policy.", "Parking behind the laboratory."])
    mirror = KeywordMirror(index)

    def documents(query: str) -> set[str]:
        return {c.split(":")[0] for c in mirror.search(query_words(query), None, 10)}

    assert term("retaining") == term("retained") == term("retains") == "retain"
    assert term("retention") == "retent"  # Porter does not join these two: neither does FTS5
    assert documents("retaining") == {kept} == {c.split(":")[0] for c in fts5(index, "retaining")}
    assert documents("retention") == {other}
    assert documents("cafe") == documents("Café") == {cafe}
    assert term("technology") == "technolog" and term("irreversibly") == "irrevers"  # as FTS5, not snowball
    assert term("as") == "as" and term("is") == "is"  # under 3 bytes: not stemmed
    assert documents("records") == {kept, other}


def test_mask_applies_before_the_top_k(index):
    secrets = [
        add(index, f"secret{n}", [f"Adult records retention secret {n}: adult records are kept for ever."], ("user:x",))
        for n in range(12)
    ]
    readable = add(index, "readable", ["Parking is free.", "Adult records are kept for eight years after treatment."])
    mirror = KeywordMirror(index)
    everything = mirror.search(["adult", "records", "retention"], None, 5)
    assert {c.split(":")[0] for c in everything} <= set(secrets)  # the secrets match better
    found = mirror.search(["adult", "records", "retention"], [readable], 5)
    assert found == [f"{readable}:1"]
    assert mirror.search(["adult", "records"], [readable, "not-a-document"], 5) == [f"{readable}:1"]
    assert mirror.search(["adult", "records"], [], 5) == []  # nothing permitted: nothing found


def test_retriever_uses_the_mirror_with_the_same_answers_as_fts(fts_index):
    index = fts_index
    for n in range(6):  # lengths differ: no two chunks score the same (FTS5 orders ties as it finds them)
        add(index, f"secret{n}", [f"Night shift handover notes, ward {n}." + " More." * (n + 1)], ("user:x",))
    ward = add(
        index,
        "ward",
        ["The night shift handover always happens at 8pm in the evening for all teams.", "Hand washing."],
        ("user:a",),
    )
    memory = Retriever(index, None, RetrievalSettings(keyword_search="memory"))
    fts = Retriever(index, None, RetrievalSettings(keyword_search="fts"))
    reader = Access(
        everything=False,
        collections=frozenset({"c"}),
        principals=frozenset({"user:a"}),
        walled=frozenset(),
        editable=frozenset(),
    )
    # The reader's chunks are scored over the reader's chunks alone, FTS5's over all: the orders agree here
    # because each query matches one of the reader's chunks at most.
    for access in (reader, OPERATOR):
        for query in ("night shift handover", "hand washing", "ward 3", "nothing matches"):
            assert memory.keyword_search(query, access, None, 3) == fts.keyword_search(query, access, None, 3)
    assert {c.split(":")[0] for c in memory.keyword_search("handover", reader, None, 10)} == {ward}


def test_follows_ingest_remove_reindex_and_rebuild_by_another_process(index, tmp_path):
    mirror = KeywordMirror(index)
    cli = open_index(tmp_path)  # another engine and Chroma client on the same home: the CLI beside the server

    def found(word: str) -> set[str]:
        return set(mirror.search([word], None, 10))

    assert found("parking") == set()
    parking = add(cli, "parking", ["Staff park behind the laboratory.", "Permits from estates."])
    assert found("permits") == {f"{parking}:1"} and found("parked") == {f"{parking}:0"}
    flu = add(cli, "flu", ["The flu vaccine is offered in October."])
    assert found("vaccine") == {f"{flu}:0"} and found("permits") == {f"{parking}:1"}

    cli.remove(parking)
    assert found("permits") == set() and found("vaccine") == {f"{flu}:0"}
    assert mirror.current().live_ids() == [f"{flu}:0"]

    # The same id indexed again with other chunks (new chunking settings, say): the old rows must go.
    cli.remove(flu)
    add(cli, "flu", ["The flu vaccine.", "Offered every October.", "To all staff."])
    assert found("october") == {f"{flu}:1"} and found("vaccine") == {f"{flu}:0"}
    assert len(mirror.current().live_ids()) == 3

    vocabulary = mirror.current().vocabulary
    rebuilds = mirror.current().generation[1]
    cli.rebuild(lambda texts: np.ones((len(texts), 8), dtype=np.float32))
    snapshot = mirror.current()
    assert snapshot.generation[1] == rebuilds + 1 and snapshot.vocabulary is not vocabulary  # read again
    assert found("october") == {f"{flu}:1"} and len(snapshot.live_ids()) == 3

    # The postings after all this patching are what a fresh read gives.
    fresh = KeywordMirror(index).current()
    assert fresh.ids == snapshot.live_ids()
    for word in ("flu", "vaccine", "october", "staff", "permits"):
        assert KeywordMirror(index).search([word], None, 10) == mirror.search([word], None, 10)


@pytest.mark.parametrize(
    "shares",
    [(0.0, 0.0), (100.0, 100.0), (0.3, 0.2)],
    ids=["folded-every-time", "never-folded", "folded-now-and-then"],
)
def test_patched_postings_equal_a_fresh_read(index, monkeypatch, shares):
    # Small reads, blocks and placement slices, so that every loop takes several turns.
    monkeypatch.setattr(keyword_search, "READ_DOCUMENTS", 3)
    monkeypatch.setattr(keyword_search, "TOKENISE_CHUNKS", 4)
    monkeypatch.setattr(keyword_search, "PLACE_POSTINGS", 7)
    monkeypatch.setattr(keyword_search, "RECENT_SHARE", shares[0])
    monkeypatch.setattr(keyword_search, "DEAD_SHARE", shares[1])
    mirror = KeywordMirror(index)
    rng = random.Random(3)
    names, seen = [], []
    for n, texts in enumerate(corpus(rng, 12, 6)):
        names.append(add(index, f"d{n}", texts))
        if n % 3 == 2:
            index.remove(names.pop(0))
        if n == 7:  # a document removed and indexed again with other chunks
            index.remove(names[-1])
            add(index, f"d{n}", texts[:2])
        patched = mirror.current()
        seen.append((len(patched.recent.rows) > 0, patched.live < len(patched.ids)))
    patched = mirror.current()
    monkeypatch.undo()
    fresh = KeywordMirror(index).current()
    assert patched.live_ids() == fresh.ids
    folds = sum(before[0] and not after[0] for before, after in itertools.pairwise(seen))  # recent rows folded in
    if shares[0] == 0:
        assert set(seen) == {(False, False)}  # every patch folded in at once
    elif shares[0] == 100:
        assert folds == 0 and seen[-1] == (True, True) and len(patched.main.rows) < len(fresh.main.rows)
    else:
        assert folds >= 2 and (True, True) in seen

    def postings(snapshot) -> set[tuple[str, str, int]]:
        words = {t: w for w, t in snapshot.vocabulary.terms.items()}
        return {
            (words[t], snapshot.ids[row], int(count))
            for t in range(len(snapshot.vocabulary.terms))
            for row, count in zip(*snapshot.postings(t), strict=True)
        }

    assert postings(patched) == postings(fresh)
    live = patched.alive
    assert dict(zip(patched.live_ids(), patched.lengths[live], strict=True)) == dict(
        zip(fresh.ids, fresh.lengths, strict=True)
    )
    assert patched.average_length == pytest.approx(fresh.average_length, rel=1e-12)
    for word in ("adult", "records", "nurse", "parking", "flu", "consent"):  # the same scores, the same order
        assert mirror.search([word, "staff"], None, 20) == KeywordMirror(index).search([word, "staff"], None, 20)


def test_common_words_are_left_out_while_a_rarer_one_remains(index):
    staff = add(index, "staff", [f"Staff notice {n}." for n in range(30)])
    parking = add(index, "parking", ["Staff parking behind the laboratory."])
    mirror = KeywordMirror(index)
    # 'staff' is in every chunk (31 > max(0.2 * 31, 10 * 1)): left out, 'parking' alone is searched.
    assert mirror.search(["staff", "parking"], None, 1, max_df=0.2) == [f"{parking}:0"]
    assert len(mirror.search(["staff", "parking"], None, 50, max_df=0.2)) == 31  # 10 x 50 chunks: kept
    assert len(mirror.search(["staff", "parking"], None, 50)) == 31
    assert len(mirror.search(["staff"], None, 5, max_df=0.2)) == 5  # the only word stays
    assert mirror.search(["staff", "unknown"], None, 5, max_df=0.2)[0].startswith(staff)


def test_empty_queries_and_an_empty_index(index):
    mirror = KeywordMirror(index)
    assert mirror.search(["records"], None, 5) == []  # nothing indexed yet
    add(index, "d", ["Adult records are kept for eight years."])
    assert mirror.search("", None, 5) == []
    assert mirror.search("?! -- ...", None, 5) == []
    assert mirror.search([], None, 5) == []
    assert mirror.search(["unknown", "words"], None, 5) == []
    assert mirror.search(["records"], None, 0) == []
    assert len(mirror.search(["records"], None, 5)) == 1


def test_fts_is_refused_at_start_on_a_database_without_fts5(index):
    if index.engine.dialect.name == "sqlite":
        assert (
            Retriever(index, None, RetrievalSettings(keyword_search="fts")).keyword_search("x", OPERATOR, None, 5) == []
        )
        return
    with pytest.raises(ApplianceError, match="APPLIANCE_KEYWORD_SEARCH=fts needs SQLite"):
        Retriever(index, None, RetrievalSettings(keyword_search="fts"))
    assert Retriever(index, None, RetrievalSettings()).keyword_search("x", OPERATOR, None, 5) == []  # memory works


READABLE = [  # user:a's chunks: 'chemotherapy' in one, 'consent' in three (two short, one long)
    "Chemotherapy dose checked.",
    "Consent form signed by the patient before surgery.",
    "Consent given.",
    "Consent consent consent: the consent form is kept with the notes of the patient, the ward, the nurse, the "
    "surgeon, the theatre list and the anaesthetist's record, in the order the ward keeps them.",
    "Parking behind the laboratory.",
    "Flu vaccine offered in October.",
    "Night shift handover at 8pm.",
    "Hand washing before gloves.",
    "Theatre list for Monday.",
    "Infection control audit.",
    "Maternity records are kept for twenty-five years.",
    "Staff car park permits.",
]
FILLER = "canteen menu rota notice "
WALLED = {  # what the documents user:a may not read hold
    "short-unrelated": ["Canteen menu for the week."] * 20,
    "the-word": ["Chemotherapy trial notes: chemotherapy chemotherapy."] * 20,
    "long-unrelated": [FILLER * 100] * 5,
    "long-with-the-word": [FILLER * 100 + "chemotherapy consent"] * 5,
}
READER = Access(  # user:a, reads collections c and d, walled off collection w
    everything=False,
    collections=frozenset({"c", "d"}),
    principals=frozenset({"user:a"}),
    walled=frozenset({"w"}),
    editable=frozenset(),
)


@pytest.mark.parametrize("walled", list(WALLED))
def test_walled_documents_leave_no_trace_in_a_callers_ranking(index, walled):
    """Issue 18, finding 5: a caller's BM25 ranking (the order, hence `keyword_rank`, the fused score and which
    words are left out as near-universal) is the same whatever the documents they may not read hold, whether
    an ACL or a wall keeps them out: term statistics and the average length count the caller's chunks only."""
    readable = [add(index, f"readable{n}", [text], collection="cd"[n % 2]) for n, text in enumerate(READABLE)]
    mirror = KeywordMirror(index)
    retriever = Retriever(index, None, RetrievalSettings())  # keyword_max_df 0.2: common words left out
    queries = ["chemotherapy consent", "consent", "chemotherapy", "consent form", "chemotherapy consent patient"]

    def ranking() -> list[list[str]]:
        found = []
        for query, limit in itertools.product(queries, (1, 3, 20)):
            found.append(mirror.search(query_words(query), readable, limit))
            found.append(mirror.search(query_words(query), readable, limit, max_df=0.2))
            for scope in (None, ["c"], ["d"], ["c", "d"]):
                found.append(retriever.keyword_search(query, READER, scope, limit))
        return found

    alone = ranking()  # nothing else indexed: user:a's chunks are the whole corpus
    assert alone[0] == [f"{readable[0]}:0"]  # 'chemotherapy' is the rarer word among user:a's chunks
    for n, text in enumerate(WALLED[walled]):
        add(index, f"acl{n}", [text], ("user:x",), collection="cd"[n % 2])  # in user:a's collections, not theirs
        add(index, f"wall{n}", [text], ("user:a",), collection="w")  # theirs, behind a wall
    assert ranking() == alone


def test_a_search_of_some_documents_ranks_them_as_a_search_of_all(index):
    """With the statistics counted over all the caller may read, searching a part of it (some collections)
    gives that part's chunks in the order the search of all gives them."""
    rng = random.Random(5)
    documents = [add(index, f"d{n}", texts) for n, texts in enumerate(corpus(rng, 8, 5))]
    part = documents[::3]
    mirror = KeywordMirror(index)
    for query in [" ".join(rng.sample(WORDS, rng.randint(1, 5))) for _ in range(20)]:
        everything = mirror.search(query_words(query), documents, 100)
        expected = [c for c in everything if c.split(":")[0] in part][:5]
        assert mirror.search(query_words(query), part, 5, counted=documents) == expected, query


def test_a_misspelt_question_word_is_searched_as_the_word_the_readers_passages_hold(index):
    """'expences' is in no dictionary and no passage: it is searched as 'expenses', one letter away. The correction
    is chosen among the words of passages the caller may read: a word only an unreadable document holds is never
    found through a typo (nor is the typo corrected towards it), and a dictionary word is never 'corrected'."""
    from appliance.retrieval.embeddings import SentenceEmbedder

    claims = add(index, "claims", ["Expenses claims are paid with the monthly salary."], ("user:a",))
    secret = add(index, "secret", ["The receipt for the settlement is in the safe."], ("user:x",))
    reader = READER
    settings = EmbeddingSettings()  # the bundled MiniLM (not loaded: only its vocabulary is read here)
    typos = Retriever(index, SentenceEmbedder(settings), RetrievalSettings())
    exact = Retriever(index, SentenceEmbedder(settings), RetrievalSettings(keyword_typos=False))

    def documents(retriever, query, access):
        return {c.split(":")[0] for c in retriever.keyword_search(query, access, None, 10)}

    assert documents(typos, "when are expences paid", reader) == {claims}
    assert documents(exact, "expences", reader) == set()
    assert documents(typos, "reciept", OPERATOR) == {secret}
    assert documents(typos, "reciept", reader) == set()  # 'receipt' is only in what they may not read
    assert typos.misspelt("expences") and not typos.misspelt("matches") and not typos.misspelt("mattresses")
    assert documents(typos, "salory", reader) == {claims}
    assert documents(typos, "paud", reader) == set()  # a stem under five letters is one edit from too many words
