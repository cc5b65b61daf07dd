"""Real client libraries against a real server that answers from a collection: LlamaIndex (its Ollama LLM and
embeddings, default settings), LangChain (ChatOllama, ChatOpenAI, OllamaEmbeddings, OpenAIEmbeddings), and
Open WebUI's HTTP calls reproduced with httpx (Open WebUI itself cannot be installed here), in the shapes it
sends them on its Ollama and its OpenAI connection.

The tiny model writes random text, so these check structure: statuses, model names, the structured citation
fields where a client keeps them, and the Sources block, which is all that most clients keep of the citations
(the `ollama` package's typed responses drop `citations` and `grounded`, and so do LlamaIndex and ChatOllama):
each source must name the document, the page where it has one, a quote that stands in the document, and the
passage's path in the web app. The test process itself is offline while these clients run: a client that
reached for the network (tiktoken or nltk data, a tokenizer) would fail the test.
"""

from __future__ import annotations

import json
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlmodel import Session, select

from appliance.access.rbac import add_grant
from appliance.access.users import add_user, create_key
from appliance.db import Document, DocumentText, create_db_engine
from tests.conftest import Server, launch_server, run_cli, stop_server

CORPUS = Path(__file__).parent.parent / "sample_corpus"
PDF = "medication-reconciliation-procedure.pdf"
QUESTION = "Within what time must patients taking high-risk medicines have their medication reconciled?"
MODEL = "rag/wards"
SHOWN = "rag/wards:latest"  # the full name, as listed
ANSWERED = {MODEL, SHOWN}  # responses name the model as the request did, or in full
SOURCE = re.compile(r'^\[(?P<n>\d+)\] (?P<label>.+)\n {4}"(?P<quote>.*)"\n {4}(?P<path>/documents/\S+)$', re.M)


@dataclass
class World:
    server: Server
    key: str  # a reader with a grant on the collection
    texts: dict[str, str]  # document id -> stored text
    names: dict[str, str]  # document id -> file name


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_long_gguf):
    home = tmp_path_factory.mktemp("clients")
    documents = [str(CORPUS / "hospital" / PDF), str(CORPUS / "hospital/records-retention-policy.md")]
    run_cli(home, "ingest", *documents, "--collection", "wards")
    run_cli(home, "create", "tiny-long", "--from", str(tiny_long_gguf))
    engine = create_db_engine(f"sqlite:///{home / 'appliance.db'}")
    keys = {}
    for name, role in (("admin", "admin"), ("reader", "reader"), ("nurse", "reader")):
        add_user(engine, name, role)
        keys[name] = create_key(engine, name)
    add_grant(engine, "wards", user="nurse")
    with Session(engine) as db:
        names = {d.id: d.filename for d in db.exec(select(Document))}
        texts = {t.document_id: t.text for t in db.exec(select(DocumentText))}
    engine.dispose()
    server = launch_server(home, keys["admin"], keys["reader"], APPLIANCE_ANSWER_MAX_TOKENS="32")
    yield World(server, keys["nurse"], texts, names)
    stop_server(server)


# --- the test process is offline while the clients run -------------------------------------------------
_OFFLINE = {"on": False, "attempts": []}
_LOCAL = {"127.0.0.1", "::1", "localhost", None, ""}


def _block_network(event: str, args) -> None:
    if not _OFFLINE["on"]:
        return
    if event == "socket.getaddrinfo":
        host = args[0].decode() if isinstance(args[0], bytes) else args[0]
    elif event == "socket.connect" and args[0].family in (socket.AF_INET, socket.AF_INET6):
        host = args[1][0]
    else:
        return
    if host not in _LOCAL:
        _OFFLINE["attempts"].append(f"{event} {host}")
        raise OSError(101, f"network blocked by tests/test_clients.py: {host}")


@pytest.fixture(autouse=True)
def offline():
    if not getattr(sys, "_appliance_clients_guard", False):  # audit hooks cannot be removed: install once
        sys.addaudithook(_block_network)
        sys._appliance_clients_guard = True
    _OFFLINE.update(on=True, attempts=[])
    yield
    _OFFLINE["on"] = False
    assert _OFFLINE["attempts"] == [], f"a client tried to reach the network: {_OFFLINE['attempts']}"


def test_the_guard_blocks_the_network():
    with pytest.raises(OSError):
        socket.getaddrinfo("openaipublic.blob.core.windows.net", 443)
    assert _OFFLINE["attempts"] == ["socket.getaddrinfo openaipublic.blob.core.windows.net"]
    _OFFLINE["attempts"].clear()


