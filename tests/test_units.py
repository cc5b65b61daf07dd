"""Names, digests, Modelfiles, keep_alive durations, stop strings, templates: pure functions."""

import time

import pytest

from appliance.errors import BadRequest
from appliance.inference.scheduler import parse_keep_alive
from appliance.inference.stops import StopMatcher
from appliance.models.modelfile import parse_modelfile
from appliance.models.names import parse_digest, parse_name
from appliance.models.template import check_template, parse_tool_calls, render_chat, render_chat_isolated


@pytest.mark.parametrize(
    "raw, display",
    [
        ("llama3", "llama3:latest"),
        ("llama3:8b-q4", "llama3:8b-q4"),
        ("Team/Model:V1", "team/model:v1"),
        ("host.lan:5000/team/model:tag", "host.lan:5000/team/model:tag"),
        ("library/llama3", "llama3:latest"),
    ],
)
def test_names_follow_ollama_grammar(raw, display):
    assert parse_name(raw).display == display


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "../etc/passwd",
        "a/../b",
        "..",
        "a/b/c/d",
        "x:",
        ":tag",
        "a b",
        "/abs",
        "model:../../x",
        "a" * 100,
        "mo\x00del",
        "a//b",
    ],
)
def test_bad_names_are_refused(raw):
    with pytest.raises(BadRequest):
        parse_name(raw)


def test_digest_grammar():
    hex64 = "a" * 64
    assert parse_digest(f"sha256:{hex64}") == hex64
    assert parse_digest(f"sha256-{hex64}") == hex64
    for bad in (f"sha256:{hex64[:-1]}", f"sha256:{'A' * 64}", f"md5:{hex64}", f"sha256:{hex64}/../x", ""):
        with pytest.raises(BadRequest):
            parse_digest(bad)


def test_modelfile_parses_every_command():
    spec = parse_modelfile('''
# comment
FROM ./model.gguf
PARAMETER temperature 0.2
PARAMETER stop "<|im_end|>"
PARAMETER stop "###"
PARAMETER num_ctx 2048
TEMPLATE """{% for m in messages %}{{ m['content'] }}
{% endfor %}"""
SYSTEM """You are terse.
Always."""
MESSAGE user hi
LICENSE "MIT"
''')
    assert spec.from_ == "./model.gguf"
    assert spec.parameters == {"temperature": 0.2, "stop": ["<|im_end|>", "###"], "num_ctx": 2048}
    assert spec.template.startswith("{% for m in messages %}") and spec.template.endswith("{% endfor %}")
    assert spec.system == "You are terse.\nAlways."
    assert spec.messages == [{"role": "user", "content": "hi"}]
    assert spec.license == "MIT"


@pytest.mark.parametrize(
    "text, message",
    [
        ("PARAMETER temperature 0.1", "FROM is required"),
        ("FROM x\nPARAMETER nonsense 1", "unknown parameter"),
        ("FROM x\nPARAMETER num_ctx lots", "must be of type int"),
        ('FROM x\nSYSTEM """never closed', "unterminated"),
        ("FROM x\nADAPTER ./lora.gguf", "ADAPTER"),
        ("FROM x\nBOGUS 1", "unknown command"),
    ],
)
def test_modelfile_errors_are_clear(text, message):
    with pytest.raises(BadRequest, match=message):
        parse_modelfile(text)


@pytest.mark.parametrize(
    "value, seconds",
    [
        ("5m", 300),
        ("1h30m", 5400),
        ("10s", 10),
        (0, 0),
        ("0", 0),
        (30, 30),
        (-1, None),
        ("-1m", None),
        ("1.5s", 1.5),
        ("250ms", 0.25),
    ],
)
def test_keep_alive_durations(value, seconds):
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 minutes", True, [], "m"])
def test_bad_keep_alive(value):
    with pytest.raises(BadRequest):
        parse_keep_alive(value)


def test_stop_strings_hold_back_partial_matches():
    matcher = StopMatcher(["###", "END"])
    assert matcher.feed("hello #") == ("hello ", False)
    assert matcher.feed("#") == ("", False)
    assert matcher.feed("x") == ("##x", False)
    assert matcher.feed(" and EN") == (" and ", False)
    assert matcher.feed("D more") == ("", True)


