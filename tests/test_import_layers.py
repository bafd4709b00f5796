"""The package's import graph: no cycles, and no arrow up the layer order.

Every ``import`` of a kvpr_compile module is read with ``ast`` (absolute and relative, at the top
of a module or inside a function), without importing anything. The layers, lowest first:

    ops, config           the kvpr:: op schemas, fakes, node views, spec codec, split rule,
                          errors; the runtime switches (config.py)
    plan                  cost model and LPs (arithmetic over shapes and profiles)
    report                compile reports and one-time warnings (formats plans)
    passes, runtime       graph passes on Dynamo's graph / the store, kernels, lowered graphs;
                          neither imports the other
    everything else       backend, options, stages/, inner, cache, hf, cli, commands/, bench/, ...

A module may import its own group and any lower layer; groups of one layer below the top may not
import each other. ``python tests/test_import_layers.py [PACKAGE_DIR]`` prints the arrows between
groups and what breaks the rules (for another checkout's package, e.g. to compare layouts).
"""
from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path

import networkx as nx
import pytest

pytestmark = pytest.mark.quick

PACKAGE = "kvpr_compile"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

LAYERS = {"ops": 0, "config": 0, "plan": 1, "report": 2, "passes": 3, "runtime": 3}
TOP = 4   # any other group (a top-level module or subpackage)



def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package at ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imported(name: str, node: ast.AST, known: dict) -> list[str]:
    """The package modules an import statement in module ``name`` brings in."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == PACKAGE]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        is_package = known[name].name == "__init__.py"
        base_parts = name.split(".")[: len(name.split(".")) - node.level + is_package]
        base = ".".join(base_parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base.split(".")[0] != PACKAGE:
        return []
    # ``from pkg import mod`` imports the submodule; ``from mod import name`` the module itself
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


def import_graph(root: Path = ROOT) -> nx.DiGraph:
    known = modules(root)
    graph = nx.DiGraph()
    graph.add_nodes_from(known)
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target in _imported(name, node, known):
                if target in known and target != name:
                    graph.add_edge(name, target)
    return graph


def group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def rank(module: str) -> int:
    return LAYERS.get(group(module), TOP)


def upward(graph: nx.DiGraph) -> list[tuple[str, str]]:
    """Arrows to a higher layer, or between two groups of one layer below the top."""
    bad = []
    for a, b in graph.edges:
        if group(a) == group(b):
            continue
        if rank(b) > rank(a) or (rank(b) == rank(a) < TOP):
            bad.append((a, b))
    return sorted(bad)


def cycles(graph: nx.DiGraph) -> list[list[str]]:
    found = [c for c in nx.simple_cycles(graph)]
    return sorted(sorted(c) for c in found)


def group_arrows(graph: nx.DiGraph) -> Counter:
    """(group, group) -> number of module imports between them."""
    return Counter((group(a) or PACKAGE, group(b) or PACKAGE) for a, b in graph.edges
                   if group(a) != group(b))


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_arrow_up_the_layers():
    bad = upward(import_graph())
    assert not bad, "imports against the layer order:\n" + "\n".join(f"{a} -> {b}" for a, b in bad)


def test_the_layer_table_names_existing_groups():
    groups = {group(m) for m in modules(ROOT)}
    assert set(LAYERS) <= groups


def main(root: Path) -> int:
    graph = import_graph(root)
    print(f"arrows between groups of {root}:")
    for (a, b), n in sorted(group_arrows(graph).items()):
        mark = "  UP" if (LAYERS.get(b, TOP) > LAYERS.get(a, TOP) or (
            LAYERS.get(b, TOP) == LAYERS.get(a, TOP) < TOP)) else ""
        print(f"  {a:>10} -> {b:<10} {n:3d}{mark}")
    bad, found = upward(graph), cycles(graph)
    for a, b in bad:
        print(f"up: {a} -> {b}")
    for c in found:
        print("cycle: " + " <-> ".join(c))
    return 1 if bad or found else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT))
