"""Modelfile parsing (Ollama's format): FROM, PARAMETER, TEMPLATE, SYSTEM, LICENSE, MESSAGE.

Values may be bare, "quoted" or \"\"\"triple-quoted\"\"\" (spanning lines). ADAPTER is refused with
a clear error: LoRA adapters are not supported yet.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from appliance.errors import BadRequest

# Option names and types a request's `options` / a Modelfile PARAMETER may carry (Ollama's set).
PARAMETER_TYPES: dict[str, type] = {
    "num_ctx": int,
    "num_batch": int,
    "num_gpu": int,
    "main_gpu": int,
    "num_thread": int,
    "use_mmap": bool,
    "num_keep": int,
    "seed": int,
    "num_predict": int,
    "top_k": int,
    "top_p": float,
    "min_p": float,
    "typical_p": float,
    "tfs_z": float,
    "repeat_last_n": int,
    "temperature": float,
    "repeat_penalty": float,
    "presence_penalty": float,
    "frequency_penalty": float,
    "mirostat": int,
    "mirostat_tau": float,
    "mirostat_eta": float,
    "penalize_newline": bool,
    "stop": list,
    "num_nodes": int,
}
# Bounds on numeric options (inclusive); a value outside is a clear 400, not a runner failure.
PARAMETER_BOUNDS: dict[str, tuple[float, float]] = {
    "num_ctx": (1, 1 << 20),
    "num_batch": (1, 1 << 16),
    "num_gpu": (-1, 100_000),
    "main_gpu": (0, 64),
    "num_thread": (0, 1024),
    "num_keep": (-1, 1 << 20),
    "num_predict": (-2, 1 << 20),
    "top_k": (0, 1 << 20),
    "top_p": (0.0, 1.0),
    "min_p": (0.0, 1.0),
    "typical_p": (0.0, 1.0),
    "tfs_z": (0.0, 1.0),
    "repeat_last_n": (-1, 1 << 20),
    "temperature": (0.0, 100.0),
    "repeat_penalty": (0.0, 100.0),
    "presence_penalty": (-100.0, 100.0),
    "frequency_penalty": (-100.0, 100.0),
    "mirostat": (0, 2),
    "mirostat_tau": (0.0, 100.0),
    "mirostat_eta": (0.0, 100.0),
    "num_nodes": (0, 64),
}


def coerce_parameter(name: str, value: Any) -> Any:
    """Convert one parameter to its type; unknown names are rejected (callers drop them for requests)."""
    kind = PARAMETER_TYPES.get(name)
    if kind is None:
        raise BadRequest(f"unknown parameter '{name}'")
    try:
        if kind is list:
            return [str(v) for v in value] if isinstance(value, list) else [str(value)]
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError(value)
        if isinstance(value, bool):
            raise ValueError(value)
        number = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise BadRequest(f"parameter '{name}' must be of type {kind.__name__}") from None
    low, high = PARAMETER_BOUNDS.get(name, (float("-inf"), float("inf")))
    if not low <= number <= high:
        raise BadRequest(f"parameter '{name}' must be between {low} and {high}")
    return number


@dataclass
class Modelfile:
    from_: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    template: str | None = None
    system: str | None = None
    license: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)


_COMMAND = re.compile(r"^\s*([A-Za-z]+)\s+(.*)$", re.DOTALL)


def _read_value(rest: str, lines: list[str], index: int) -> tuple[str, int]:
    """Read a value starting at `rest`; triple-quoted values may continue over following lines."""
    stripped = rest.strip()
    if stripped.startswith('"""'):
        body = stripped[3:]
        collected = []
        while True:
            end = body.find('"""')
            if end >= 0:
                collected.append(body[:end])
                return "\n".join(collected), index
            collected.append(body)
            index += 1
            if index >= len(lines):
                raise BadRequest('Modelfile: unterminated """ string')
            body = lines[index]
    if len(stripped) >= 2 and stripped[0] == stripped[-1] == '"':
        return json.loads(stripped) if "\\" in stripped else stripped[1:-1], index
    return stripped, index


def parse_modelfile(text: str) -> Modelfile:
    result = Modelfile()
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if not line.strip() or line.lstrip().startswith("#"):
            index += 1
            continue
        match = _COMMAND.match(line)
        if not match:
            raise BadRequest(f"Modelfile line {index + 1}: expected 'COMMAND value'")
        command, rest = match.group(1).upper(), match.group(2)
        if command == "PARAMETER":
            name, _, raw = rest.strip().partition(" ")
            value, index = _read_value(raw, lines, index)
            name = name.lower()
            coerced = coerce_parameter(name, value)
            if name == "stop":
                result.parameters.setdefault("stop", []).extend(coerced)
            else:
                result.parameters[name] = coerced
        elif command == "MESSAGE":
            role, _, raw = rest.strip().partition(" ")
            if role not in ("system", "user", "assistant"):
                raise BadRequest(f"Modelfile line {index + 1}: MESSAGE role must be system, user or assistant")
            value, index = _read_value(raw, lines, index)
            result.messages.append({"role": role, "content": value})
        elif command in ("FROM", "TEMPLATE", "SYSTEM", "LICENSE"):
            value, index = _read_value(rest, lines, index)
            attr = {"FROM": "from_", "TEMPLATE": "template", "SYSTEM": "system", "LICENSE": "license"}[command]
            setattr(result, attr, value)
        elif command == "ADAPTER":
            raise BadRequest("Modelfile: ADAPTER (LoRA) is not supported")
        else:
            raise BadRequest(f"Modelfile line {index + 1}: unknown command '{command}'")
        index += 1
    if not result.from_:
        raise BadRequest("Modelfile: FROM is required")
    return result


def _parameter_value(item: Any) -> str:
    if isinstance(item, str):
        return json.dumps(item)
    if isinstance(item, bool):
        return str(item).lower()
    return str(item)


def render_modelfile(
    name: str,
    from_: str,
    parameters: dict[str, Any],
    template: str | None,
    system: str | None,
    license_text: str | None,
) -> str:
    """The Modelfile that `show` prints for a stored model."""
    out = [
        "# Modelfile generated by appliance show",
        "# To build a new Modelfile based on this, replace FROM with:",
        f"# FROM {name}\n",
        f"FROM {from_}",
    ]
    if template:
        out.append(f'TEMPLATE """{template}"""')
    if system:
        out.append(f'SYSTEM """{system}"""')
    for key, value in parameters.items():
        for item in value if isinstance(value, list) else [value]:
            out.append(f"PARAMETER {key} {_parameter_value(item)}")
    if license_text:
        out.append(f'LICENSE """{license_text}"""')
    return "\n".join(out) + "\n"
