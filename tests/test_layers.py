"""The package's shape, checked: no import circles, the model layer knows nothing of runs, and the run layer
builds no losses.

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


# The model layer's entry points, the only model modules the run layer may import: a stylizer built (`build`,
# `numerics`), a stylization (`stylize`) and a clip's frames (`frames`), where targets come from and are kept
# (`targets`, `cache`, `export`, `graph`), the network's layout and weights, planning (`scales`, `tiles`, `memory`,
# `precision`), pixels to files (`pixels`), and from `optimize` the losses a stylization reports and the L-BFGS
# memory it plans with (never its Objective: `_is_loss_builder`). Losses, the temporal loss and its flows, the VGG
# trunk, colour transfer and the L-BFGS history are the model's own.
RUN_MAY_IMPORT = {
    f"batchstyle.model.{name}"
    for name in [
        "build",
        "cache",
        "export",
        "frames",
        "graph",
        "layout",
        "memory",
        "numerics",
        "optimize",
        "pixels",
        "precision",
        "scales",
        "stylize",
        "targets",
        "tiles",
        "weights",
    ]
}


def _is_loss_builder(name: str) -> bool:
    """A name that builds a loss: the objective, or a loss module (ContentLoss, TemporalLoss, ...)."""
    return name == "Objective" or name.endswith("Loss")


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


def _names_from(tree: ast.AST, prefix: str) -> set[str]:
    """The names a source imports from modules under `prefix` (`from batchstyle.model.x import Name` -> Name)."""
    return {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(prefix)
        for alias in node.names
    }


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    paths = _sources()
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
    outside = (
        "batchstyle.run",
        "batchstyle.manifest",
        "batchstyle.cli",
        "batchstyle.api",
        "batchstyle.report",
        "batchstyle.bench",
        "batchstyle.panel",
    )
    model = [name for name in graph if name.startswith("batchstyle.model.")]
    assert "batchstyle.model.frames" in model
    for name in model:
        assert not [m for m in graph[name] if m.startswith(outside)], name


def test_the_run_layer_builds_no_losses() -> None:
    """It reaches the model through its entry points only: no loss, temporal, feature or colour module, and no
    loss class by name from an entry point that also defines one (optimize's Objective)."""
    graph = import_graph()
    run = [name for name in graph if name.startswith("batchstyle.run.")]
    assert "batchstyle.run.clip" in run
    for name in run:
        model = {m for m in graph[name] if m.startswith("batchstyle.model")}
        assert model <= RUN_MAY_IMPORT, f"{name} imports {sorted(model - RUN_MAY_IMPORT)}"
        tree = ast.parse(_sources()[name].read_text(encoding="utf-8"))
        builders = sorted(n for n in _names_from(tree, "batchstyle.model") if _is_loss_builder(n))
        assert not builders, f"{name} imports {builders}"
    # The whitelist names modules that exist, so a renamed one cannot quietly widen or empty the rule.
    assert set(graph) >= RUN_MAY_IMPORT


def test_the_run_rule_sees_a_loss_module_and_a_loss_by_name() -> None:
    modules = {"batchstyle.model.temporal", "batchstyle.model.optimize", "batchstyle.run.x"}
    tree = ast.parse(
        "from batchstyle.model import temporal\ndef f():\n    from batchstyle.model.optimize import Objective, Losses\n"
    )
    assert _imports(tree, modules) - RUN_MAY_IMPORT == {"batchstyle.model.temporal"}
    assert {n for n in _names_from(tree, "batchstyle.model") if _is_loss_builder(n)} == {"Objective"}


def test_the_video_bench_measures_the_model_layers_frame_step_not_the_runs() -> None:
    """`bench video` times and measures frames as a worker makes them, through the model layer's own entry point, so
    its figures hold for any caller of it, and it needs no run, job or ledger to make them."""
    imported = import_graph()["batchstyle.bench_video"]
    assert "batchstyle.model.frames" in imported
    assert not [m for m in imported if m.startswith("batchstyle.run")]
