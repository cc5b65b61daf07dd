"""LangChain's Ollama integration (langchain-ollama) against the real server: chat, streaming, embeddings."""

import pytest

langchain_ollama = pytest.importorskip("langchain_ollama")


def test_langchain_chat_and_stream(server):
    chat = langchain_ollama.ChatOllama(
        model="tiny", base_url=server.url, num_predict=4, seed=1, client_kwargs={"headers": server.auth()}
    )
    reply = chat.invoke("Which records are kept longest?")
    assert reply.response_metadata["done"] is True
    assert reply.usage_metadata["output_tokens"] <= 4 and reply.usage_metadata["input_tokens"] > 0
    chunks = list(chat.stream("Hello"))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert len(chunks) >= 2 and merged.response_metadata.get("done") is True
    assert merged.usage_metadata["output_tokens"] <= 4


def test_langchain_json_mode(server):
    chat = langchain_ollama.ChatOllama(
        model="tiny",
        base_url=server.url,
        format="json",
        num_predict=200,
        seed=2,
        client_kwargs={"headers": server.auth()},
    )
    assert chat.invoke("json please").content.lstrip().startswith(("{", "["))


def test_langchain_embeddings(server):
    embeddings = langchain_ollama.OllamaEmbeddings(
        model="all-minilm", base_url=server.url, client_kwargs={"headers": server.auth()}
    )
    vectors = embeddings.embed_documents(["discharge summary", "lease agreement"])
    assert len(vectors) == 2 and len(vectors[0]) == 384
    assert len(embeddings.embed_query("retention")) == 384
