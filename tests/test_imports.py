"""The package's imports point one way: no module needs, even lazily, a module that needs it back.

The graph is read from the source (ast), not by importing: every `import` / `from ... import` between
dyntree's own modules counts, at module level or inside a function, since an import placed in a function to
dodge a cycle is still a cycle in the design. Importing a package's submodule counts as an edge to that
submodule, not to the package's `__init__` (Python runs a parent package first whatever the order).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dyntree"


def package_modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package `__init__`)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def import_graph(modules: dict[str, tuple[Path, bool]]) -> dict[str, dict[str, int]]:
    """module -> {imported dyntree module: line of the first such import}."""
    graph: dict[str, dict[str, int]] = {}
    for name, (path, is_package) in modules.items():
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                # `from pkg import sub` imports the submodule; `from mod import name`, the module.
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
            for target in targets:
                if target in modules and target != name:
                    edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


GRAPH = import_graph(package_modules())


def test_the_reader_sees_imports_of_every_kind():
    """The graph reader resolves relative, parent-relative and function-level imports (or the test means
    nothing)."""
    assert "dyntree.errors" in GRAPH["dyntree.api"]  # from .errors import ...
    assert "dyntree.trees.buffers" in GRAPH["dyntree.proposers.dynamic"]  # from ..trees.buffers import ...
    assert "dyntree.bench.llamacpp" in GRAPH["dyntree.bench"]  # from . import llamacpp
    assert "dyntree.api" in GRAPH["dyntree.commands.generate"]  # inside `run`
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(
        f"{a} (line {GRAPH[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


@pytest.mark.parametrize("lower, upper", [
    ("dyntree.api", "dyntree.training"),  # the library does not need the trainer
    ("dyntree.eval.quality", "dyntree.cli"),  # measurements do not call the command line
    ("dyntree.eval.quality", "dyntree.commands"),
    ("dyntree.decoding", "dyntree.api"),
    ("dyntree.model", "dyntree.heads"),
])
def test_arrows_point_down(lower, upper):
    reached, todo = set(), [lower]
    while todo:
        for nxt in GRAPH[todo.pop()]:
            if nxt not in reached:
                reached.add(nxt)
                todo.append(nxt)
    wrong = sorted(m for m in reached if m == upper or m.startswith(upper + "."))
    assert not wrong, f"{lower} reaches {', '.join(wrong)}"


def test_import_dyntree_stays_light():
    """`import dyntree` loads neither the optional extras nor the trainer and the command line."""
    code = ("import sys, dyntree; print(' '.join(m for m in ('transformers', 'fastapi', 'uvicorn', 'matplotlib', "
            "'sacrebleu', 'accelerate', 'dyntree.training', 'dyntree.cli', 'dyntree.bench', 'dyntree.server') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == ""
