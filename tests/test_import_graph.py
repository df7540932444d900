"""kvprof's modules, and those of the plugins in this repository, import each other without a
cycle, read from the sources with ast.

Only imports that run when a module is imported count: those at module level or in a class
body, including inside `try` and plain `if`. Imports inside functions run later (kvprof defers
heavy or optional ones so on purpose) and imports under `if TYPE_CHECKING:` never run.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).parents[1]
PACKAGE_ROOT = REPOSITORY / "kvprof"
# the core and the plugins' packages in one graph: a plugin importing another (h2o -> transformers) counts
PACKAGE_ROOTS = [PACKAGE_ROOT, *sorted(init.parent for init in (REPOSITORY / "plugins").glob("**/__init__.py")
                                       if init.parent.name.startswith("kvprof_"))]


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_time_nodes(body: list[ast.stmt]):
    """The import statements of `body` that run when the module is imported."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If) and is_type_checking(node.test):
            yield from import_time_nodes(node.orelse)
        else:
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                children = getattr(node, field, None)
                if children:
                    yield from import_time_nodes(children)


def resolve(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: set[str]) -> set[str]:
    """The kvprof modules one import statement loads (`from a import b` loads a.b when b is a module)."""
    if isinstance(node, ast.Import):
        targets = {alias.name for alias in node.names}
    else:
        base = node.module or ""
        if node.level:
            anchor = importer.split(".") if is_package else importer.split(".")[:-1]
            anchor = anchor[: len(anchor) - node.level + 1]
            base = ".".join(anchor + ([base] if base else []))
        targets = {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}
    return {target for target in targets if target in modules}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(path, root): path for root in PACKAGE_ROOTS for path in root.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        graph[name] = set().union(*(resolve(node, name, is_package, set(files))
                                    for node in import_time_nodes(tree.body))) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path `[a, b, ..., a]`, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_kvprof_and_its_plugins_have_no_runtime_import_cycle() -> None:
    graph = import_graph()
    assert {"kvprof", "kvprof.errors", "kvprof.cli", "kvprof.trace.reader", "kvprof_h2o.plugin",
            "kvprof_streamingllm.policy", "kvprof_vllm.engine", "kvprof_transformers.runner"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_errors_imports_nothing() -> None:
    tree = ast.parse((PACKAGE_ROOT / "errors.py").read_text())
    assert not [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


@pytest.mark.parametrize("source, cycle", [
    ({"a": "from kvprof import b\n", "b": "import kvprof.a\n"}, ["kvprof.a", "kvprof.b", "kvprof.a"]),
    ({"a": "from kvprof.b import thing\n",
      "b": "try:\n    from kvprof.a import other\nexcept ImportError:\n    pass\n"},
     ["kvprof.a", "kvprof.b", "kvprof.a"]),
    ({"a": "from kvprof.b import thing\n", "b": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
      "    from kvprof.a import other\n"}, None),
    ({"a": "from kvprof.b import thing\n", "b": "def later():\n    from kvprof.a import other\n"}, None),
    ({"a": "from . import b\n", "b": "from .a import thing\n"}, ["kvprof.a", "kvprof.b", "kvprof.a"]),
])
def test_the_graph_sees_the_cycles_that_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            source: dict[str, str], cycle: list[str] | None) -> None:
    package = tmp_path / "kvprof"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, text in source.items():
        (package / f"{name}.py").write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE_ROOTS", [package])
    assert find_cycle(import_graph()) == cycle
