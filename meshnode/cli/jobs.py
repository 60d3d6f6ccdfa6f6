"""Pipelines from the command line (gsmodel's verbs).

``meshnode job FILE [--wait]`` submits a YAML or JSON pipeline, ``meshnode
job ID`` (or ``job-status ID``) shows a job, ``meshnode job cancel ID``
cancels one, ``meshnode job example [NAME]`` prints a pipeline to start from,
``meshnode jobs`` lists them, ``meshnode placement MODEL --device gpu``
shows where a step that names no node would run, and why not elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .client import ApiClient
from .render import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    as_dict,
    human_bytes,
    stderr_console,
    stdout_console,
)

__all__ = ["EXAMPLES", "call_job", "example_text", "follow_job", "render_job", "render_jobs", "render_placement", "run_example"]

EXAMPLES = ("deployment", "multi-model", "distributed-70b", "migration")
DOC_BYTES_MAX = 256 * 1024
FINAL = ("completed", "failed", "cancelled")
POLL_S = 0.5
_sleep: Callable[[float], None] = time.sleep


class UsageProblem(ValueError):
    pass


def example_text(name: str) -> str:
    if name not in EXAMPLES:
        raise UsageProblem(f"no example {name!r}: {', '.join(EXAMPLES)}")
    return (resources.files("meshnode") / "examples" / f"{name}.yaml").read_text()


def run_example(args: argparse.Namespace) -> int:
    """``meshnode example --output DIR``: gswarm's four pipelines, written as files."""
    out = args.output
    try:
        os.makedirs(out, exist_ok=True)
        for name in EXAMPLES:
            path = os.path.join(out, f"{name}.yaml")
            if os.path.exists(path) and not args.force:
                print(f"meshnode: error: {path} exists (--force replaces it)", file=sys.stderr)
                return 2
            with open(path, "w", encoding="utf-8") as f:
                f.write(example_text(name))
            print(path)
    except OSError as e:
        print(f"meshnode: error: cannot write to {out}: {e.strerror or e}", file=sys.stderr)
        return 2
    return EXIT_OK


def call_job(api: ApiClient, args: argparse.Namespace) -> Any:
    """``job FILE``, ``job ID`` or ``job cancel ID`` (``job example`` needs no peer)."""
    words: list[str] = args.target
    if words[0] == "cancel":
        if len(words) != 2:
            raise UsageProblem("usage: meshnode job cancel ID")
        return api.cancel_job(words[1])
    if len(words) != 1:
        raise UsageProblem("usage: meshnode job FILE | ID | cancel ID | example [NAME]")
    what = words[0]
    if os.path.isfile(what) or what.endswith((".yaml", ".yml", ".json")):
        try:
            with open(what, "rb") as f:
                data = f.read(DOC_BYTES_MAX + 1)
        except OSError as e:
            raise UsageProblem(f"cannot read {what}: {e.strerror or e}") from None
        return api.submit_pipeline(data)
    return api.job(what)


def _when(ms: Any) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ms / 1000)) if isinstance(ms, int) and ms > 0 else "-"


def _status(text: Any) -> Text:
    s = str(text or "-")
    style = {"completed": "green", "failed": "red", "upstream_failed": "red", "cancelled": "yellow",
             "running": "cyan", "waiting_node": "magenta"}.get(s, "")
    return Text(s, style=style)


def render_job(console: Console, data: Any, args: argparse.Namespace) -> None:
    j = as_dict(data)
    prog = as_dict(j.get("progress"))
    head = Text(f"job {j.get('job_id')} ")
    head.append_text(_status(j.get("status")))
    head.append(f": {j.get('name', '')} ({prog.get('completed', 0)} of {prog.get('total', 0)} steps completed; "
                f"taken by {j.get('submitted_by', '?')}, coordinated by {j.get('coordinator') or '-'})")
    console.print(head)
    table = Table(title_justify="left")
    for col in ("step", "type", "model", "devices", "status", "tries", "started", "finished", "error / note"):
        table.add_column(col, no_wrap=col in ("step", "status"))
    for a in j.get("actions") or []:
        a = as_dict(a)
        err = as_dict(a.get("error"))
        notes = [str(p.get("note")) for p in (a.get("parts") or []) if isinstance(p, dict) and p.get("note")]
        table.add_row(str(a.get("action_id")), str(a.get("action_type")), str(a.get("model_name") or "-"),
                      " ".join(str(d) for d in a.get("devices") or []) or "-", _status(a.get("status")),
                      str(a.get("attempts") or 0), _when(a.get("started_ms")), _when(a.get("finished_ms")),
                      f"{err.get('code')}: {err.get('message')}" if err else "; ".join(notes)[:120])
    console.print(table)
    if getattr(args, "verbose", False):
        _render_parts(console, j)
    if j.get("status") not in FINAL and j.get("job_id"):
        console.print(f"follow it with: meshnode job-status {j['job_id']}")


