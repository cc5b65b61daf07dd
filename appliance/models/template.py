"""Chat templates: render messages into a prompt with the model's template, sandboxed.

A GGUF's `tokenizer.chat_template` comes from whoever made the file, so it runs in Jinja2's
immutable sandbox, bounded: a render that runs past `RENDER_DEADLINE_S` of template code is stopped,
numbers handed to calls and filters (`range`, `center`, `"x" * n`, format widths) are capped, and so is
the rendered prompt. Ollama's Go templates (`{{ .Prompt }}`, `{{ range .Messages }}`) are translated
to Jinja2 first (`go_template`) and rendered in the same sandbox. Tool calls are parsed back out of
the model's text.

The bounds stop slow loops and obvious size bombs; they do not make an arbitrary template safe (a few
string concatenations can still build a large string before the deadline). That is why only
administrators may send a template with a request (everyone else gets the model's own template, which
an administrator installed), and why such a template renders in a child process of its own
(`render_chat_isolated`), under a memory and CPU limit, where its work cannot hold the server's
interpreter (a render spinning until its deadline in a thread slowed every other request).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEnvironment

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


RENDER_DEADLINE_S = 1.0  # time inside template code per render; real chat templates need microseconds
MAX_NUMBER = 100_000  # the largest number a call, filter or repetition may be handed
MAX_PROMPT_CHARS = 4_000_000  # about a million tokens: more than any context window here
_TEMPLATE_FILE = "<template>"  # the file name Jinja gives code compiled from a string
_WIDE_FORMAT = re.compile(r"\d{6,}")  # a width or precision of a million or more in a format string


class TemplateTooCostly(TemplateError):
    """A template that ran too long or asked for too large a value."""


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _check_numbers(args: tuple, kwargs: dict) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_NUMBER:
            raise TemplateTooCostly(f"a number above {MAX_NUMBER} in a chat template")


def _check_format(text: object) -> None:
    """A format string (`%`, `str.format`, the `format` filter) may not ask for a huge width or precision."""
    if isinstance(text, str) and _WIDE_FORMAT.search(text):
        raise TemplateTooCostly("a format width above the limit in a chat template")


def _bounded_filter(name: str, function):
    def bounded(*args, **kwargs):
        _check_numbers(args[1:], kwargs)  # the arguments; the value filtered may be anything
        if name == "format" and args:
            _check_format(args[0])
        return function(*args, **kwargs)

    # Jinja passes the context or environment to filters marked for it: keep the mark.
    bounded.__dict__.update(getattr(function, "__dict__", {}))
    return bounded


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with caps on what one operation or call may produce."""

    intercepted_binops = frozenset({"*", "**", "%", "//"})

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, int) and abs(right) > 64:
            raise TemplateTooCostly("an exponent above 64 in a chat template")
        if operator == "*":
            for count, other in ((left, right), (right, left)):
                if isinstance(count, int) and hasattr(other, "__len__") and abs(count) * len(other) > MAX_NUMBER:
                    raise TemplateTooCostly(f"a repetition longer than {MAX_NUMBER} in a chat template")
        if operator == "%":
            _check_format(left)
        return SandboxedEnvironment.call_binop(self, context, operator, left, right)

    def getattr(self, obj, attribute):
        if isinstance(obj, str) and attribute in ("format", "format_map"):  # "{:>9999999}".format(...)
            _check_format(obj)
        return super().getattr(obj, attribute)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's own signature)
        _check_numbers(args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)


