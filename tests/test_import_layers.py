"""The import graph of `alignment/`: no cycles, no oversized files.

Every `import` and `from ... import` of every module counts, at the top of a file or inside a function (a
lazy import is a dependency all the same), and so does the package `__init__` that Python runs first when a
module outside that package imports one of its submodules. The graph is read from the source (`ast`), so
the test imports nothing it checks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "alignment"
MAX_LINES = 600
MAX_POLICY_LINES = 300


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, packages by their `__init__.py`."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of `name` that is one of `modules` (`pkg.mod.func` -> `pkg.mod`)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imported_modules(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `module` makes Python execute: what it imports, each such module's enclosing
    packages (their `__init__`) unless `module` is inside them, relative imports resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    named: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from pkg import submodule` names the submodule; `from pkg import x`, pkg
                named.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    edges = set()
    for name in named:
        target = _known(name, modules)
        if target is None:
            continue
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            enclosing = ".".join(parts[:i])
            if enclosing in modules and enclosing != module and not module.startswith(enclosing + "."):
                edges.add(enclosing)
    return edges


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = module_files(root)
    return {module: imported_modules(module, path, modules) for module, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_planted_cycle(tmp_path):
    """A three-module circle through a lazy import and a package `__init__`, and a clean chain beside it."""
    package = tmp_path / "alignment"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from alignment.sub.inner import X\n")
    (package / "sub" / "inner.py").write_text("X = 1\n")
    (package / "a.py").write_text("from alignment.sub.inner import X\n")  # runs alignment.sub's __init__ too
    (package / "b.py").write_text("def f():\n    from alignment import a\n")
    (package / "c.py").write_text("from . import b\n")
    graph = import_graph(package)
    assert graph["alignment.a"] == {"alignment.sub", "alignment.sub.inner"}
    assert cycles(graph) == []
    (package / "sub" / "inner.py").write_text("def g():\n    from alignment.c import f\n")
    assert cycles(import_graph(package)) == [["alignment.a", "alignment.b", "alignment.c", "alignment.sub",
                                              "alignment.sub.inner"]]


def test_no_import_cycle_in_alignment():
    found = cycles(import_graph())
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(component) for component in found)


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_no_file_over_the_size_limit(path):
    lines = len(path.read_text().splitlines())
    limit = MAX_POLICY_LINES if path.parent.name == "policy" else MAX_LINES
    assert lines <= limit, f"{path.relative_to(ROOT.parent)} has {lines} lines (limit {limit})"
