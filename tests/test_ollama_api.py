"""The Ollama API through the official `ollama` client against a real server and real llama.cpp."""

import hashlib
import json

import httpx
import ollama
import pytest


def test_root_and_version(server):
    assert httpx.get(server.url + "/").status_code == 200
    assert httpx.head(server.url + "/").status_code == 200
    version = httpx.get(server.url + "/api/version").json()["version"]
    assert all(part.isdigit() for part in version.split("."))


def test_tags_list_models_and_the_bundled_embedder(ollama_client):
    names = {m.model for m in ollama_client.list().models}
    assert {"tiny:latest", "tiny-long:latest", "all-minilm:latest"} <= names
    tiny = next(m for m in ollama_client.list().models if m.model == "tiny:latest")
    assert tiny.details.family == "llama" and tiny.details.format == "gguf"
    assert len(tiny.digest) == 64 and tiny.size > 0


def test_chat_streams_tokens_with_timings(ollama_client):
    chunks = list(
        ollama_client.chat(
            model="tiny",
            messages=[{"role": "user", "content": "Hello"}],
            stream=True,
            options={"num_predict": 8, "seed": 42, "unknown_option": 1},
        )
    )
    assert chunks[-1].done and not any(c.done for c in chunks[:-1])
    final = chunks[-1]
    assert final.done_reason in ("length", "stop")
    assert final.eval_count == (8 if final.done_reason == "length" else final.eval_count)
    assert final.prompt_eval_count > 5
    assert final.total_duration >= final.eval_duration > 0  # nanoseconds
    assert all(c.message.role == "assistant" for c in chunks)


def test_chat_non_streaming_is_deterministic_with_a_seed(ollama_client):
    def ask():
        return ollama_client.chat(
            model="tiny",
            messages=[{"role": "user", "content": "Hi"}],
            stream=False,
            options={"num_predict": 12, "seed": 7, "temperature": 0.7},
        )

    first, second = ask(), ask()
    assert first.done and first.message.content == second.message.content
    greedy = [
        ollama_client.generate(model="tiny", prompt="abc", options={"num_predict": 6, "temperature": 0}).response
        for _ in range(2)
    ]
    assert greedy[0] == greedy[1]


def test_generate_with_system_and_raw(ollama_client):
    result = ollama_client.generate(model="tiny", prompt="Say hi", system="Be brief", options={"num_predict": 4})
    assert result.done and result.eval_count <= 4
    raw = ollama_client.generate(model="tiny", prompt="plain", raw=True, options={"num_predict": 3})
    assert raw.prompt_eval_count < result.prompt_eval_count  # no chat template around the raw prompt


def test_stop_sequences_end_generation(ollama_client):
    text = ollama_client.generate(
        model="tiny", prompt="x", raw=True, options={"num_predict": 40, "temperature": 0, "seed": 1}
    ).response
    assert len(text) > 4
    stop = text[2:4]
    stopped = ollama_client.generate(
        model="tiny", prompt="x", raw=True, options={"num_predict": 40, "temperature": 0, "seed": 1, "stop": [stop]}
    )
    assert stopped.done_reason == "stop"
    assert stop not in stopped.response and text.startswith(stopped.response)


def test_format_json_schema_constrains_output(ollama_client):
    schema = {"type": "object", "properties": {"urgent": {"type": "boolean"}}, "required": ["urgent"]}
    reply = ollama_client.chat(
        model="tiny",
        messages=[{"role": "user", "content": "Urgent?"}],
        format=schema,
        options={"num_predict": 200, "seed": 3},
    )
    assert isinstance(json.loads(reply.message.content)["urgent"], bool)
    generic = ollama_client.generate(
        model="tiny", prompt="json please", format="json", options={"num_predict": 200, "seed": 4}
    )
    assert generic.response.lstrip().startswith(("{", "["))


def test_tools_are_passed_through_the_template(ollama_client):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "lookup_patient",
                "description": "Find a patient",
                "parameters": {"type": "object", "properties": {}},
            },
        }
    ]
    with_tools = ollama_client.chat(
        model="tiny", messages=[{"role": "user", "content": "hi"}], tools=tools, options={"num_predict": 1}
    )
    without = ollama_client.chat(model="tiny", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 1})
    assert with_tools.prompt_eval_count > without.prompt_eval_count + 10


def test_embed_batches_normalises_and_shortens(ollama_client):
    result = ollama_client.embed(model="all-minilm", input=["adult records are kept 10 years", "hello"])
    assert len(result.embeddings) == 2 and len(result.embeddings[0]) == 384
    for vector in result.embeddings:
        assert abs(sum(v * v for v in vector) - 1.0) < 1e-4
    assert result.prompt_eval_count > 4
    short = ollama_client.embed(model="all-minilm", input="hello", dimensions=64)
    assert len(short.embeddings[0]) == 64 and abs(sum(v * v for v in short.embeddings[0]) - 1) < 1e-4
    legacy = ollama_client.embeddings(model="all-minilm", prompt="hello")
    assert len(legacy.embedding) == 384


