"""What the CLI prints about transfers: one started, the list, one in full,
and the progress bar ``--wait`` draws on a terminal.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

from .output import PROG, as_dict, as_number, human_bytes, human_duration, name_list, styled, when

__all__ = [
    "TRANSFER_FINAL",
    "TransferBar",
    "follow_hint",
    "render_transfer",
    "render_transfer_started",
    "render_transfers",
    "transfer_error",
    "transfer_target",
]

TRANSFER_FINAL = ("done", "failed")


def _transfer_percent(t: dict[str, Any]) -> str:
    total, done = as_number(t.get("bytes_total")), as_number(t.get("bytes_done"))
    if total and done is not None:
        return f"{min(100.0, 100.0 * done / total):.0f}%"
    return "100%" if t.get("status") == "done" else "-"


def _transfer_rate(t: dict[str, Any]) -> str:
    rate = as_number(t.get("rate_bps"))
    if not rate or t.get("status") in TRANSFER_FINAL:
        return "-"
    return f"{human_bytes(rate)}/s"


def _transfer_eta(t: dict[str, Any]) -> str:
    if t.get("status") == "done":
        return "0s"
    rate, total = as_number(t.get("rate_bps")), as_number(t.get("bytes_total"))
    done = as_number(t.get("bytes_done")) or 0.0
    if not rate or not total or t.get("status") == "failed":
        return "-"
    return human_duration(max(0.0, total - done) / rate)


def transfer_error(t: dict[str, Any]) -> str:
    """``"NO_SOURCE: no node holds ..."`` for a failed transfer."""
    err = t.get("error")
    if isinstance(err, dict):
        code = str(err.get("code") or "TRANSFER_FAILED")
        message = " ".join(str(err.get("message") or "the transfer failed").split())
        return f"{code}: {message}"
    if isinstance(err, str) and err.strip():
        return f"TRANSFER_FAILED: {' '.join(err.split())}"
    return "TRANSFER_FAILED: the transfer failed (the node gave no reason)"


def transfer_target(t: dict[str, Any]) -> str:
    return f"{t.get('model', '?')} -> {t.get('target_device', '?')}"


def follow_hint(transfer_id: Any, args: argparse.Namespace) -> str:
    hint = f"{PROG} transfer {transfer_id}"
    if getattr(args, "peer", None):
        hint += f" --peer {args.peer}"
    return hint


def render_transfer_started(console: Console, data: Any, args: argparse.Namespace) -> None:
    """download, copy and move without ``--wait``: what started and how to follow it."""
    t = as_dict(data)
    tid = t.get("transfer_id")
    if getattr(args, "quiet", False):
        if not tid:
            raise ValueError("the answer names no transfer_id")
        print(tid)
        return
    if not tid:
        console.print(f"requested {args.command} of {args.name!r}")
        return
    line = Text(f"transfer {tid} ")
    line.append_text(styled(t.get("status")))
    line.append(f": {transfer_target(t)}")
    sources = name_list(t.get("sources"))
    if sources:
        line.append(f" from {', '.join(sources)}")
    console.print(line)
    if t.get("status") == "failed":
        console.print(Text(transfer_error(t), style="red"))
    note = t.get("note")
    if note:
        console.print(f"note: {note}")
    if t.get("status") not in TRANSFER_FINAL:
        console.print(f"follow it with: {follow_hint(tid, args)}")


def render_transfers(console: Console, data: Any, args: argparse.Namespace) -> None:
    data = as_dict(data)
    items = data.get("transfers") or []
    table = Table(title=f"transfers ({data.get('total_count', len(items))})", title_justify="left")
    table.add_column("id", no_wrap=True)
    table.add_column("model", no_wrap=True)
    table.add_column("target device", no_wrap=True)
    table.add_column("status")
    table.add_column("progress", justify="right")
    table.add_column("rate", justify="right")
    table.add_column("sources")
    for item in items if isinstance(items, list) else []:
        t = as_dict(item)
        table.add_row(
            str(t.get("transfer_id", "-")),
            str(t.get("model", "-")),
            str(t.get("target_device", "-")),
            styled(t.get("status")),
            _transfer_percent(t),
            _transfer_rate(t),
            ", ".join(name_list(t.get("sources"))) or "-",
        )
    console.print(table)


def render_transfer(console: Console, data: Any, args: argparse.Namespace) -> None:
    t = as_dict(data)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    grid.add_row("transfer", Text(str(t.get("transfer_id", args.transfer_id)), style="bold"))
    grid.add_row("model", str(t.get("model", "-")))
    grid.add_row("target", str(t.get("target_device", "-")))
    grid.add_row("status", styled(t.get("status")))
    grid.add_row(
        "progress",
        f"{human_bytes(t.get('bytes_done'))} of {human_bytes(t.get('bytes_total'))} "
        f"({_transfer_percent(t)})",
    )
    grid.add_row("rate", _transfer_rate(t))
    grid.add_row("eta", _transfer_eta(t))
    grid.add_row(
        "chunks",
        f"{t.get('chunks_fetched', 0)} fetched, {t.get('chunks_resumed', 0)} resumed, "
        f"{t.get('bad_chunks', 0)} bad, of {t.get('chunks_total', '-')}",
    )
    if as_number(t.get("files_total")):
        grid.add_row("files", f"{t.get('files_done', 0)} of {t.get('files_total')}")
    grid.add_row("sources", ", ".join(name_list(t.get("sources"))) or "-")
    banned = name_list(t.get("banned"))
    if banned:
        grid.add_row("banned", Text(", ".join(banned), style="yellow"))
    if t.get("source"):
        grid.add_row("asked source", str(t["source"]))
    grid.add_row("started", when(t.get("started_ms")))
    if as_number(t.get("finished_ms")):
        grid.add_row("finished", when(t.get("finished_ms")))
    if t.get("status") == "failed" or t.get("error"):
        grid.add_row("error", Text(transfer_error(t), style="red"))
    if t.get("note"):
        grid.add_row("note", str(t["note"]))
    console.print(grid)


class TransferBar:
    """A rich progress bar on stderr for one transfer (only on a terminal)."""

    def __init__(self, console: Console, state: dict[str, Any]) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[detail]}"),
            console=console,
            transient=True,
        )
        self._task = self._progress.add_task(transfer_target(state), total=None, detail="")
        self._progress.start()
        self.update(state)

    def update(self, t: dict[str, Any]) -> None:
        total = as_number(t.get("bytes_total")) or None
        done = as_number(t.get("bytes_done")) or 0.0
        sources = ", ".join(name_list(t.get("sources"))) or "-"
        detail = (
            f"{human_bytes(done)}/{human_bytes(total)}  {_transfer_rate(t)}  "
            f"eta {_transfer_eta(t)}  [{t.get('status', '?')}] from {sources}{_files(t)}"
        )
        self._progress.update(
            self._task, total=total, completed=done, detail=detail, description=transfer_target(t)
        )

    def stop(self) -> None:
        self._progress.stop()


def _files(t: dict[str, Any]) -> str:
    """`` 3/6 files`` while a web source is fetched file by file; else nothing."""
    total = as_number(t.get("files_total"))
    return f"  {t.get('files_done', 0)}/{int(total)} files" if total else ""

