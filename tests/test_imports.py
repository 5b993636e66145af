"""Imports inside tmcore run one way: no module imports (at the top or inside a function) a module
that imports it back, so each layer can be read, and loaded, without the ones above it."""

from __future__ import annotations

import ast
from pathlib import Path

import tmcore

PACKAGE = Path(tmcore.__file__).parent


def _module_graph() -> dict[str, set[str]]:
    """``module -> tmcore modules it imports`` for every module of the package (``testing.x``
    for the test kit), the package itself (``tmcore/__init__``) left out."""
    modules = {
        ".".join(p.relative_to(PACKAGE).with_suffix("").parts): p
        for p in PACKAGE.rglob("*.py")
        if p.name != "__init__.py" and "templates" not in p.parts
    }
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tmcore."):
                deps.add(node.module.removeprefix("tmcore."))
            elif isinstance(node, ast.ImportFrom) and node.module == "tmcore":
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name.removeprefix("tmcore.") for a in node.names if a.name.startswith("tmcore.")}
        graph[name] = deps & set(modules)
    return graph


def _a_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_imports_inside_tmcore_run_one_way():
    graph = _module_graph()
    assert {"plan", "state", "reducer", "runtime", "adapter", "api", "testing.conformance"} <= set(graph)
    assert _a_cycle(graph) is None, " -> ".join(_a_cycle(graph) or [])


def test_the_documented_order_holds():
    """plan -> tracing -> state -> reducer -> runtime -> adapter -> api (tmcore/runtime.py)."""
    graph = _module_graph()
    order = ["plan", "tracing", "state", "reducer", "runtime", "adapter", "api"]
    for i, low in enumerate(order):
        assert not graph[low] & set(order[i + 1 :]), f"{low} imports {sorted(graph[low] & set(order[i + 1 :]))}"
