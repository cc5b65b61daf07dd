"""The import direction of the layers (docs/architecture.md), checked on every module's imports, those made
inside functions included: the core imports neither `ingest` nor `web`; `ingest` imports only the core; the
use cases and wiring sit above both; only `appliance serve` reaches into `web`."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Above `ingest`: they wire it in (services), hand it uploads (documents), or run it over a corpus (operations).
USE_CASES = ("appliance.services", "appliance.documents", "appliance.answers.asking", "appliance.access.policy")
OPERATIONS = "appliance.operations"
EDGES = ("appliance.cli", "web")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _within(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _graph() -> dict[str, set[str]]:
    return {
        _module_name(path): _imports(path)
        for package in ("appliance", "ingest", "web")
        for path in (ROOT / package).rglob("*.py")
        if "migrations" not in path.parts
    }


def _violations(rule) -> list[str]:
    return sorted(
        f"{module} imports {target}"
        for module, targets in _graph().items()
        for target in targets
        if rule(module, target)
    )


def test_the_core_imports_neither_ingest_nor_the_edges():
    def upward(module: str, target: str) -> bool:
        if not module.startswith("appliance") or _within(module, *USE_CASES, OPERATIONS, *EDGES):
            return False
        return _within(target, "ingest", *EDGES, *USE_CASES, OPERATIONS)

    assert _violations(upward) == []


def test_ingest_imports_only_the_core():
    def upward(module: str, target: str) -> bool:
        return module.startswith("ingest") and _within(target, *EDGES, *USE_CASES, OPERATIONS)

    assert _violations(upward) == []


def test_only_serve_starts_the_web_edge_and_the_web_never_imports_the_cli():
    def across(module: str, target: str) -> bool:
        if module.startswith("web"):
            return _within(target, "appliance.cli")
        return _within(target, "web") and module != "appliance.cli.server"

    assert _violations(across) == []


def test_the_rule_sees_imports_made_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def later():\n    from ingest.pipeline import Ingestor\n    import web.app\n")
    assert {"ingest.pipeline", "ingest.pipeline.Ingestor", "web.app"} <= _imports(probe)
