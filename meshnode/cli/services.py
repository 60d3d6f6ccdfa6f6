"""Serving from the command line: ``meshnode serve MODEL --on node:gpu0
[--port P] [--engine E] [--arg A ...] [--wait]``, ``meshnode services`` (or
``ps``), ``meshnode stop-serve MODEL --on NODE [--port P]``."""

from __future__ import annotations

import argparse
import json
import shlex
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from .client import ApiClient, model_path
from .render import EXIT_ERROR, EXIT_OK, as_dict, stderr_console, stdout_console

__all__ = ["call_serve", "call_stop_serve", "follow_service", "render_service", "render_services", "render_stopped"]

POLL_S = 0.5
UNSEEN_S = 60.0  # how long a peer may not have heard of a service yet before serve --wait gives up
_sleep: Callable[[float], None] = time.sleep


def call_serve(api: ApiClient, args: argparse.Namespace) -> Any:
    body: dict[str, Any] = {"devices": [d.strip() for d in args.on.split(",") if d.strip()]}
    if args.port is not None:
        body["port"] = args.port
    config: dict[str, Any] = {}
    if args.engine:
        config["engine"] = args.engine
    if args.command_line:
        config["command"] = shlex.split(args.command_line)
    if args.arg:
        config["args"] = list(args.arg)
    if args.health_path:
        config["health_path"] = args.health_path
    if config:
        body["config"] = config
    return api.request("POST", model_path(args.name) + "/services", json=body)


def call_stop_serve(api: ApiClient, args: argparse.Namespace) -> Any:
    params = {"port": str(args.port)} if args.port is not None else None
    return api.request("DELETE", model_path(args.name) + f"/services/{args.on}", params=params)


def render_service(console: Console, data: Any, args: argparse.Namespace) -> None:
    s = as_dict(data)
    console.print(f"{s.get('model_name')} on {s.get('device')} port {s.get('port')}: {s.get('state')} "
                  f"({s.get('engine')}, {s.get('url')})")


def render_services(console: Console, data: Any, args: argparse.Namespace) -> None:
    d = as_dict(data)
    items = d.get("services") or []
    table = Table(title=f"services ({d.get('total_count', len(items))})", title_justify="left")
    for col in ("model", "device", "port", "engine", "state", "pid", "restarts", "url", "error"):
        table.add_column(col, no_wrap=col in ("model", "device", "url"))
    for s in items:
        s = as_dict(s)
        table.add_row(str(s.get("model_name")), str(s.get("device")), str(s.get("port")), str(s.get("engine")),
                      str(s.get("state")), str(s.get("pid") or "-"), str(s.get("restarts", 0)),
                      str(s.get("url") or "-"), str(s.get("error") or ""))
    console.print(table)


def render_stopped(console: Console, data: Any, args: argparse.Namespace) -> None:
    for s in as_dict(data).get("stopped") or []:
        s = as_dict(s)
        console.print(f"stopped {s.get('model_name')} on {s.get('device')} port {s.get('port')}")


def follow_service(api: ApiClient, first: Any, args: argparse.Namespace) -> int:
    """``serve --wait``: poll until the service is healthy (exit 0) or has
    failed (exit 1).  A service the asked peer has not heard of yet (gossip
    brings it from the node that runs it) is not stopped: it is waited for, up
    to ``UNSEEN_S``; one that was seen and is gone has stopped.  With
    ``--json`` the last record is printed as JSON (exit 0 when healthy)."""
    s = as_dict(first)
    node, port, last = s.get("node"), s.get("port"), s.get("state")
    err = stderr_console()
    err.print(f"{time.strftime('%H:%M:%S')} {s.get('model_name')} on {s.get('device')} port {port}: {last}")
    seen = False
    unseen_since = time.monotonic()
    while True:
        answer = as_dict(api.request("GET", model_path(args.name) + "/services"))
        mine = [as_dict(x) for x in answer.get("services") or [] if as_dict(x).get("node") == node
                and as_dict(x).get("port") == port]
        if mine:
            seen, state = True, mine[0].get("state")
        elif not seen and time.monotonic() - unseen_since < UNSEEN_S:
            state = last  # not heard of here yet
        else:
            state = "stopped"
        if state != last:
            last = state
            err.print(f"{time.strftime('%H:%M:%S')} {state}")
        if state in ("healthy", "error", "stopped"):
            if args.json:
                print(json.dumps(mine[0] if mine else {**s, "state": state}, indent=2, ensure_ascii=False))
            elif state == "healthy":
                render_service(stdout_console(), mine[0], args)
            if state == "healthy":
                return EXIT_OK
            if mine and not args.json:
                err.print(f"error: {mine[0].get('error')}")
                tail = str(mine[0].get("log_tail") or "").strip()
                if tail:
                    err.print("its log ends:\n" + tail[-1500:])
            elif not mine:
                err.print(f"error: {node} no longer lists the service on port {port}" if seen else
                          f"error: the peer never heard of the service on {node} port {port} in {UNSEEN_S:g} s")
            return EXIT_ERROR
        _sleep(POLL_S)