def test_chat_template_renders_in_a_sandbox():
    template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    assert render_chat(template, [{"role": "user", "content": "hi"}]) == "[user]hi[assistant]"
    hostile = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(BadRequest):
        render_chat(hostile, [])


@pytest.mark.parametrize(
    "bomb, reason",
    [
        ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", "longer than"),
        ("{% for a in range(99999) %}{% for b in range(99999) %}{{ loop.index }}{% endfor %}{% endfor %}", "longer"),
        ("{{ 'x' * 1000000000 }}", "repetition"),
        ("{{ [1, 2] * 100000 }}", "repetition"),
        ("{{ 'x'|center(1000000000) }}", "number above"),
        ("{{ 'x'.ljust(1000000000) }}", "number above"),
        ("{{ '{:>999999999}'.format(1) }}", "format width"),
        ("{{ '%999999999d' % 1 }}", "format width"),
        ("{{ '%999999999s'|format('a') }}", "format width"),
        ("{{ 10 ** 100000 }}", "exponent"),
    ],
)
def test_a_costly_chat_template_is_stopped(bomb, reason):
    """A render is bounded in time and in what one step may produce, and the error says which bound."""
    started = time.monotonic()
    with pytest.raises(BadRequest, match=reason):
        render_chat(bomb, [{"role": "user", "content": "hi"}])
    assert time.monotonic() - started < 30  # stopped, not merely slow (the deadline is 1 s)


def test_a_request_template_renders_in_a_child_held_to_a_memory_limit():
    """A template sent with a request (administrators only) runs in a child process: a string doubled forty
    times (a terabyte) is stopped by the child's memory limit, and an ordinary one renders as in process."""
    doubling = "{% set ns = namespace(x='ab') %}{% for i in range(40) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}"
    with pytest.raises(BadRequest, match="more memory"):
        render_chat_isolated(doubling + "{{ ns.x | length }}", [{"role": "user", "content": "hi"}])
    assert render_chat_isolated(JINJA_CHATML, CONVERSATION) == render_chat(JINJA_CHATML, CONVERSATION)
    with pytest.raises(BadRequest, match="longer than"):
        render_chat_isolated("{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}", [])


def test_bounds_leave_ordinary_templates_and_message_text_alone():
    """Large numbers and format-looking text inside messages are data: only the template's own steps are capped."""
    text = "Dose 1000000 units, 50% of {:>9999999} and %99999999d stay text."
    rendered = render_chat(JINJA_CHATML, [{"role": "user", "content": text}] * 50)
    assert rendered.count(text) == 50
    numbers = "{% if 1 %}{{ (messages | length) * 3 }}-{{ range(5) | list | length }}-{{ '%05d' % 42 }}{% endif %}"
    numbers += "-{{ 'ab' * 3 }}"
    assert render_chat(numbers, [{"role": "user", "content": "x"}] * 4) == "12-5-00042-ababab"


GO_CHATML = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
JINJA_CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Retention?"},
    {"role": "assistant", "content": "Ten years {{ not a template }}."},
    {"role": "user", "content": "And minors?"},
]


def test_go_template_with_messages_matches_its_jinja_twin():
    assert render_chat(GO_CHATML, CONVERSATION) == render_chat(JINJA_CHATML, CONVERSATION)


