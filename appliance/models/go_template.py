"""Ollama's Go chat templates, translated into Jinja2 so the same sandbox renders them.

Covers the subset that model templates use: `{{ .System }}`, `{{ .Prompt }}`, `{{ .Response }}`,
`{{ .Messages }}` with `range` (optionally `range $i, $m := ...`), `if`/`else if`/`else`/`end`,
`$x := ...`, `$.Field`, whitespace trimming (`{{-` and `-}}`), and the functions `eq ne lt le gt
ge and or not len index slice json`. Anything else is refused with a clear error rather than
rendered wrongly.
"""

from __future__ import annotations

import re

from appliance.errors import BadRequest

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)
_TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|`[^`]*`|[-+]?\d+(?:\.\d+)?|:=|,|[$.A-Za-z_][$.\w]*)')
_COMPARE = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}


class _Expression:
    """Parses one Go template pipeline (prefix function calls) into a Jinja expression."""

    def __init__(self, text: str, dot: str):
        self.tokens = self._tokenize(text)
        self.position = 0
        self.dot = dot

    @staticmethod
    def _tokenize(text: str) -> list[str]:
        tokens, index = [], 0
        while index < len(text):
            if text[index:].strip() == "":
                break
            match = _TOKEN.match(text, index)
            if not match:
                raise BadRequest(f"unsupported Go template syntax near '{text[index : index + 20]}'")
            tokens.append(match.group(1))
            index = match.end()
        return tokens

    def _peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def _next(self) -> str:
        piece = self._peek()
        if piece is None:
            raise BadRequest("incomplete Go template expression")
        self.position += 1
        return piece

    def parse(self) -> str:
        result = self._call()
        if self._peek() is not None:
            raise BadRequest(f"unsupported Go template syntax at '{self._peek()}'")
        return result

    def _call(self) -> str:
        piece = self._peek()
        if piece in _COMPARE or piece in ("and", "or", "not", "len", "index", "slice", "json"):
            name = self._next()
            args = []
            while self._peek() not in (None, ")"):
                args.append(self._atom())
            return self._function(name, args)
        return self._atom()

    def _atom(self) -> str:
        piece = self._next()
        if piece == "(":
            inner = self._call()
            if self._next() != ")":
                raise BadRequest("unbalanced parentheses in Go template")
            return f"({inner})"
        if piece.startswith('"'):
            return piece
        if piece.startswith("`"):
            return repr(piece[1:-1])
        if re.fullmatch(r"[-+]?\d+(?:\.\d+)?", piece):
            return piece
        return self.field(piece)

    def field(self, piece: str) -> str:
        if piece == ".":
            return self.dot
        if piece.startswith("$."):
            return "root" + piece[1:]
        if piece == "$":
            return "root"
        if piece.startswith("$"):
            return "v_" + piece[1:]
        if piece.startswith("."):
            return self.dot + piece
        raise BadRequest(f"unsupported Go template function or name '{piece}'")

    @staticmethod
    def _function(name: str, args: list[str]) -> str:
        if name in _COMPARE:
            if len(args) < 2:
                raise BadRequest(f"Go template '{name}' needs two arguments")
            if name == "eq" and len(args) > 2:
                return "(" + " or ".join(f"{args[0]} == {other}" for other in args[1:]) + ")"
            return f"({args[0]} {_COMPARE[name]} {args[1]})"
        if name in ("and", "or"):
            return "(" + f" {name} ".join(args) + ")"
        if name == "not" and len(args) == 1:
            return f"(not {args[0]})"
        if name == "len" and len(args) == 1:
            return f"({args[0]} | length)"
        if name == "json" and len(args) == 1:
            return f"({args[0]} | tojson)"
        if name == "index" and len(args) == 2:
            return f"{args[0]}[{args[1]}]"
        if name == "slice" and 2 <= len(args) <= 3:
            return f"{args[0]}[{args[1]}:{args[2] if len(args) == 3 else ''}]"
        raise BadRequest(f"Go template function '{name}' called with the wrong number of arguments")


def to_jinja(template: str) -> str:
    """Translate a Go template into an equivalent Jinja2 template (render it with `root` = the data)."""
    pieces: list[str] = []
    blocks: list[str] = []  # "if" or "range", to match each {{ end }}
    dots = ["root"]
    position = 0
    trim_next = False
    for match in _ACTION.finditer(template):
        literal = template[position : match.start()]
        if trim_next:
            literal = literal.lstrip()
        if match.group(1):
            literal = literal.rstrip()
        pieces.append(_literal(literal))
        trim_next = bool(match.group(3))
        position = match.end()
        action = match.group(2).strip()
        pieces.append(_translate_action(action, blocks, dots))
    tail = template[position:]
    pieces.append(_literal(tail.lstrip() if trim_next else tail))
    if blocks:
        raise BadRequest(f"Go template has an unclosed '{blocks[-1]}'")
    return "".join(pieces)


def _literal(text: str) -> str:
    """Literal text, protected from Jinja's own delimiters."""
    if not any(marker in text for marker in ("{{", "{%", "{#", "}}", "%}", "#}")):
        return text
    if "endraw" in text:
        raise BadRequest("Go template text contains Jinja delimiters that cannot be escaped")
    return "{% raw %}" + text + "{% endraw %}"


def _translate_action(action: str, blocks: list[str], dots: list[str]) -> str:
    if action.startswith("/*") or action == "":
        return ""
    word, _, rest = action.partition(" ")
    rest = rest.strip()
    if word == "if":
        blocks.append("if")
        return "{% if " + _Expression(rest, dots[-1]).parse() + " %}"
    if word == "else":
        if not blocks or blocks[-1] != "if":
            raise BadRequest("Go template 'else' outside an 'if'")
        if rest.startswith("if "):
            return "{% elif " + _Expression(rest[3:], dots[-1]).parse() + " %}"
        return "{% else %}"
    if word == "end":
        if not blocks:
            raise BadRequest("Go template has an 'end' without a block")
        kind = blocks.pop()
        if kind == "range":
            dots.pop()
            return "{% endfor %}"
        return "{% endif %}"
    if word == "range":
        blocks.append("range")
        variables = re.fullmatch(r"\$(\w+)\s*,\s*\$(\w+)\s*:=\s*(.+)", rest)
        if variables:
            index_name, item_name, source = variables.groups()
            collection = _Expression(source, dots[-1]).parse()
            dots.append(f"v_{item_name}")
            return f"{{% for v_{item_name} in {collection} %}}{{% set v_{index_name} = loop.index0 %}}"
        single = re.fullmatch(r"\$(\w+)\s*:=\s*(.+)", rest)
        if single:
            item_name, source = single.groups()
            dots.append(f"v_{item_name}")
            return f"{{% for v_{item_name} in {_Expression(source, dots[-2]).parse()} %}}"
        depth = len(dots)
        dots.append(f"item{depth}")
        return f"{{% for item{depth} in {_Expression(rest, dots[-2]).parse()} %}}"
    assignment = re.fullmatch(r"\$(\w+)\s*:?=\s*(.+)", action, re.DOTALL)
    if assignment:
        name, value = assignment.groups()
        return f"{{% set v_{name} = {_Expression(value, dots[-1]).parse()} %}}"
    if word in ("with", "define", "template", "block", "break", "continue"):
        raise BadRequest(f"Go template '{word}' is not supported")
    return "{{ " + _Expression(action, dots[-1]).parse() + " }}"
