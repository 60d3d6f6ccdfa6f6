"""What the CLI prints: rich tables for people, one line per fact.

Every ``render_*`` takes the console, the peer's JSON answer and the parsed
arguments; they never call the network and never exit.  Values from a peer
are shown defensively (a missing or odd field prints ``-``), since the peer
may run another version.  ``--json`` bypasses all of this.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

from protocol import units

PROG = "meshnode"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A problem with what the user typed that argparse could not see."""


_errors_as_json = False


def errors_as_json(on: bool) -> None:
    """``--json``: errors too are JSON, ``{"error": {"code", "message"}}`` (one line on stderr)."""
    global _errors_as_json
    _errors_as_json = on


def fail(message: str, code: int, error_code: str | None = None, **details: Any) -> int:
    """Print one error line on stderr; return ``code``.  No message holds the
    token: ``ApiClient`` refuses a token it could not send and redacts one a
    peer echoes.  ``error_code`` names the error for ``--json`` (the peer's
    code for an answer, else from the exit code)."""
    if _errors_as_json:
        name = error_code or ("USAGE" if code == EXIT_USAGE else "ERROR")
        print(json.dumps({"error": {"code": name, "message": message, "exit_code": code, **details}},
                         ensure_ascii=False), file=sys.stderr)
    else:
        print(f"{PROG}: error: {message}", file=sys.stderr)
    return code
TRANSFER_FINAL = ("done", "failed")

# Width for tables when stdout is not a terminal, so names are not folded.
_PIPE_WIDTH = 160


# Leading hex digits of a manifest hash shown in tables (``--json`` has it all).
_HASH_SHOWN = 12


_STATE_STYLES = {
    "alive": "green",
    "suspect": "yellow",
    "dead": "red",
    "left": "dim",
    "online": "green",
    "offline": "red",
    "ready": "green",
    "available": "green",
    "downloading": "yellow",
    "pending": "yellow",
    "registered": "cyan",
    "failed": "red",
    "error": "red",
    "queued": "yellow",
    "running": "cyan",
    "done": "green",
    "recorded": "dim",
}


