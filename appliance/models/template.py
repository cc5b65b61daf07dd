"""Chat templates: render messages into a prompt with the model's template, sandboxed.

A GGUF's `tokenizer.chat_template` comes from whoever made the file, so it runs in Jinja2's
immutable sandbox. Ollama's Go templates (`{{ .Prompt }}`, `{{ range .Messages }}`) are translated
to Jinja2 first (`go_template`) and rendered in the same sandbox. Tool calls are parsed back out of
the model's text.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from appliance.errors import BadRequest
from appliance.models.go_template import to_jinja

_GO_ACTION = re.compile(
    r"\{\{-?\s*(\.|\$|(if|range|end|else|with|define|template|block|printf|print|len|eq|ne|and|or|not|slice"
    r"|index|json)\b)"
)


def is_go_template(text: str) -> bool:
    """Ollama's Go syntax: actions like `{{ .Prompt }}` or `{{ range ... }}`, and no Jinja `{% %}` blocks."""
    return "{%" not in text and bool(_GO_ACTION.search(text))


def check_template(text: str) -> None:
    """Reject a template that cannot be rendered here, with the reason."""
    try:
        _compile(text, is_go_template(text))
    except TemplateError as exc:
        raise BadRequest(f"invalid chat template: {exc}") from None


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


@lru_cache(maxsize=32)
def _compile(text: str, go: bool = False):
    if go:  # Go keeps every character outside its actions: no Jinja whitespace handling
        env = ImmutableSandboxedEnvironment(keep_trailing_newline=True)
        text = to_jinja(text)
    else:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value, indent=None, **_: json.dumps(value, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(text)


def render_chat(
    template: str | None,
    messages: list[dict[str, Any]],
    *,
    tools: list | None = None,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
) -> str:
    """Render chat messages to a prompt string; without a template, a plain `role: text` layout."""
    if not template:
        lines = [f"{m.get('role', 'user')}: {m.get('content') or ''}" for m in messages]
        return "\n".join(lines) + ("\nassistant: " if add_generation_prompt else "")
    if is_go_template(template):
        return _render_go(template, messages, tools)
    try:
        return _compile(template).render(
            messages=messages,
            tools=tools or None,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )
    except TemplateError as exc:
        raise BadRequest(f"chat template failed: {exc}") from None


_RESPONSE_MARK = "\x00response\x00"


def _render_go(template: str, messages: list[dict[str, Any]], tools: list | None) -> str:
    """Render as Ollama does: with `.Messages` when the template ranges over them, otherwise one
    System/Prompt/Response pass per turn, the last cut where the model's response begins."""
    compiled = _compile(template, True)
    system = "\n\n".join(m.get("content") or "" for m in messages if m.get("role") == "system")
    try:
        if ".Messages" in template:
            go_messages = [
                {"Role": m.get("role"), "Content": m.get("content") or "", "ToolCalls": m.get("tool_calls")}
                for m in messages
            ]
            return compiled.render(
                root={"System": system, "Messages": go_messages, "Tools": tools or None, "Prompt": "", "Response": ""}
            )
        turns: list[tuple[str, str]] = []
        for message in messages:
            if message.get("role") == "user":
                turns.append((message.get("content") or "", ""))
            elif message.get("role") == "assistant" and turns:
                turns[-1] = (turns[-1][0], message.get("content") or "")
        if not turns or turns[-1][1]:
            turns.append(("", ""))
        out = []
        for index, (prompt, response) in enumerate(turns):
            last = index == len(turns) - 1
            text = compiled.render(
                root={
                    "System": system if index == 0 else "",
                    "Prompt": prompt,
                    "Response": _RESPONSE_MARK if last else response,
                    "Tools": tools or None,
                }
            )
            out.append(text.split(_RESPONSE_MARK)[0] if last else text)
        return "".join(out)
    except TemplateError as exc:
        raise BadRequest(f"chat template failed: {exc}") from None


_TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def _as_call(obj: Any) -> dict | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:12]}", "function": {"name": obj["name"], "arguments": arguments}}


def parse_tool_calls(text: str, tool_names: set[str]) -> list[dict]:
    """Tool calls in the model's output: `<tool_call>{json}</tool_call>` blocks or a bare JSON call.

    Only calls to tools the request offered count.
    """
    candidates = _TOOL_CALL_BLOCK.findall(text) or [text.strip()]
    calls = []
    for candidate in candidates:
        try:
            parsed = json.loads(candidate)
        except ValueError:
            continue
        for item in parsed if isinstance(parsed, list) else [parsed]:
            call = _as_call(item)
            if call and call["function"]["name"] in tool_names:
                calls.append(call)
    return calls
