"""The package is laid out by layer, with no import cycle (lazy imports inside functions count)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "so2lib"
LAYERS = ("engine", "data", "phases", "runs", "views")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """``{module: {so2lib modules it imports}}``; package ``__init__`` re-exports are not followed
    (an edge to a package is an edge to the module named in ``from package import module``)."""
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in files else src for a in node.names]
            for t in targets:
                if t in files and t != mod and t != "so2lib":
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and (c := visit(v)):
                return c
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state and (c := visit(u)):
            return c
    return None


def test_cycle_finder_can_fail():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_modules_live_in_layer_folders():
    top = sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__")
    # only the pure statistics and the benchmark tool stay at the top
    assert top == ["bench", "stats"], top
    for layer in LAYERS:
        assert (PKG / layer / "__init__.py").read_text().startswith('"""'), f"{layer}/__init__.py needs a docstring"


def test_engine_depends_on_no_higher_layer():
    g = import_graph()
    for mod, deps in g.items():
        if mod.startswith("so2lib.engine"):
            bad = [d for d in deps if d.split(".")[1] in ("phases", "runs", "views")]
            assert not bad, f"{mod} imports {bad}"


@pytest.mark.parametrize("name", ["load_model", "second_order_effects", "projected_effects", "SecondOrderEngine",
                                  "Run", "encode", "label", "make_problem_set", "Template"])
def test_public_names_still_work(name):
    import so2lib

    assert hasattr(so2lib, name)