# --- helpers ---------------------------------------------------------------------------------------------
def assert_sources(world: World, text: str) -> list[re.Match]:
    """The answer text ends with a Sources block whose every entry a reader can check: the document's name,
    its page (the PDF has pages), a quote that stands in the document, and the passage's path."""
    assert "\n\nSources:\n[1] " in text, text
    entries = list(SOURCE.finditer(text.split("\n\nSources:\n", 1)[1]))
    assert entries and [int(e["n"]) for e in entries] == sorted({int(e["n"]) for e in entries})
    for entry in entries:
        url = urlsplit(entry["path"])
        document_id = url.path.removeprefix("/documents/")
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        name = world.names[document_id]
        assert entry["label"].startswith(name)
        document = world.texts[document_id]
        start, end = int(query["start"]), int(query["end"])
        quote = entry["quote"].removesuffix("...")
        assert " ".join(document[start:end].split()).startswith(quote)  # the quote, where the path says
        assert query["chunk"].startswith(f"{document_id}:") and url.fragment == "passage"
        if name == PDF:
            assert re.match(rf"{re.escape(PDF)}, page \d+", entry["label"]), entry["label"]
    assert any(world.names[urlsplit(e["path"]).path.removeprefix("/documents/")] == PDF for e in entries)
    return entries


def assert_structured(world: World, citations: list[dict], text: str) -> None:
    """The structured citations (where the client keeps them) match the Sources block."""
    entries = assert_sources(world, text)
    assert [c["number"] for c in citations] == [int(e["n"]) for e in entries]
    for citation, entry in zip(citations, entries, strict=True):
        assert citation["verified"] is True and citation["title"] == world.names[citation["document_id"]]
        assert world.texts[citation["document_id"]][citation["start"] : citation["end"]] == citation["quote"]
        assert f"/documents/{citation['document_id']}?" in entry["path"]


# --- LlamaIndex ------------------------------------------------------------------------------------------
def test_llamaindex_ollama_with_default_settings(world):
    """LlamaIndex asks /api/show for the context window before every chat until it learns one."""
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.ollama import Ollama

    llm = Ollama(model=MODEL, base_url=world.server.url, request_timeout=120, headers=world.server.auth(world.key))
    reply = llm.chat([ChatMessage(role="user", content=QUESTION)])
    assert reply.message.role == "assistant" and reply.raw["model"] in ANSWERED
    assert_sources(world, reply.message.content)
    assert_sources(world, llm.complete(QUESTION).text)
    *_, last = llm.stream_chat([ChatMessage(role="user", content=QUESTION)])
    assert_sources(world, last.message.content)
    assert llm.metadata.context_window > 0


def test_llamaindex_ollama_embedding(world):
    from llama_index.embeddings.ollama import OllamaEmbedding

    embedder = OllamaEmbedding(
        model_name="all-minilm", base_url=world.server.url, client_kwargs={"headers": world.server.auth(world.key)}
    )
    vectors = embedder.get_text_embedding_batch(["discharge summary", "lease agreement"])
    assert len(vectors) == 2 and all(len(v) == 384 for v in vectors) and vectors[0] != vectors[1]
    assert len(embedder.get_query_embedding("medication reconciliation")) == 384


# --- LangChain -------------------------------------------------------------------------------------------
def test_langchain_chat_ollama_with_a_collection(world):
    from langchain_ollama import ChatOllama

    chat = ChatOllama(model=MODEL, base_url=world.server.url, client_kwargs={"headers": world.server.auth(world.key)})
    reply = chat.invoke(QUESTION)
    assert reply.response_metadata["model"] in ANSWERED and reply.response_metadata["done"] is True
    assert_sources(world, reply.content)
    chunks = list(chat.stream(QUESTION))
    assert len(chunks) >= 2
    assert_sources(world, "".join(c.content for c in chunks))


def test_langchain_chat_openai_keeps_the_text_and_the_openai_client_the_fields(world):
    import openai
    from langchain_openai import ChatOpenAI

    base_url = f"{world.server.url}/v1"
    chat = ChatOpenAI(model=MODEL, base_url=base_url, api_key=world.key, max_retries=0, timeout=120)
    reply = chat.invoke(QUESTION)
    assert reply.response_metadata["model_name"] in ANSWERED
    assert_sources(world, reply.content)
    chunks = list(chat.stream(QUESTION))
    assert_sources(world, "".join(c.content for c in chunks))
    # The openai package keeps the extra fields of the response (pydantic extras): structured citations.
    client = openai.OpenAI(base_url=base_url, api_key=world.key, max_retries=0)
    completion = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}])
    extra = completion.model_extra
    assert extra["grounded"] is True
    assert_structured(world, extra["citations"], completion.choices[0].message.content)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}], stream=True)
    chunks = list(stream)
    [finished] = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert_structured(world, finished.model_extra["citations"], text)


