"""Chat templates: render messages into a prompt with the model's Jinja2 template, sandboxed.

A GGUF's `tokenizer.chat_template` comes from whoever made the file, so it runs in Jinja2's
immutable sandbox. Go-style Ollama templates (`{{ .Prompt }}`) are recognised and refused with a
clear error rather than rendered wrongly. Tool calls are parsed back out of the model's text.
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

_GO_TEMPLATE = re.compile(r"\{\{-?\s*(\.|range\s|if\s+\.)")


def is_go_template(text: str) -> bool:
    return bool(_GO_TEMPLATE.search(text))


def check_template(text: str) -> None:
    """Reject a template that cannot be rendered here, with the reason."""
    if is_go_template(text):
        raise BadRequest(
            "Go-style templates ({{ .Prompt }}) are not supported; give TEMPLATE as a Jinja2 chat "
            "template (the format GGUF files carry in tokenizer.chat_template)"
        )
    try:
        _compile(text)
    except TemplateError as exc:
        raise BadRequest(f"invalid chat template: {exc}") from None


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


@lru_cache(maxsize=32)
def _compile(text: str):
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
