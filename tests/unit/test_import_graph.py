"""kiln's modules import one another without circles, and the runtime reaches neither the compiler nor bench."""

from __future__ import annotations

import pytest

grimp = pytest.importorskip("grimp")


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("kiln")


def _circles(graph) -> list[list[str]]:
    """Groups of modules that import one another (strongly connected components of more than one module)."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        order[module] = low[module] = len(order)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in order:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], order[imported])
        if low[module] == order[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(graph.modules):
        if module not in order:
            visit(module)
    return found


def test_no_module_of_kiln_imports_itself_through_others(graph):
    assert _circles(graph) == []


@pytest.mark.parametrize("forbidden", ["kiln.compiler", "kiln.bench"])
def test_the_runtime_imports_neither_the_compiler_nor_bench(graph, forbidden):
    chains = graph.find_shortest_chains(importer="kiln.runtime", imported=forbidden, as_packages=True)
    assert chains == set()


def test_the_circle_finder_finds_a_circle():
    g = grimp.ImportGraph()
    for name in ("p", "p.a", "p.b", "p.c"):
        g.add_module(name)
    g.add_import(importer="p.a", imported="p.b")
    g.add_import(importer="p.b", imported="p.a")
    g.add_import(importer="p.c", imported="p.a")
    assert _circles(g) == [["p.a", "p.b"]]
