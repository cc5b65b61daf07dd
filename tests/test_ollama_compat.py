"""What the clients people already use (LlamaIndex, Open WebUI, the `ollama` package) expect of the Ollama
API beyond the basics: /api/show for `rag/<collection>` models, capabilities, tools refused by a model
that cannot take them, names echoed as sent, safe /api/create file names, timings of a preload, stable
listing times. A real server on tiny generated GGUF models, with documents ingested by the CLI."""

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import ollama
import pytest

from appliance.access.rbac import add_grant
from appliance.access.users import add_user, create_key
from appliance.db import create_db_engine
from appliance.models.synthetic_gguf import TINY, write_gguf
from tests.conftest import Server, launch_server, run_cli, stop_server

CORPUS = Path(__file__).parent.parent / "sample_corpus"
PLAIN_TEMPLATE = (  # ChatML without any tools section
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOOLS = [
    {
        "type": "function",
        "function": {"name": "lookup", "description": "Look up", "parameters": {"type": "object", "properties": {}}},
    }
]
MESSAGES = [{"role": "user", "content": "How long are maternity records kept?"}]


def write_embedding_gguf(source: Path, target: Path) -> Path:
    """A copy of `source` that declares a pooling type, as embedding GGUFs do."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = GGUFReader(source)
    writer = GGUFWriter(str(target), "llama", use_temp_file=False)
    copy_with_new_metadata(reader, writer, {"llama.pooling_type": MetadataDetails(GGUFValueType.UINT32, 1)}, [])
    return target


@dataclass
class World:
    server: Server
    alice: str  # reader with a grant on hospital, none on lawfirm
    started: float  # time.time() before the documents were ingested

    def client(self, key: str | None = None) -> ollama.Client:
        return ollama.Client(host=self.server.url, headers=self.server.auth(key))


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_gguf, tiny_long_gguf):
    home = tmp_path_factory.mktemp("compat")
    files = tmp_path_factory.mktemp("compat-files")
    started = time.time()
    run_cli(home, "ingest", str(CORPUS / "hospital/records-retention-policy.md"), "--collection", "hospital")
    run_cli(home, "ingest", str(CORPUS / "lawfirm/engagement-letter-template.md"), "--collection", "lawfirm")
    engine = create_db_engine(f"sqlite:///{home / 'appliance.db'}")
    keys = {}
    for name, role in (("admin", "admin"), ("reader", "reader"), ("alice", "reader")):
        add_user(engine, name, role)
        keys[name] = create_key(engine, name)
    add_grant(engine, "hospital", user="alice")
    engine.dispose()
    plain = write_gguf(files / "plain.gguf", TINY, seed=1, chat_template=PLAIN_TEMPLATE)
    embedder = write_embedding_gguf(tiny_gguf, files / "embedder.gguf")
    for name, path in (("tiny", tiny_gguf), ("tiny-long", tiny_long_gguf), ("plain", plain), ("embedder", embedder)):
        run_cli(home, "create", name, "--from", str(path))
    server = launch_server(
        home, keys["admin"], keys["reader"], APPLIANCE_RAG_MODEL="tiny-long", APPLIANCE_ANSWER_MAX_TOKENS="16"
    )
    yield World(server, keys["alice"], started)
    stop_server(server)


def _error(call) -> ollama.ResponseError:
    with pytest.raises(ollama.ResponseError) as raised:
        call()
    return raised.value


# --- 1: /api/show for rag models -----------------------------------------------------------------
def test_show_describes_a_readable_rag_model_by_its_answering_model(world):
    alice = world.client(world.alice)
    answering = world.client().show("tiny-long")
    for name in ("rag/hospital", "rag/hospital:latest"):
        shown = alice.show(name)
        assert shown.capabilities == ["completion"]
        assert shown.details.family == "llama" and shown.details.parent_model == "tiny-long:latest"
        assert shown.details.parameter_size == answering.details.parameter_size
        assert shown.details.quantization_level == answering.details.quantization_level
        assert shown.modelinfo["llama.context_length"] == answering.modelinfo["llama.context_length"] == 16384
        assert "hospital" in shown.modelfile and "tiny-long:latest" in shown.modelfile
    listed = next(m for m in alice.list().models if m.model == "rag/hospital:latest")
    assert alice.show("rag/hospital").modified_at == listed.modified_at


def test_show_answers_an_unreadable_rag_model_like_a_missing_one(world):
    def refusal(key: str, model: str) -> tuple[int, dict]:
        with world.server.http(key) as http:
            response = http.post("/api/show", json={"model": model})
        return response.status_code, response.json()

    missing = refusal(world.alice, "rag/no-such-collection")
    assert missing == (404, {"error": "model 'rag/no-such-collection:latest' not found"})
    assert refusal(world.alice, "rag/lawfirm") == (404, {"error": "model 'rag/lawfirm:latest' not found"})
    assert refusal(world.server.reader_key, "rag/hospital") == (404, {"error": "model 'rag/hospital:latest' not found"})


def test_llamaindex_chats_with_a_rag_model(world):
    ollama_llm = pytest.importorskip("llama_index.llms.ollama")
    from llama_index.core.llms import ChatMessage

    llm = ollama_llm.Ollama(
        model="rag/hospital", base_url=world.server.url, headers=world.server.auth(world.alice), request_timeout=120
    )
    assert llm.metadata.context_window == 16384  # read from /api/show's model_info
    reply = llm.chat([ChatMessage(role="user", content="How long are maternity records kept?")])
    assert reply.message.role == "assistant" and reply.message.content


# --- 3: tools refused by models that cannot take them ----------------------------------------------
def test_tools_to_a_model_without_tools_support_are_refused(world):
    admin = world.client()
    error = _error(lambda: admin.chat(model="plain", messages=MESSAGES, tools=TOOLS, options={"num_predict": 1}))
    assert (error.status_code, error.error) == (400, "plain:latest does not support tools")
    with world.server.http() as http:
        generate = http.post("/api/generate", json={"model": "plain", "prompt": "hi", "tools": TOOLS, "stream": False})
        assert (generate.status_code, generate.json()) == (400, {"error": "plain:latest does not support tools"})
        no_tools = http.post(
            "/api/chat",
            json={"model": "plain", "messages": MESSAGES, "tools": [], "stream": False, "options": {"num_predict": 1}},
        )
        assert no_tools.status_code == 200  # an empty list asks for no tools
    assert admin.chat(model="tiny", messages=MESSAGES, tools=TOOLS, options={"num_predict": 1}).done
    assert admin.show("plain").capabilities == ["completion"]


def test_tools_to_a_rag_model_are_refused_after_its_access_check(world):
    alice = world.client(world.alice)
    error = _error(lambda: alice.chat(model="rag/hospital", messages=MESSAGES, tools=TOOLS))
    assert (error.status_code, error.error) == (400, "rag/hospital:latest does not support tools")
    hidden = _error(lambda: alice.chat(model="rag/lawfirm", messages=MESSAGES, tools=TOOLS))
    missing = _error(lambda: alice.chat(model="rag/no-such-collection", messages=MESSAGES, tools=TOOLS))
    assert hidden.status_code == missing.status_code == 404
    assert hidden.error == missing.error.replace("no-such-collection", "lawfirm")


# --- 7a: names echoed as sent ----------------------------------------------------------------------
def test_responses_name_the_model_as_the_request_did(world):
    admin = world.client()
    options = {"num_predict": 2}
    for name in ("tiny", "tiny:latest", "TINY"):
        assert admin.chat(model=name, messages=MESSAGES, stream=False, options=options).model == name
        assert {c.model for c in admin.chat(model=name, messages=MESSAGES, stream=True, options=options)} == {name}
        assert admin.generate(model=name, prompt="hi", stream=False, options=options).model == name
        assert {c.model for c in admin.generate(model=name, prompt="hi", stream=True, options=options)} == {name}
    assert admin.generate(model="tiny", prompt="").model == "tiny"  # a preload
    alice = world.client(world.alice)
    assert alice.chat(model="rag/hospital", messages=MESSAGES, stream=False).model == "rag/hospital"
    assert {c.model for c in alice.chat(model="rag/hospital", messages=MESSAGES, stream=True)} == {"rag/hospital"}


# --- 7b: /api/create file names ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "filename", ["../evil4.gguf", "/tmp/evil.gguf", "sub/evil.gguf", "..\\evil.gguf", ".hidden.gguf", "ev\nil.gguf"]
)
def test_create_refuses_file_names_that_are_paths(world, tiny_gguf, filename):
    admin = world.client()
    digest = admin.create_blob(tiny_gguf)
    assert digest == "sha256:" + hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    with world.server.http() as http:
        response = http.post("/api/create", json={"model": "evil", "files": {filename: digest}, "stream": False})
    assert response.status_code == 400
    assert "file name" in response.json()["error"]
    assert "evil:latest" not in {m.model for m in admin.list().models}


def test_create_accepts_plain_file_names(world, tiny_gguf):
    admin = world.client()
    digest = admin.create_blob(tiny_gguf)
    assert admin.create(model="plain-named", files={"My Model_v1.2+q8.gguf": digest}).status == "success"
    assert "plain-named:latest" in {m.model for m in admin.list().models}
    admin.delete("plain-named")


# --- 7c: a preload's timings -------------------------------------------------------------------------
def test_a_preload_reports_a_total_no_smaller_than_its_load(world):
    admin = world.client()
    admin.generate(model="tiny", prompt="", keep_alive=0)  # unloaded, so the first preload loads
    for _ in range(3):  # then already loaded: the load takes no time of this request
        done = admin.generate(model="tiny", prompt="", keep_alive="10m")
        assert done.done_reason == "load" and done.total_duration >= done.load_duration >= 0
        chat = admin.chat(model="tiny", messages=[], keep_alive="10m")
        assert chat.done_reason == "load" and chat.total_duration >= chat.load_duration >= 0


# --- 7d: a stable modified_at for rag models ---------------------------------------------------------
def test_rag_models_keep_their_modified_at_between_listings(world):
    alice = world.client(world.alice)

    def modified() -> str:
        return next(m.modified_at for m in alice.list().models if m.model == "rag/hospital:latest")

    first = modified()
    time.sleep(1.1)
    assert modified() == first
    assert world.started - 1 <= first.timestamp() <= time.time() - 1  # when its documents were indexed


# --- 7e: capabilities, and embedding models refused as chat models ----------------------------------
def test_capabilities_tell_embedding_models_from_chat_models(world):
    admin = world.client()
    assert admin.show("embedder").capabilities == ["embedding"]
    assert admin.show("all-minilm").capabilities == ["embedding"]
    assert admin.show("tiny").capabilities == ["completion", "tools"]
    chat = _error(lambda: admin.chat(model="embedder", messages=MESSAGES, options={"num_predict": 1}))
    assert (chat.status_code, chat.error) == (400, '"embedder" does not support chat')
    generate = _error(lambda: admin.generate(model="all-minilm", prompt="hi"))
    assert (generate.status_code, generate.error) == (400, '"all-minilm" does not support generate')
    assert len(admin.embed(model="embedder", input="records").embeddings[0]) == 64