def _render_parts(console: Console, j: dict[str, Any]) -> None:
    """``job-status --verbose``: every part of every step (one per device, or the step itself)."""
    table = Table(title="parts", title_justify="left")
    for col in ("step", "node", "device", "status", "try", "transfer", "progress", "error / note"):
        table.add_column(col, no_wrap=col in ("step", "status"))
    for a in j.get("actions") or []:
        a = as_dict(a)
        for p in a.get("parts") or []:
            p = as_dict(p)
            err = as_dict(p.get("error"))
            total = p.get("bytes_total") or 0
            progress = f"{human_bytes(p.get('bytes_done') or 0)} of {human_bytes(total)}" if total else "-"
            table.add_row(str(a.get("action_id")), str(p.get("node") or "-"), str(p.get("device") or "-"),
                          _status(p.get("status")), str(p.get("attempt") or 0), str(p.get("transfer_id") or "-"),
                          progress, f"{err.get('code')}: {err.get('message')}" if err else str(p.get("note") or ""))
    console.print(table)


def render_jobs(console: Console, data: Any, args: argparse.Namespace) -> None:
    d = as_dict(data)
    items = d.get("jobs") or []
    table = Table(title=f"jobs ({d.get('total_count', len(items))})", title_justify="left")
    for col in ("id", "name", "status", "steps", "taken by", "submitted", "error"):
        table.add_column(col, no_wrap=col in ("id", "status"))
    for j in items:
        j = as_dict(j)
        prog = as_dict(j.get("progress"))
        err = as_dict(j.get("error"))
        table.add_row(str(j.get("job_id")), str(j.get("name")), _status(j.get("status")),
                      f"{prog.get('completed', 0)}/{prog.get('total', 0)}", str(j.get("submitted_by")),
                      _when(j.get("submitted_ms")),
                      f"{err.get('action_id')}: {err.get('code')}" if err else "")
    console.print(table)


def _room(v: Any) -> str:
    if not isinstance(v, int):
        return "-"
    return human_bytes(v) if v >= 0 else f"short by {human_bytes(-v)}"


def render_placement(console: Console, data: Any, args: argparse.Namespace) -> None:
    d = as_dict(data)
    console.print(f"{d.get('model_name')} on {d.get('device')}: "
                  f"{d.get('chosen') or 'no node fits'} (needs {human_bytes(int(d.get('needs_bytes') or 0))})")
    table = Table(title_justify="left")
    for col in ("rank", "node", "fits", "holds it", "room left", "why not"):
        table.add_column(col)
    for i, c in enumerate(d.get("ranking") or [], 1):
        c = as_dict(c)
        table.add_row(str(i), str(c.get("node_id")), "yes" if c.get("fits") else "no",
                      "yes" if c.get("holds_model") else "", _room(c.get("room_bytes")), "; ".join(c.get("reasons") or []))
    console.print(table)


def follow_job(api: ApiClient, first: Any, args: argparse.Namespace) -> int:
    """``--wait``: a line per step as its status changes; the table at the end;
    exit 0 when the job completed, 1 when it failed or was cancelled."""
    j = as_dict(first)
    jid = str(j.get("job_id", ""))
    if not jid:
        raise UsageProblem("the answer names no job")
    err = stderr_console()
    try:
        j = _follow(api, j, jid, err, args)
    except KeyboardInterrupt:
        print(f"meshnode: stopped waiting; job {jid} goes on in the mesh: follow it with "
              f"`meshnode job-status {jid}` (or `meshnode job-cancel {jid}` to stop it)", file=sys.stderr)
        return EXIT_INTERRUPTED
    if args.json:
        print(json.dumps(j, ensure_ascii=False))
    else:
        render_job(stdout_console(), j, args)
    return EXIT_OK if j.get("status") == "completed" else EXIT_ERROR


def _follow(api: ApiClient, j: dict[str, Any], jid: str, err: Console, args: argparse.Namespace) -> dict[str, Any]:
    """A line per step as its status changes, until the job ends; the job then."""
    seen: dict[str, str] = {}
    while True:
        for a in j.get("actions") or []:
            a = as_dict(a)
            aid, st = str(a.get("action_id")), str(a.get("status"))
            if seen.get(aid) != st:
                seen[aid] = st
                e = as_dict(a.get("error"))
                line = Text(f"{time.strftime('%H:%M:%S')} {aid} ")
                line.append_text(_status(st))
                if e:
                    line.append(f": {e.get('code')}: {e.get('message')}")
                if args.json:
                    print(json.dumps({"job_id": jid, "action_id": aid, "status": st}), flush=True)
                else:
                    err.print(line)
        if j.get("status") in FINAL:
            return j
        _sleep(POLL_S)
        j = as_dict(api.job(jid))