def test_langchain_embeddings(world, monkeypatch):
    from langchain_ollama import OllamaEmbeddings
    from langchain_openai import OpenAIEmbeddings

    monkeypatch.setenv("OLLAMA_API_KEY", world.key)  # the `ollama` package sends it as the bearer token
    ollama_vectors = OllamaEmbeddings(model="all-minilm", base_url=world.server.url).embed_documents(["rota"])
    # Without check_embedding_ctx_length=False LangChain would count tokens with tiktoken (a download).
    openai_embeddings = OpenAIEmbeddings(
        model="all-minilm",
        base_url=f"{world.server.url}/v1",
        api_key=world.key,
        check_embedding_ctx_length=False,
        max_retries=0,
    )
    openai_vectors = openai_embeddings.embed_documents(["rota", "discharge"])
    assert len(ollama_vectors[0]) == len(openai_vectors[0]) == len(openai_embeddings.embed_query("x")) == 384
    assert ollama_vectors[0] == pytest.approx(openai_vectors[0], abs=1e-5)


# --- Open WebUI's calls ----------------------------------------------------------------------------------
def test_open_webui_ollama_connection(world):
    """What Open WebUI sends on an Ollama connection: version (connection check), tags, ps, show, a streamed
    chat with `options` and `keep_alive`, a non-streamed task call, and /api/embed for document embeddings."""
    with world.server.http(world.key) as http:
        assert http.get("/api/version").status_code == 200
        tags = http.get("/api/tags").json()["models"]
        assert SHOWN in {m["model"] for m in tags} and "all-minilm:latest" in {m["model"] for m in tags}
        assert http.get("/api/ps").status_code == 200
        show = http.post("/api/show", json={"model": SHOWN})
        assert show.status_code == 200, show.text
        chat = {
            "model": SHOWN,
            "messages": [{"role": "user", "content": QUESTION}],
            "stream": True,
            "options": {"temperature": 0.8, "num_ctx": 2048},
            "keep_alive": "5m",
        }
        with http.stream("POST", "/api/chat", json=chat) as response:
            assert response.status_code == 200
            lines = [json.loads(line) for line in response.iter_lines() if line]
        *pieces, final = lines
        assert all(not p["done"] and p["model"] == SHOWN for p in pieces) and final["done"] is True
        text = "".join(line["message"]["content"] for line in lines)
        assert_structured(world, final["message"]["citations"], text)
        assert final["grounded"] is True and final["citations"] == final["message"]["citations"]
        task = http.post("/api/chat", json={**chat, "stream": False})  # title/tags generation: one reply
        assert task.status_code == 200 and task.json()["done"] is True
        embedded = http.post("/api/embed", json={"model": "all-minilm", "input": ["ward rota", "consent"]})
        assert embedded.status_code == 200
        assert [len(v) for v in embedded.json()["embeddings"]] == [384, 384]


def test_open_webui_openai_connection(world):
    """What Open WebUI sends on an OpenAI connection: models, a streamed chat with `stream_options`, embeddings."""
    with world.server.http(world.key) as http:
        models = http.get("/v1/models").json()["data"]
        assert SHOWN in {m["id"] for m in models}
        chat = {
            "model": SHOWN,
            "messages": [{"role": "user", "content": QUESTION}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with http.stream("POST", "/v1/chat/completions", json=chat) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            data = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        chunks = [json.loads(d) for d in data[:-1]]
        assert all(c["model"] == SHOWN for c in chunks)
        usage = chunks[-1]
        assert usage["choices"] == [] and set(usage["usage"]) >= {"prompt_tokens", "completion_tokens"}
        finished = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert len(finished) == 1 and finished[0]["grounded"] is True
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert_structured(world, finished[0]["citations"], text)
        embedded = http.post("/v1/embeddings", json={"model": "all-minilm", "input": ["ward rota"]})
        assert embedded.status_code == 200 and len(embedded.json()["data"][0]["embedding"]) == 384
