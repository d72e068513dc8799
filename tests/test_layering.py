"""The package's import graph: no cycles, and no module imports one above it.

Edges are every ``import`` of a latent_hops module anywhere in a module (also inside
functions: a lazy import is still a dependency), except those under ``if TYPE_CHECKING``
(annotations only, never run). A package's ``__init__`` imported implicitly as a parent is
not an edge."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "latent_hops"

LOW = {"latent_hops._version", "latent_hops.errors", "latent_hops.tables", "latent_hops.config"}
"""Modules at the bottom: they import no other latent_hops module but each other."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            inside |= {id(n) for child in node.body for n in ast.walk(child)}
    return inside


def imports(path: Path, modules: set[str]) -> set[str]:
    """The latent_hops modules ``path`` imports (``from pkg import sub`` counts ``pkg.sub``)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    here = module_name(path)
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("latent_hops")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("latent_hops"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return {m for m in found if m in modules and m != here}


def graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports(p, modules) for p in paths}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by depth-first search (each reported once, by its first module)."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_low_modules_import_nothing_above_them():
    edges = graph()
    assert {m: edges[m] - LOW for m in LOW if edges[m] - LOW} == {}


def test_nothing_imports_the_cli_or_the_package_root():
    edges = graph()
    assert sorted(m for m, deps in edges.items() if "latent_hops.cli" in deps) == []
    assert sorted(m for m, deps in edges.items() if "latent_hops.commands" in deps) == ["latent_hops.cli"]
    assert sorted(m for m, deps in edges.items() if "latent_hops" in deps) == []


def test_analyses_do_not_reach_up_to_runs_or_executors():
    edges = graph()
    up = {"latent_hops.run", "latent_hops.executors", "latent_hops.cli", "latent_hops.commands", "latent_hops.models"}
    bad = {m: deps & up for m, deps in edges.items() if m.startswith("latent_hops.analyses") and deps & up}
    assert bad == {}


def test_executors_do_not_import_the_cli():
    edges = graph()
    assert {m for m in edges if m.startswith("latent_hops.executors") and "latent_hops.cli" in edges[m]} == set()
