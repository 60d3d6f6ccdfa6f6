"""What the CLI prints: rich tables for people, one line per fact.

Every ``render_*`` takes the console, the peer's JSON answer and the parsed
arguments; they never call the network and never exit.  Values from a peer
are shown defensively (a missing or odd field prints ``-``), since the peer
may run another version.  ``--json`` bypasses all of this.

This module prints models, nodes and the cluster; ``transferview`` prints
transfers; ``output`` holds the exit codes, ``fail`` and the value helpers
every command shares (all re-exported here).
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .output import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    PROG,
    STATE_STYLES,
    UsageError,
    as_dict,
    as_number,
    errors_as_json,
    fail,
    human_bytes,
    human_duration,
    name_list,
    stderr_console,
    stdout_console,
    styled,
)
from .transferview import (
    TRANSFER_FINAL,
    TransferBar,
    follow_hint,
    render_transfer,
    render_transfer_started,
    render_transfers,
    transfer_error,
    transfer_target,
)

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "PROG",
    "TRANSFER_FINAL",
    "TransferBar",
    "UsageError",
    "as_dict",
    "as_number",
    "errors_as_json",
    "fail",
    "follow_hint",
    "human_bytes",
    "human_duration",
    "name_list",
    "render_availability",
    "render_delete",
    "render_info",
    "render_list",
    "render_nodes",
    "render_pin",
    "render_register",
    "render_status",
    "render_transfer",
    "render_transfer_started",
    "render_transfers",
    "render_unregister",
    "replicas_line",
    "stderr_console",
    "stdout_console",
    "transfer_error",
    "transfer_target",
]

# Leading hex digits of a manifest hash shown in tables (``--json`` has it all).
_HASH_SHOWN = 12


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
        counts.append(f"{nodes.get(state, 0)} {state}", style=STATE_STYLES[state])
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
            styled(node.get("state")),
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
            styled(model.get("status")),
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
    grid.add_row("status", styled(data.get("status")))
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
                          str(svc.get("engine") or "-"), styled(svc.get("state")))
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
                styled(copy.get("status")),
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
                    styled(loc.get("status")),
                    _yes_no(loc.get("online")),
                )
            )
        elif str(loc) not in seen:
            seen.add(str(loc))
            rows.append((str(loc), "-", "-", styled("recorded"), Text("-")))
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

