"""``meshnode top``: the mesh live in the terminal (status, nodes and their
GPUs, transfers, jobs, services), redrawn every ``--interval`` seconds from
one peer, until Ctrl-C or ``--count`` frames.  Off a terminal each frame is
printed after the last; with ``--json`` each is one JSON object a line.

The tables are the ones the single commands print (``status``, ``nodes``,
``transfers``, ``jobs``, ``services``): their render functions draw into a
console that keeps what they print instead of writing it.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from .client import ApiClient, ClientError
from .jobs import render_jobs
from .render import render_nodes, render_status, render_transfers, stdout_console
from .services import render_services

__all__ = ["run_top"]

ACTIVE = ("queued", "running")
TRANSFERS_SHOWN = 20  # the active ones first, then the latest finished

# What a frame reads, and how each part is drawn.
PARTS: tuple[tuple[str, Callable[[ApiClient], Any], Callable[[Console, Any, argparse.Namespace], None]], ...] = (
    ("status", lambda api: api.status(), render_status),
    ("nodes", lambda api: api.nodes(), render_nodes),
    ("transfers", lambda api: api.transfers(), render_transfers),
    ("jobs", lambda api: api.jobs(), render_jobs),
    ("services", lambda api: api.all_pages("/services", "services"), render_services),
)


class _Keep(Console):
    """A console that keeps the renderables printed to it."""

    def __init__(self, width: int) -> None:
        super().__init__(width=width)
        self.kept: list[RenderableType] = []

    def print(self, *objects: Any, **_kwargs: Any) -> None:
        self.kept.extend(o if not isinstance(o, str) else Text(o) for o in objects)


def _recent(transfers: Any) -> Any:
    """The active transfers, then the latest finished, at most ``TRANSFERS_SHOWN``."""
    if not isinstance(transfers, dict) or not isinstance(transfers.get("transfers"), list):
        return transfers
    items = [t for t in transfers["transfers"] if isinstance(t, dict)]
    active = [t for t in items if t.get("status") in ACTIVE]
    done = [t for t in items if t.get("status") not in ACTIVE][::-1]
    return {**transfers, "transfers": (active + done)[:TRANSFERS_SHOWN]}


def frame(api: ApiClient, args: argparse.Namespace, width: int) -> tuple[dict[str, Any], RenderableType]:
    """One snapshot of the mesh, and how it is drawn."""
    snap = {name: read(api) for name, read, _draw in PARTS}
    keep = _Keep(width)
    for name, _read, draw in PARTS:
        draw(keep, _recent(snap[name]) if name == "transfers" else snap[name], args)
    stamp = Text(f"{api.base_url} · {time.strftime('%H:%M:%S')} · every {args.interval:g} s · Ctrl-C to stop",
                 style="dim")
    return snap, Group(stamp, *keep.kept)


def run_top(api: ApiClient, args: argparse.Namespace) -> None:
    """Draw frames until Ctrl-C or ``--count``.  A failure to read the first
    frame is the command's error; later ones are shown, and it tries again."""
    console = stdout_console()
    snap, view = frame(api, args, console.width)
    frames = 1
    live = Live(view, console=console, auto_refresh=False, transient=False) if console.is_terminal and not args.json else None
    try:
        if live is not None:
            live.start(refresh=True)
        while True:
            if live is None:
                if args.json:
                    print(json.dumps(snap, ensure_ascii=False), flush=True)
                else:
                    console.print(view)
            if args.count is not None and frames >= args.count:
                return
            time.sleep(args.interval)
            try:
                snap, view = frame(api, args, console.width)
            except ClientError as exc:
                view = Text(f"{exc} (trying again in {args.interval:g} s)", style="red")
                snap = {"error": str(exc)}
            frames += 1
            if live is not None:
                live.update(view, refresh=True)
    finally:
        if live is not None:
            live.stop()
