"""The layers of docs/architecture.md hold: no circle between hfhpc's packages and modules of the top
level, and the launcher and the recipes never import each other (imports for type checking only,
under ``if TYPE_CHECKING:``, are not dependencies)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def _unit(module: str) -> str:
    """``hfhpc.store.fetch`` → ``hfhpc.store``; ``hfhpc.spec`` stays itself."""
    return ".".join(module.split(".")[:2])


def _runtime_imports(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module is not None:
            name = node.module
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                name = ".".join(base[: len(base) - node.level + 1] + [node.module])
            found.add(name)
            found.update(f"{name}.{a.name}" for a in node.names)  # `from hfhpc import registry`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m.startswith("hfhpc.")}


def _graph() -> dict[str, set[str]]:
    modules = {}
    for path in (SRC / "hfhpc").rglob("*.py"):
        rel = path.relative_to(SRC).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        modules[name] = path
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for target in _runtime_imports(ast.parse(path.read_text()), name, path.name == "__init__.py"):
            if target in modules and _unit(target) != _unit(name):
                graph[_unit(name)].add(_unit(target))
    return graph


def test_no_circle_between_packages():
    graph = _graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_launcher_and_the_recipes_do_not_import_each_other():
    graph = _graph()
    assert "hfhpc.recipes" not in graph["hfhpc.launch"]
    assert "hfhpc.launch" not in graph["hfhpc.recipes"]
