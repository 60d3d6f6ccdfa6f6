"""The import contracts: the layers go one way, and no package imports in a circle.

``protocol`` is pure and imports nothing of ours; ``sim`` drives
``protocol`` and never imports the daemon; inside ``meshnode`` and
``protocol`` no module reaches itself through its imports, lazy and
``TYPE_CHECKING`` imports included (grimp sees every import statement).
"""

from __future__ import annotations

import grimp
import pytest

GRAPH = grimp.build_graph("meshnode", "protocol", "sim", "bench")


def _imports(prefix: str) -> set[tuple[str, str]]:
    return {
        (m, imported)
        for m in GRAPH.modules
        if m.startswith(prefix)
        for imported in GRAPH.find_modules_directly_imported_by(m)
    }


@pytest.mark.parametrize(("layer", "forbidden"), [("protocol", ("meshnode", "sim", "bench")), ("sim", ("meshnode", "bench"))])
def test_layers_import_one_way(layer: str, forbidden: tuple[str, ...]) -> None:
    bad = sorted((m, i) for m, i in _imports(layer) if i.split(".")[0] in forbidden)
    assert bad == []


def _cycles(prefix: str) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    mods = sorted(m for m in GRAPH.modules if m.startswith(prefix))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH.find_modules_directly_imported_by(v)):
            if not w.startswith(prefix):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for m in mods:
        if m not in index:
            visit(m)
    return out


@pytest.mark.parametrize("package", ["meshnode", "protocol", "sim"])
def test_no_import_cycles(package: str) -> None:
    assert _cycles(package) == []


def test_the_composition_root_is_imported_by_nobody_but_the_cli() -> None:
    importers = GRAPH.find_modules_that_directly_import("meshnode.daemon")
    # A bench script is a composition root of its own (bench/large_catalog.py
    # runs the daemon in-process to feed its catalog), as the tests are.
    importers = {m for m in importers if not m.startswith("bench.")}
    assert importers <= {"meshnode.cli.commands"}, importers
