"""Bad input gets a clear 4xx, nothing is written outside APPLIANCE_HOME, and the server keeps serving."""

import hashlib
import os

import httpx
import ollama
import pytest


@pytest.fixture
def api(server):
    with server.http() as client:
        yield client
    server.assert_alive()


@pytest.mark.parametrize(
    "path",
    ["/api/chat", "/api/generate", "/api/embed", "/api/show", "/api/create", "/v1/chat/completions", "/v1/embeddings"],
)
def test_malformed_json(api, path):
    response = api.post(path, content=b'{"model": "tiny", "messages": [', headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    body = response.json()
    message = body["error"]["message"] if path.startswith("/v1") else body["error"]
    assert "invalid JSON" in message


@pytest.mark.parametrize(
    "path, body, fragment",
    [
        ("/api/chat", {"model": "tiny", "messages": "hello"}, "messages"),
        ("/api/chat", {"model": 42, "messages": []}, "model"),
        ("/api/chat", {"model": "tiny", "messages": [{"content": "no role"}]}, "role"),
        ("/api/generate", {"model": "tiny", "prompt": ["not", "a", "string"]}, "prompt"),
        ("/api/generate", {"model": "tiny", "prompt": "x", "options": {"num_predict": "many"}}, "num_predict"),
        ("/api/generate", {"model": "tiny", "prompt": "x", "options": []}, "options"),
        ("/api/generate", {"model": "tiny", "prompt": "x", "images": ["aGVsbG8="]}, "images"),
        ("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, "images"),
        ("/api/generate", {"model": "tiny", "prompt": "x", "options": {"num_ctx": -5}}, "num_ctx"),
        ("/api/generate", {"model": "tiny", "prompt": "x", "options": {"temperature": -1}}, "temperature"),
        ("/api/generate", {"model": "tiny", "prompt": "x", "options": {"num_thread": 100000}}, "num_thread"),
        ("/api/generate", {"model": "tiny", "prompt": "x", "options": {"top_p": 1.5}}, "top_p"),
        ("/api/generate", {"model": "tiny", "prompt": "x", "format": "yaml"}, "format"),
        ("/api/generate", {"model": "tiny", "prompt": "x", "keep_alive": "forever"}, "keep_alive"),
        ("/api/generate", {"model": "tiny", "prompt": "x", "stream": "yes"}, "stream"),
        ("/api/embed", {"model": "all-minilm", "input": [1, 2]}, "input"),
        ("/api/embed", {"model": "all-minilm", "input": "x", "dimensions": 5000}, "dimensions"),
        ("/api/generate", {"prompt": "x"}, "model"),
        ("/api/chat", [1, 2, 3], "JSON object"),
        (
            "/api/generate",
            {"model": "tiny", "prompt": "x", "template": "{{ with .Prompt }}x{{ end }}"},
            "not supported",
        ),
        ("/api/generate", {"model": "tiny", "prompt": "x", "template": "{% for x in %}"}, "invalid chat template"),
    ],
)
def test_wrong_types_are_400(api, path, body, fragment):
    response = api.post(path, json=body)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]


@pytest.mark.parametrize(
    "path, body",
    [
        ("/api/chat", {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}),
        ("/api/generate", {"model": "no-such-model", "prompt": "x"}),
        ("/api/show", {"model": "no-such-model"}),
        ("/api/embed", {"model": "no-such-model", "input": "x"}),
        ("/api/copy", {"source": "no-such-model", "destination": "y"}),
    ],
)
def test_unknown_model_is_404(api, path, body):
    response = api.post(path, json=body)
    assert response.status_code == 404 and "not found" in response.json()["error"]


def test_prompt_longer_than_context(api, ollama_client):
    long_prompt = "hello world " * 600  # far beyond the tiny model's 512-token context
    response = api.post(
        "/api/generate", json={"model": "tiny", "prompt": long_prompt, "raw": True, "truncate": False, "stream": False}
    )
    assert response.status_code == 400 and "exceeds the context length" in response.json()["error"]
    truncated = ollama_client.generate(model="tiny", prompt=long_prompt, raw=True, options={"num_predict": 2})
    assert truncated.done and truncated.prompt_eval_count < 512


def _upload(api, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert api.post(f"/api/blobs/{digest}", content=data).status_code == 201
    return digest


def test_corrupt_and_truncated_ggufs_are_refused(api, tiny_gguf, server):
    data = tiny_gguf.read_bytes()
    for label, broken in {
        "truncated": data[: len(data) // 2],
        "header only": data[:64],
        "garbage": os.urandom(4096),
    }.items():
        digest = _upload(api, broken)
        response = api.post(
            "/api/create", json={"model": f"broken-{label.replace(' ', '-')}", "files": {"model.gguf": digest}}
        )
        assert response.status_code == 400, (label, response.text)
        assert "GGUF" in response.json()["error"]
    names = {m["name"] for m in api.get("/api/tags").json()["models"]}
    assert not any(name.startswith("broken") for name in names)


def test_blob_with_wrong_digest_is_refused(api, server):
    claimed = "sha256:" + hashlib.sha256(b"the real bytes").hexdigest()
    response = api.post(f"/api/blobs/{claimed}", content=b"different bytes")
    assert response.status_code == 400 and "digest mismatch" in response.json()["error"]
    assert api.head(f"/api/blobs/{claimed}").status_code == 404
    blobs = server.home / "models" / "blobs"
    assert not [p for p in blobs.iterdir() if p.name.startswith(".partial")]


@pytest.mark.parametrize("digest", ["sha256:abc", "sha256:" + "G" * 64, "md5:" + "0" * 64, "sha256:..%2F..%2Fetc"])
def test_bad_digest_in_path(api, digest):
    assert api.post(f"/api/blobs/{digest}", content=b"x").status_code in (400, 404)


@pytest.mark.parametrize("name", ["../../escape", "../escape:latest", "a/../../b", "ok/../../../tmp/x"])
def test_names_with_dot_dot_are_refused(api, server, name):
    outside = server.home.parent
    before = set(outside.rglob("*"))
    for path, body in (
        ("/api/copy", {"source": "tiny", "destination": name}),
        ("/api/create", {"model": name, "from": "tiny"}),
        ("/api/show", {"model": name}),
    ):
        response = api.post(path, json=body)
        assert response.status_code == 400 and "invalid model name" in response.json()["error"]
    created_outside = {p for p in set(outside.rglob("*")) - before if not p.is_relative_to(server.home)}
    assert created_outside == set()


def test_create_from_a_server_path_is_refused(api, tiny_gguf):
    response = api.post("/api/create", json={"model": "sneaky", "from": str(tiny_gguf)})
    assert response.status_code == 400 and "command line" in response.json()["error"]


def test_oversized_body_is_413(api):
    response = api.post("/api/chat", content=b"{" + b" " * (17 * 1024 * 1024) + b"}")
    assert response.status_code == 413


def test_unknown_model_is_refused_before_streaming_starts(server):
    client = ollama.Client(host=server.url, headers=server.auth())
    with pytest.raises(ollama.ResponseError) as error:
        list(client.chat(model="ghost", messages=[{"role": "user", "content": "x"}], stream=True))
    assert error.value.status_code == 404
    with httpx.Client(base_url=server.url, headers=server.auth()) as api:
        assert api.get("/api/tags").status_code == 200


def test_blob_corrupted_on_disk_is_a_clear_500_and_nothing_else_breaks(server, tiny_gguf, ollama_client):
    """Digests are verified on load: a damaged model file is refused, other models keep working."""
    with server.http() as api:
        digest = _upload(api, tiny_gguf.read_bytes()[:-64] + b"\x00" * 64)  # same size, different bytes
        assert api.post("/api/create", json={"model": "damaged", "files": {"m.gguf": digest}}).status_code == 200
        blob = server.home / "models" / "blobs" / digest.replace(":", "-")
        data = bytearray(blob.read_bytes())
        data[-1] ^= 0xFF  # the disk flips a bit after import
        blob.write_bytes(bytes(data))
        response = api.post("/api/generate", json={"model": "damaged", "prompt": "x", "stream": False})
        assert response.status_code == 500 and "is corrupt" in response.json()["error"]
        api.request("DELETE", "/api/delete", json={"model": "damaged"})
    assert ollama_client.generate(model="tiny", prompt="x", options={"num_predict": 1}).done
