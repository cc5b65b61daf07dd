"""The OpenAI-compatible API through the official `openai` client."""

import base64
import json

import numpy as np
import openai
import pytest


def test_chat_completion(openai_client):
    reply = openai_client.chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=6,
        seed=5,
        temperature=0.5,
    )
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 6 and reply.usage.prompt_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_streaming_with_usage(openai_client):
    stream = openai_client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 5


def test_response_format_json_schema(openai_client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    reply = openai_client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "ok?"}],
        max_tokens=200,
        seed=11,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
    )
    assert isinstance(json.loads(reply.choices[0].message.content)["ok"], bool)


def test_completions(openai_client):
    reply = openai_client.completions.create(model="tiny", prompt="Once upon", max_tokens=4)
    assert reply.object == "text_completion" and reply.usage.completion_tokens <= 4
    streamed = list(openai_client.completions.create(model="tiny", prompt="Once", max_tokens=3, stream=True))
    assert streamed[-1].choices[0].finish_reason in ("stop", "length")


def test_embeddings_float_and_base64(openai_client):
    floats = openai_client.embeddings.create(model="all-minilm", input=["a", "b"])
    assert len(floats.data) == 2 and len(floats.data[0].embedding) == 384
    assert floats.usage.prompt_tokens > 0
    encoded = openai_client.embeddings.with_raw_response.create(model="all-minilm", input="a", encoding_format="base64")
    raw = json.loads(encoded.text)["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(raw), dtype="<f4")
    assert np.allclose(decoded, floats.data[0].embedding, atol=1e-6)
    # The client's default (base64 under the hood, decoded by the client) agrees too.
    assert np.allclose(
        openai_client.embeddings.create(model="all-minilm", input="a").data[0].embedding,
        floats.data[0].embedding,
        atol=1e-6,
    )
    short = openai_client.embeddings.create(model="all-minilm", input="a", dimensions=32)
    assert len(short.data[0].embedding) == 32


def test_models(openai_client):
    ids = {m.id for m in openai_client.models.list()}
    assert {"tiny:latest", "all-minilm:latest"} <= ids
    assert openai_client.models.retrieve("tiny").id == "tiny:latest"
    with pytest.raises(openai.NotFoundError):
        openai_client.models.retrieve("missing-model")


def test_errors_have_the_openai_shape(openai_client, server):
    with pytest.raises(openai.NotFoundError) as error:
        openai_client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
    assert error.value.body["type"] == "invalid_request_error" and "not found" in error.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        openai_client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], n=2)
    bad_key = openai.OpenAI(base_url=f"{server.url}/v1", api_key="apk_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