@lru_cache(maxsize=32)
def _compile(text: str, go: bool = False):
    if go:  # Go keeps every character outside its actions: no Jinja whitespace handling
        env = _BoundedSandbox(keep_trailing_newline=True)
        text = to_jinja(text)
    else:
        env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value, indent=None, **_: json.dumps(value, indent=indent, ensure_ascii=False)
    env.filters = {name: _bounded_filter(name, function) for name, function in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(text)


def _within_deadline(render):
    """Run `render()`, stopping it with TemplateTooCostly once template code has run RENDER_DEADLINE_S.

    A trace function on this thread sees every line of template code (loops included: a jump back to
    a loop's head counts as a line), so a runaway loop ends here instead of holding its thread forever.
    """
    deadline = time.monotonic() + RENDER_DEADLINE_S

    def on_line(frame, event, arg):
        if time.monotonic() > deadline:
            raise TemplateTooCostly(f"the chat template ran longer than {RENDER_DEADLINE_S:g} s")
        return on_line

    def on_call(frame, event, arg):
        return on_line if frame.f_code.co_filename == _TEMPLATE_FILE else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        rendered = render()
    finally:
        sys.settrace(previous)
    if len(rendered) > MAX_PROMPT_CHARS:
        raise TemplateTooCostly(f"the chat template produced more than {MAX_PROMPT_CHARS} characters")
    return rendered


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
        compiled = _compile(template)
    except TemplateError as exc:
        raise BadRequest(f"invalid chat template: {exc}") from None
    try:
        return _within_deadline(
            lambda: compiled.render(
                messages=messages,
                tools=tools or None,
                add_generation_prompt=add_generation_prompt,
                bos_token=bos_token,
                eos_token=eos_token,
            )
        )
    except TemplateError as exc:
        raise BadRequest(f"chat template failed: {exc}") from None


CHILD_MEMORY_BYTES = 1 << 30  # address space of the child that renders a request's template
CHILD_TIMEOUT_S = 10.0  # its start (~0.2 s) and render (stopped at RENDER_DEADLINE_S), with room for a busy machine


def render_chat_isolated(
    template: str,
    messages: list[dict[str, Any]],
    *,
    tools: list | None = None,
    bos_token: str = "",
    eos_token: str = "",
) -> str:
    """`render_chat` in a child process limited in memory and CPU time (a template sent with a request)."""
    payload = json.dumps(
        {"template": template, "messages": messages, "tools": tools, "bos_token": bos_token, "eos_token": eos_token}
    )
    try:
        done = subprocess.run(  # noqa: S603 - our own interpreter and module, the request only on stdin
            [sys.executable, "-m", "appliance.models.template"],
            input=payload,
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise BadRequest(f"chat template failed: it ran longer than {CHILD_TIMEOUT_S:g} s") from None
    try:
        answer = json.loads(done.stdout)
    except ValueError:  # killed (memory, CPU) before it could answer
        raise BadRequest("chat template failed: it used more memory or CPU time than a template may") from None
    if "error" in answer:
        raise BadRequest(answer["error"])
    return answer["prompt"]


def _render_in_child() -> None:
    """The child of `render_chat_isolated`: limits itself, renders the request from stdin, answers on stdout."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY_BYTES, CHILD_MEMORY_BYTES))
    cpu = int(CHILD_TIMEOUT_S)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    request = json.load(sys.stdin)
    try:
        prompt = render_chat(
            request["template"],
            request["messages"],
            tools=request["tools"],
            bos_token=request["bos_token"],
            eos_token=request["eos_token"],
        )
    except BadRequest as exc:
        json.dump({"error": exc.message}, sys.stdout)
    except MemoryError:
        json.dump({"error": "chat template failed: it used more memory than a template may"}, sys.stdout)
    else:
        json.dump({"prompt": prompt}, sys.stdout)


_RESPONSE_MARK = "\x00response\x00"


def _render_go(template: str, messages: list[dict[str, Any]], tools: list | None) -> str:
    """Render as Ollama does: with `.Messages` when the template ranges over them, otherwise one
    System/Prompt/Response pass per turn, the last cut where the model's response begins."""
    try:
        compiled = _compile(template, True)
    except TemplateError as exc:
        raise BadRequest(f"invalid chat template: {exc}") from None
    system = "\n\n".join(m.get("content") or "" for m in messages if m.get("role") == "system")

    def render() -> str:
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

    try:
        return _within_deadline(render)
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


if __name__ == "__main__":
    _render_in_child()
