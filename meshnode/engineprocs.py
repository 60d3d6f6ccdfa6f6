"""An engine's process group, its port and its log, as the OS sees them.

The engine runs in a process group of its own; ``kill_group`` signals the
whole group, so no worker it forked survives.  ``proc_stat`` and
``group_members`` know the group by its id and start time from ``/proc``
(a pid the kernel reused is not taken for it); ``stop_orphans`` stops what
a killed earlier run of this node left.  ``bind_free`` asks whether a port
binds; ``bound_log`` keeps an engine's log under ``LOG_MAX``.  Everything
here blocks; ``meshnode.serving`` supervises the engines.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path

from protocol.serving import LOG_TAIL_CHARS

__all__ = [
    "LOG_KEEP",
    "LOG_MAX",
    "bind_free",
    "bound_log",
    "group_members",
    "kill_group",
    "log_tail",
    "proc_stat",
    "stop_orphans",
]

log = logging.getLogger("meshnode.serving")

LOG_MAX = 16 * 1024 * 1024  # an engine's log on disk, at most (about)
LOG_KEEP = 256 * 1024  # what stays when it is trimmed


def kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def proc_stat(pid: int) -> tuple[int, int] | None:
    """``(process group, start time in clock ticks since boot)`` of ``pid``,
    from ``/proc/PID/stat``; None when it is gone (a zombie is: it holds
    nothing but its exit status)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    rest = raw[raw.rfind(b")") + 2:].split()  # the name may hold spaces and parentheses
    try:
        return None if rest[0] in (b"Z", b"X") else (int(rest[2]), int(rest[19]))
    except (IndexError, ValueError):
        return None


def group_members(pgid: int, started: int) -> list[int]:
    """The processes of group ``pgid`` started no earlier than ``started``: an
    engine we ran and the workers it forked (a pid the kernel reused for
    something older, or another group, is not among them)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            st = proc_stat(int(d.name))
            if st is not None and st[0] == pgid and st[1] >= started:
                out.append(int(d.name))
    return out



def stop_orphans(run_dir: Path, drain_s: float) -> None:
    """Engines a killed earlier run of this node left: stopped, so they hold
    no GPU and no port.  An engine is known by the process group the node
    gave it and its start time (``/proc/PID/stat``), not its command line
    (a ``#!`` script runs as its interpreter); its record stays until no
    process of it is left.  Blocks: call it in a worker thread."""
    for pf in sorted(run_dir.glob("*.json")):
        try:
            info = json.loads(pf.read_text())
            pid, pgid, started = int(info["pid"]), int(info["pgid"]), int(info["start_ticks"])
        except (OSError, ValueError, KeyError, TypeError):
            pf.unlink(missing_ok=True)
            continue
        members = group_members(pgid, started)
        if members:
            log.warning("stopping engine pid %d (%s on port %s, %d processes) left by an earlier run of this "
                        "node", pid, info.get("model"), info.get("port"), len(members))
            kill_group(pgid, signal.SIGTERM)
            deadline = time.monotonic() + min(drain_s, 10.0)
            while group_members(pgid, started) and time.monotonic() < deadline:
                time.sleep(0.1)
            kill_group(pgid, signal.SIGKILL)
            deadline = time.monotonic() + 5.0
            while group_members(pgid, started) and time.monotonic() < deadline:
                time.sleep(0.05)
            if group_members(pgid, started):
                log.error("engine group %d (%s) survives SIGKILL; its record %s stays", pgid, info.get("model"),
                          pf.name)
                continue
        pf.unlink(missing_ok=True)


def bind_free(host: str, port: int) -> bool:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def bound_log(path: Path) -> None:
    """An engine's log is kept under ``LOG_MAX`` bytes: past it, only its tail
    stays (the engine appends with O_APPEND, so its next line lands after it)."""
    try:
        if path.stat().st_size <= LOG_MAX:
            return
        with open(path, "r+b") as f:
            f.seek(-LOG_KEEP, os.SEEK_END)
            tail = f.read()
            f.seek(0)
            f.write(b"[earlier lines dropped: the log is kept under %d bytes]\n" % LOG_MAX + tail)
            f.truncate()
    except OSError as e:
        log.warning("cannot trim the engine log %s: %s", path, e)


def log_tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - LOG_TAIL_CHARS, 0))
            return f.read().decode(errors="replace")[-LOG_TAIL_CHARS:]
    except OSError:
        return ""

