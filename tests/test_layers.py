"""The package's shape, checked: no import circles, and the model layer knows nothing of runs.

Imports are read from the source (every one, at module level or inside a function, except those under
`if TYPE_CHECKING:`), so a circle hidden in a function-level import is still a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import batchstyle

PACKAGE = Path(batchstyle.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """The package modules a source imports, `from batchstyle.x import y` counting y when y is a module."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("batchstyle"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    graph = {}
    for name, path in paths.items():
        imported = _imports(ast.parse(path.read_text(encoding="utf-8")), modules)
        # A package's __init__ runs before its modules: importing batchstyle.model.x imports batchstyle.model.
        graph[name] = {m for m in imported if m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state = [], {}

    def walk(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                walk(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])
    return cycles


def test_the_package_has_no_import_circle() -> None:
    graph = import_graph()
    assert len(graph) > 20  # the walk found the package, sub-packages included
    assert _cycles(graph) == []


def test_the_walk_sees_circles_and_function_level_imports() -> None:
    modules = {"batchstyle.a", "batchstyle.b"}
    a = ast.parse("def f():\n    from batchstyle.b import thing\n")
    b = ast.parse("from batchstyle import a\nif TYPE_CHECKING:\n    from batchstyle.b import x\n")
    graph = {"batchstyle.a": _imports(a, modules), "batchstyle.b": _imports(b, modules)}
    assert graph == {"batchstyle.a": {"batchstyle.b"}, "batchstyle.b": {"batchstyle.a"}}
    assert _cycles(graph)


def test_the_model_layer_knows_nothing_of_runs_manifests_or_the_cli() -> None:
    graph = import_graph()
    outside = ("batchstyle.run", "batchstyle.manifest", "batchstyle.cli", "batchstyle.api", "batchstyle.report")
    for name, imported in graph.items():
        if name.startswith("batchstyle.model"):
            assert not [m for m in imported if m.startswith(outside)], name