def test_go_template_llama3_style_with_variables():
    template = (
        "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}\n"
        "{{- range $i, $m := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n"
        '{{- if ne $m.Role "system" }}<|start_header_id|>{{ $m.Role }}<|end_header_id|>\n\n'
        "{{ $m.Content }}<|eot_id|>{{ if $last }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}"
        "{{- end }}{{- end }}"
    )
    rendered = render_chat(template, CONVERSATION)
    assert rendered.startswith("<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    assert rendered.count("<|start_header_id|>user") == 2 and "{{ not a template }}" in rendered
    assert rendered.endswith("And minors?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_legacy_go_template_renders_turn_by_turn():
    template = (
        "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
        "{{ .Response }}<|im_end|>\n"
    )
    assert render_chat(template, CONVERSATION) == render_chat(JINJA_CHATML, CONVERSATION)


@pytest.mark.parametrize(
    "template, message",
    [
        ("{{ with .System }}{{ . }}{{ end }}", "not supported"),
        ("{{ if .System }}unclosed", "unclosed"),
        ('{{ printf "%s" .Prompt }}', "unsupported Go template function"),
        ("{{ end }}", "without a block"),
        ("{% for x in %}", "invalid chat template"),
    ],
)
def test_unsupported_templates_are_refused_clearly(template, message):
    with pytest.raises(BadRequest, match=message):
        check_template(template)


def test_tool_calls_are_parsed_from_output():
    text = 'sure <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    calls = parse_tool_calls(text, {"get_weather"})
    assert [c["function"] for c in calls] == [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
    assert parse_tool_calls(text, {"other_tool"}) == []
    assert parse_tool_calls("no calls here", {"get_weather"}) == []


def test_settings_defaults_and_environment(monkeypatch, tmp_path):
    from appliance.config import Settings

    for key in ("APPLIANCE_HOME", "APPLIANCE_PORT", "APPLIANCE_HOST", "APPLIANCE_MAX_LOADED_MODELS"):
        monkeypatch.delenv(key, raising=False)
    defaults = Settings()
    assert (defaults.server.host, defaults.server.port) == ("127.0.0.1", 11434)
    assert defaults.home.name == ".appliance" and defaults.scheduler.keep_alive == "5m"
    assert defaults.resolved_database_url.endswith("/.appliance/appliance.db")
    monkeypatch.setenv("APPLIANCE_HOME", str(tmp_path))
    monkeypatch.setenv("APPLIANCE_MAX_LOADED_MODELS", "2")
    configured = Settings()
    assert configured.home == tmp_path and configured.scheduler.max_loaded_models == 2
    monkeypatch.setenv("APPLIANCE_MAX_LOADED_MODELS", "0")
    with pytest.raises(ValueError):
        Settings()


def test_network_guard_blocks_and_records(tmp_path):
    """The guard the server tests run under really blocks: a non-loopback connect fails and is logged."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    log = tmp_path / "attempts.log"
    code = (
        "import socket\n"
        "s = socket.socket()\n"
        "s.settimeout(1)\n"
        "try:\n    s.connect(('192.0.2.1', 80))\nexcept OSError as e:\n    print('blocked', e)\n"
        "try:\n    socket.getaddrinfo('huggingface.co', 443)\nexcept OSError as e:\n    print('blocked', e)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent / "netguard"), APPLIANCE_NETGUARD_LOG=str(log))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60).stdout
    assert out.count("network blocked by test guard") == 2
    assert "192.0.2.1" in log.read_text() and "huggingface.co" in log.read_text()


def test_llama_cpp_was_built_with_the_rpc_backend():
    """deploy/install.sh builds llama.cpp with -DGGML_RPC=on (multi-node sharding stands on it)."""
    import llama_cpp

    assert llama_cpp.llama_supports_rpc()
    assert llama_cpp.llama_cpp._lib.ggml_backend_reg_by_name is not None


def test_settings_reference_lists_every_setting_with_its_true_default():
    from pathlib import Path

    from appliance.config import settings_reference

    root = Path(__file__).parent.parent
    rows = {}
    for line in (root / "deploy" / "README.md").read_text().splitlines():
        if line.startswith("| `APPLIANCE_"):
            env, default, _meaning = (cell.strip() for cell in line.strip().strip("|").split(" | ", 2))
            rows[env.strip("`")] = default
    reference = {env: default for env, default, _description in settings_reference()}
    assert set(rows) == set(reference)

    def shown(value) -> str:
        value = value.get_secret_value() if hasattr(value, "get_secret_value") else value
        if value in ("", [], {}):
            return "(empty)"
        return "~/.appliance" if isinstance(value, Path) else str(value)

    assert {env: rows[env] for env in reference} == {env: shown(default) for env, default in reference.items()}
    assert "deploy/README.md" in (root / "README.md").read_text()  # the README points at the reference