def human_bytes(value: Any) -> str:
    """``1536`` -> ``"1.5 KiB"``; anything that is not a number -> ``"-"``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    return units.human_bytes(value)


def _styled(value: Any) -> Text:
    text = "-" if value is None else str(value)
    return Text(text, style=_STATE_STYLES.get(text.lower(), ""))


def name_list(items: Any) -> list[str]:
    """Lists of strings or of dicts (``{"device": ...}``, ``{"node_id": ...}``) -> strings."""
    if not isinstance(items, list):
        return []
    out: list[str] = []
    for item in items:
        if isinstance(item, dict):
            for key in ("device", "model_name", "name", "node_id", "id", "url", "endpoint"):
                if item.get(key) is not None:
                    out.append(str(item[key]))
                    break
            else:
                out.append(json.dumps(item, sort_keys=True))
        else:
            out.append(str(item))
    return out


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def stdout_console() -> Console:
    console = Console(file=sys.stdout, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(file=sys.stdout, highlight=False, width=_PIPE_WIDTH)
    return console


def render_status(console: Console, data: Any, args: argparse.Namespace) -> None:
    data = as_dict(data)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("node", str(data.get("node_id", "-")))
    grid.add_row("cluster", str(data.get("cluster", "-")))
    nodes = as_dict(data.get("nodes"))
    counts = Text()
    for state in ("alive", "suspect", "dead", "left"):
        if counts:
            counts.append("  ")
        counts.append(f"{nodes.get(state, 0)} {state}", style=_STATE_STYLES[state])
    grid.add_row("nodes", Text(f"{nodes.get('total', 0)} total  ").append_text(counts))
    models = as_dict(data.get("models"))
    grid.add_row(
        "models",
        f"{models.get('total', 0)} total  {models.get('replicated', 0)} replicated  "
        f"{models.get('single_node', 0)} on a single node",
    )
    for device, info in sorted(as_dict(data.get("storage")).items()):
        if isinstance(info, dict) and ("total" in info or "free" in info):
            grid.add_row(
                f"storage {device}",
                f"{human_bytes(info.get('free'))} free of {human_bytes(info.get('total'))} "
                f"({human_bytes(info.get('used'))} used)",
            )
    for extra in ("services", "jobs"):
        section = data.get(extra)
        if isinstance(section, dict) and section:
            grid.add_row(extra, "  ".join(f"{v} {k}" for k, v in section.items()))
        elif isinstance(section, int) and not isinstance(section, bool):
            grid.add_row(extra, str(section))
    console.print(grid)


def render_nodes(console: Console, data: Any, args: argparse.Namespace) -> None:
    data = as_dict(data)
    nodes = data.get("nodes") or []
    table = Table(title=f"nodes ({data.get('total_count', len(nodes))})", title_justify="left")
    table.add_column("node", no_wrap=True)
    table.add_column("address", no_wrap=True)
    table.add_column("state")
    table.add_column("models", justify="right")
    table.add_column("gpus", justify="right")
    table.add_column("VRAM free", justify="right")
    table.add_column("disk free", justify="right")
    verbose = getattr(args, "verbose", False)
    if verbose:
        for col in ("generation", "changed", "labels", "dram free", "each GPU"):
            table.add_column(col)
    for node in nodes:
        node = as_dict(node)
        disk = as_dict(as_dict(node.get("storage")).get("disk"))
        models = node.get("models")
        gpus = node.get("gpus")
        vram = "-"
        if isinstance(gpus, list) and gpus:
            cards = [as_dict(g) for g in gpus]
            free = sum(g.get("free_bytes") or 0 for g in cards if isinstance(g.get("free_bytes"), int))
            total = sum(g.get("total_bytes") or 0 for g in cards if isinstance(g.get("total_bytes"), int))
            vram = f"{human_bytes(free)} of {human_bytes(total)}"
            if as_dict(node.get("gpu_status")).get("stale"):
                vram += " (stale)"
        row: list[Any] = [
            str(node.get("node_id", "-")),
            str(node.get("address", "-")),
            _styled(node.get("state")),
            str(len(models)) if isinstance(models, list) else "-",
            str(len(gpus)) if isinstance(gpus, list) else "-",
            vram,
            human_bytes(disk.get("free")),
        ]
        if verbose:
            dram = as_dict(as_dict(node.get("storage")).get("dram"))
            labels = as_dict(node.get("labels"))
            cards = [as_dict(g) for g in gpus] if isinstance(gpus, list) else []
            row += [str(node.get("generation", "-")), f"{human_duration(node.get('last_change_s'))} ago",
                    ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-",
                    human_bytes(dram.get("free")) if dram else "-",
                    "; ".join(f"gpu{g.get('index')} {g.get('name') or ''} {human_bytes(g.get('free_bytes'))} free"
                              for g in cards) or "-"]
        table.add_row(*row)
    console.print(table)


def render_list(console: Console, data: Any, args: argparse.Namespace) -> None:
    data = as_dict(data)
    models = data.get("models") or []
    table = Table(title=f"models ({data.get('total_count', len(models))})", title_justify="left")
    table.add_column("model", no_wrap=True)
    table.add_column("type")
    table.add_column("size", justify="right")
    table.add_column("locations")
    table.add_column("services", justify="right" if not getattr(args, "verbose", False) else "left")
    table.add_column("status")
    for model in models:
        model = as_dict(model)
        services = model.get("services")
        if getattr(args, "verbose", False):  # each service: where, its port, engine and state
            shown = "; ".join(f"{as_dict(s).get('device')} port {as_dict(s).get('port')} {as_dict(s).get('engine')} "
                              f"{as_dict(s).get('state')}" for s in services or []) or "-"
        else:
            shown = str(len(services)) if isinstance(services, list) else "-"
        table.add_row(
            str(model.get("model_name", "-")),
            str(model.get("model_type") or "-"),
            human_bytes(model.get("size")),
            ", ".join(name_list(model.get("locations"))) or "-",
            shown,
            _styled(model.get("status")),
        )
    console.print(table)


def render_info(console: Console, data: Any, args: argparse.Namespace) -> None:
    data = as_dict(data)
    metadata = as_dict(data.get("metadata"))
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    grid.add_row("model", Text(str(data.get("model_name", args.name)), style="bold"))
    grid.add_row("type", str(data.get("model_type") or "-"))
    grid.add_row("status", _styled(data.get("status")))
    grid.add_row("size", human_bytes(data.get("size")))
    grid.add_row("source", str(data.get("source_url") or "-"))
    grid.add_row("registered by", str(data.get("registered_by") or "-"))
    grid.add_row("replicas", replicas_line(data.get("replicas")))
    grid.add_row("description", str(metadata.get("description") or "-"))
    tags = metadata.get("tags")
    grid.add_row(
        "tags", ", ".join(str(t) for t in tags) if isinstance(tags, list) and tags else "-"
    )
    requirements = as_dict(metadata.get("requirements"))
    if requirements:
        parts = []
        for key, value in requirements.items():
            shown = human_bytes(value) if key in ("min_memory", "min_vram") else str(value)
            parts.append(f"{key}={shown}")
        grid.add_row("requirements", "  ".join(parts))
    console.print(grid)

    rows = _copy_rows(data)
    if rows:
        table = Table(title=f"copies ({len(rows)})", title_justify="left")
        table.add_column("device", no_wrap=True)
        table.add_column("manifest", no_wrap=True)
        table.add_column("size", justify="right")
        table.add_column("status")
        table.add_column("online")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    else:
        console.print("copies: none")

    services = data.get("services")
    if isinstance(services, list) and services:
        table = Table(title="services", title_justify="left")
        for col in ("node", "device", "port", "engine", "state"):
            table.add_column(col, no_wrap=col in ("node", "device"))
        for svc in services:
            svc = svc if isinstance(svc, dict) else {}
            table.add_row(str(svc.get("node") or "-"), str(svc.get("device") or "-"), str(svc.get("port") or "-"),
                          str(svc.get("engine") or "-"), _styled(svc.get("state")))
        console.print(table)


def _short_hash(value: Any) -> str:
    return str(value)[:_HASH_SHOWN] if value else "-"


def _yes_no(value: Any) -> Text:
    if value is None:
        return Text("-")
    return Text("yes", style="green") if value else Text("no", style="red")


def _copy_rows(data: dict[str, Any]) -> list[tuple[str, str, str, Text, Text]]:
    """Rows for ``info``'s copies table: every entry of ``copies`` (device,
    manifest hash, size, status, online), then every location with no copy
    behind it (recorded by hand, or an older peer's plain list)."""
    rows: list[tuple[str, str, str, Text, Text]] = []
    seen: set[str] = set()
    copies = data.get("copies")
    for copy in copies if isinstance(copies, list) else []:
        if not isinstance(copy, dict):
            continue
        device = str(copy.get("device", "-"))
        seen.add(device)
        rows.append(
            (
                device,
                _short_hash(copy.get("manifest_hash") or copy.get("manifest")),
                human_bytes(copy.get("size")),
                _styled(copy.get("status")),
                _yes_no(copy.get("online")),
            )
        )
    locations = data.get("locations")
    for loc in locations if isinstance(locations, list) else []:
        if isinstance(loc, dict):
            device = str(loc.get("device", "-"))
            if device in seen:
                continue
            seen.add(device)
            rows.append(
                (
                    device,
                    _short_hash(loc.get("manifest_hash") or loc.get("manifest")),
                    human_bytes(loc.get("size")),
                    _styled(loc.get("status")),
                    _yes_no(loc.get("online")),
                )
            )
        elif str(loc) not in seen:
            seen.add(str(loc))
            rows.append((str(loc), "-", "-", _styled("recorded"), Text("-")))
    return rows


def render_register(console: Console, data: Any, args: argparse.Namespace) -> None:
    d = as_dict(data)
    if not d.get("replaced"):
        console.print(f"registered model {args.name!r}")
        return
    changed = name_list(d.get("changed"))
    what = f"changed: {', '.join(changed)}" if changed else "nothing changed"
    console.print(f"registered model {args.name!r} again, replacing its registration ({what})", soft_wrap=True)


def replicas_line(rep: Any) -> str:
    """``2 of 2..3 on disk (1 being copied; next: add n3)``, or ``not pinned``."""
    r = as_dict(rep)
    if not r:
        return "not pinned"
    pol, wanted = as_dict(r.get("policy")), as_dict(r.get("wanted"))
    text = f"{r.get('actual', 0)} of {wanted.get('min', '?')}..{wanted.get('max', '?')} on {pol.get('tier', 'disk')}"
    notes = []
    copying = name_list(r.get("copying_to"))
    if copying:
        notes.append(f"being copied to {', '.join(copying)}")
    if r.get("lost"):
        notes.append(f"{r.get('lost')} lost")
    if r.get("outside"):
        notes.append(f"{r.get('outside')} more outside the labels")
    spread = as_dict(r.get("spread"))
    covered, target = spread.get("covered"), spread.get("target")
    if isinstance(covered, int) and isinstance(target, int) and covered < target:
        notes.append(f"spread over {spread.get('label')}: {covered} of {target} values")
    if r.get("short"):
        notes.append(str(r.get("short")))
    return text + (f" ({'; '.join(notes)})" if notes else "")


def render_pin(console: Console, data: Any, args: argparse.Namespace) -> None:
    d = as_dict(data)
    rep = d.get("replicas")
    if rep is None:
        console.print(f"unpinned {args.name!r}: its copies stay where they are", soft_wrap=True)
    else:
        console.print(f"pinned {args.name!r}: {replicas_line(rep)}", soft_wrap=True)


def render_unregister(console: Console, data: Any, args: argparse.Namespace) -> None:
    d = as_dict(data)
    for s in d.get("stopped_services") or []:
        s = as_dict(s)
        console.print(f"stopped {s.get('model_name')} on {s.get('device')} port {s.get('port')}")
    console.print(f"unregistered model {args.name!r}")
    if not (args.purge or getattr(args, "force", False)):
        return
    deleted = name_list(d.get("deleted_copies"))
    console.print(f"deleted copies: {', '.join(deleted) if deleted else 'none'}", soft_wrap=True)
    pending = d.get("pending_copies")
    for p in pending if isinstance(pending, list) else []:
        p = as_dict(p)
        console.print(f"not yet deleted: {p.get('device', '-')}: {p.get('reason', '-')}", soft_wrap=True)


def render_delete(console: Console, data: Any, args: argparse.Namespace) -> None:
    d = as_dict(data)
    what = "deleted the copy on" if d.get("deleted_copy") else "dropped the location"
    console.print(f"{what} {d.get('device', args.on)} of {args.name!r}", soft_wrap=True)


def render_availability(console: Console, data: Any, args: argparse.Namespace) -> None:
    data = as_dict(data)
    nodes = as_dict(data.get("nodes"))
    table = Table(
        title=f"availability (catalog: {data.get('total_models', 0)} models)", title_justify="left"
    )
    table.add_column("node", no_wrap=True)
    table.add_column("address", no_wrap=True)
    table.add_column("online")
    table.add_column("models", justify="right")
    table.add_column("pools")
    for key in sorted(nodes):
        node = as_dict(nodes[key])
        online = node.get("online")
        models = node.get("models")
        table.add_row(
            str(node.get("node_id", key)),
            str(node.get("address", "-")),
            Text("yes", style="green") if online else Text("no", style="red"),
            str(len(models)) if isinstance(models, list) else "-",
            _pools(node.get("pools")),
        )
    console.print(table)
    replicated = name_list(data.get("replicated_models"))
    single = name_list(data.get("single_node_models"))
    console.print(f"replicated ({len(replicated)}): {', '.join(replicated) or '-'}")
    single_line = Text(f"single node ({len(single)}): {', '.join(single) or '-'}")
    if single:
        single_line.stylize("yellow")
    console.print(single_line)


def _pools(pools: Any) -> str:
    """llama-orch's pools as a person reads them: ``gpu0 ready (org/m), gpu1 idle``."""
    out = []
    for p in pools if isinstance(pools, list) else []:
        p = as_dict(p)
        models = ", ".join(str(m) for m in p.get("models") or [])
        out.append(f"gpu{p.get('gpu')} {'ready' if p.get('ready') else 'idle'}" + (f" ({models})" if models else ""))
    return "; ".join(out) or "-"


def as_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def human_duration(seconds: Any) -> str:
    """``83`` -> ``"1m23s"``; ``7500`` -> ``"2h05m"``; not a number -> ``"-"``."""
    value = as_number(seconds)
    if value is None or value < 0:
        return "-"
    total = round(value)
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


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


def _when(ms: Any) -> str:
    value = as_number(ms)
    if not value:
        return "-"
    return datetime.fromtimestamp(value / 1000).isoformat(sep=" ", timespec="seconds")


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
    line.append_text(_styled(t.get("status")))
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
            _styled(t.get("status")),
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
    grid.add_row("status", _styled(t.get("status")))
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
    grid.add_row("started", _when(t.get("started_ms")))
    if as_number(t.get("finished_ms")):
        grid.add_row("finished", _when(t.get("finished_ms")))
    if t.get("status") == "failed" or t.get("error"):
        grid.add_row("error", Text(transfer_error(t), style="red"))
    if t.get("note"):
        grid.add_row("note", str(t["note"]))
    console.print(grid)


def stderr_console() -> Console:
    return Console(file=sys.stderr, highlight=False)


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
