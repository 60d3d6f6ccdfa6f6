"""The import contracts: the layers go one way, and no package imports in a circle.

``protocol`` is pure and imports nothing of ours; ``sim`` drives
``protocol`` and never imports the daemon; inside ``meshnode`` and
``protocol`` no module reaches itself through its imports, lazy and
``TYPE_CHECKING`` imports included (grimp sees every import statement).
"""

from __future__ import annotations

import ast
import pathlib

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



# The size rule (issue 28): no module over 600 lines and no function over 120
# lines in the three layers, unless one idea needs it and a comment there says
# why. Each exception is listed here with its reason; an entry is a path (the
# module is exempt from both limits) or "path::function" (that function only).
MODULE_LINES_MAX = 600
FUNCTION_LINES_MAX = 120
# path or path::function -> why one idea needs it (none today).
SIZE_EXCEPTIONS: dict[str, str] = {}
_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _breaches(rel: str) -> list[tuple[str, str]]:
    """(exception entry that would cover it, message) for each breach in one module."""
    src = (_ROOT / rel).read_text()
    out = []
    lines = len(src.splitlines())
    if lines > MODULE_LINES_MAX:
        out.append((rel, f"{rel}: {lines} lines (max {MODULE_LINES_MAX})"))
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None:
            length = node.end_lineno - node.lineno + 1
            if length > FUNCTION_LINES_MAX:
                out.append(
                    (f"{rel}::{node.name}", f"{rel}:{node.lineno} {node.name}: {length} lines (max {FUNCTION_LINES_MAX})")
                )
    return out


def _layer_modules() -> list[str]:
    return [p.relative_to(_ROOT).as_posix() for layer in ("protocol", "meshnode", "sim") for p in sorted((_ROOT / layer).rglob("*.py"))]


def test_modules_and_functions_stay_small() -> None:
    bad = [
        msg
        for rel in _layer_modules()
        if rel not in SIZE_EXCEPTIONS
        for entry, msg in _breaches(rel)
        if entry not in SIZE_EXCEPTIONS
    ]
    assert bad == []


def test_every_size_exception_is_still_needed() -> None:
    """An exception whose module or function now keeps the rule comes off SIZE_EXCEPTIONS."""
    stale = []
    for entry in SIZE_EXCEPTIONS:
        rel = entry.partition("::")[0]
        found = {e for e, _ in _breaches(rel)} if (_ROOT / rel).exists() else set()
        if not (found if entry == rel else entry in found):
            stale.append(entry)
    assert stale == []