def test_embed_truncate_false_rejects_long_input(ollama_client):
    long_text = "word " * 2000
    assert len(ollama_client.embed(model="all-minilm", input=long_text).embeddings[0]) == 384
    with pytest.raises(ollama.ResponseError) as error:
        ollama_client.embed(model="all-minilm", input=long_text, truncate=False)
    assert error.value.status_code == 400 and "context length" in error.value.error


def test_embed_with_a_gguf_model(ollama_client):
    result = ollama_client.embed(model="tiny", input=["one", "two"])
    assert len(result.embeddings) == 2 and len(result.embeddings[0]) == 64


def test_show_always_has_model_info(ollama_client):
    shown = ollama_client.show("tiny")
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.context_length"] == 512
    assert shown.modelinfo["general.parameter_count"] > 0
    assert "completion" in shown.capabilities and "tools" in shown.capabilities
    assert "<|im_start|>" in shown.template and shown.modelfile.startswith("#")
    embedder = ollama_client.show("all-minilm")
    assert embedder.capabilities == ["embedding"] and embedder.modelinfo["bert.embedding_length"] == 384


def test_ps_and_keep_alive(ollama_client):
    ollama_client.generate(model="tiny", prompt="hi", options={"num_predict": 1}, keep_alive=-1)
    chat_runners = [
        m
        for m in ollama_client.ps().models
        if m.model == "tiny:latest" and m.size_vram == 0 and m.expires_at.year > 2100
    ]
    assert len(chat_runners) == 1, ollama_client.ps()
    assert chat_runners[0].context_length == 512
    # An empty prompt with keep_alive 0 unloads the model.
    done = ollama_client.generate(model="tiny", prompt="", keep_alive=0)
    assert done.done_reason == "unload"
    assert "tiny:latest" not in {m.model for m in ollama_client.ps().models}
    loaded = ollama_client.generate(model="tiny", prompt="", keep_alive="10m")
    assert loaded.done_reason == "load"
    assert "tiny:latest" in {m.model for m in ollama_client.ps().models}


def test_copy_create_from_blob_and_delete(ollama_client, tiny_gguf):
    ollama_client.copy("tiny", "tiny-copy")
    assert "tiny-copy:latest" in {m.model for m in ollama_client.list().models}
    ollama_client.delete("tiny-copy")
    assert "tiny-copy:latest" not in {m.model for m in ollama_client.list().models}
    with pytest.raises(ollama.ResponseError) as error:
        ollama_client.delete("tiny-copy")
    assert error.value.status_code == 404

    digest = ollama_client.create_blob(tiny_gguf)  # HEAD then POST /api/blobs/sha256:...
    assert digest == "sha256:" + hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    statuses = [
        p.status
        for p in ollama_client.create(
            model="uploaded",
            files={"tiny.gguf": digest},
            system="You answer in one word.",
            parameters={"temperature": 0.1},
            stream=True,
        )
    ]
    assert statuses[-1] == "success"
    shown = ollama_client.show("uploaded")
    assert "temperature" in shown.parameters and "one word" in shown.modelfile
    reply = ollama_client.chat(
        model="uploaded", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 2}
    )
    assert reply.done
    derived = ollama_client.create(
        model="uploaded-derived", from_="uploaded", template=("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    )
    assert derived.status == "success"
    ollama_client.delete("uploaded-derived")
    ollama_client.delete("uploaded")


def test_ollama_api_key_from_environment(server, monkeypatch):
    monkeypatch.setenv("OLLAMA_API_KEY", server.reader_key)
    client = ollama.Client(host=server.url)
    assert any(m.model == "tiny:latest" for m in client.list().models)


def test_modelfile_go_template_renders_like_the_gguf_template(ollama_client):
    go_chatml = (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    )
    assert ollama_client.create(model="tiny-go", from_="tiny", template=go_chatml).status == "success"
    messages = [{"role": "user", "content": "How long are records kept?"}]
    with_go = ollama_client.chat(model="tiny-go", messages=messages, options={"num_predict": 4, "temperature": 0})
    with_jinja = ollama_client.chat(model="tiny", messages=messages, options={"num_predict": 4, "temperature": 0})
    assert with_go.prompt_eval_count == with_jinja.prompt_eval_count
    assert with_go.message.content == with_jinja.message.content
    assert ollama_client.show("tiny-go").template == go_chatml
    ollama_client.delete("tiny-go")
