"""The house has no import circle and the kernels do not import the ops that dispatch to them: the import graph
of grit_kernels read from the source (ast), module-level imports and (for triton/) function-level ones too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "grit_kernels"


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def import_graph(lazy: bool) -> dict[str, set[str]]:
    """``module -> grit_kernels modules it imports`` (at module level; ``lazy``: inside functions too)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, is_package) in modules.items():
        here = name.split(".") if is_package else name.split(".")[:-1]

        def visit(node, in_function):
            for child in ast.iter_child_nodes(node):
                nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                if isinstance(child, ast.ImportFrom):
                    base = (here[: len(here) - child.level + 1] if child.level else []) + (
                        child.module.split(".") if child.module else []
                    )
                    targets = [".".join([*base, alias.name]) for alias in child.names] + [".".join(base)]
                elif isinstance(child, ast.Import):
                    targets = [alias.name for alias in child.names]
                else:
                    visit(child, nested)
                    continue
                if in_function and not lazy:
                    continue
                for target in targets:
                    while target and target not in modules:
                        target = target.rpartition(".")[0]
                    if target and target != name and not (target.startswith(name + ".") or name.startswith(target + ".")):
                        graph[name].add(target)

        visit(ast.parse(path.read_text()), False)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            strong(v)
    return found


def test_graph_sees_imports():
    graph = import_graph(lazy=False)
    assert "grit_kernels._device" in graph["grit_kernels.triton.gram"]
    assert "grit_kernels.data.collate" in graph["grit_kernels.data.probe"]
    assert circles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_no_module_level_import_circle():
    assert circles(import_graph(lazy=False)) == []


def test_kernels_never_import_ops():
    graph = import_graph(lazy=True)
    back = {(m, t) for m, targets in graph.items() if m.startswith("grit_kernels.triton") for t in targets
            if t.startswith("grit_kernels.ops")}
    assert back == set()
    assert graph["grit_kernels._device"] == set()  # the leaf both sides import
