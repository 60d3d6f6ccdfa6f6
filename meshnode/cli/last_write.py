"""The causality token of the last write this user's CLI made, kept between
commands, so that `meshnode register m --peer a` and then `meshnode copy m
--peer b` work at once: b answers only once it has seen a's write.

It lives in ``$XDG_STATE_HOME/meshnode/last-write`` (``~/.local/state``
without it), owner-only, and is used for ``MAX_AGE_S`` after the write:
later, gossip has long carried it everywhere.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["MAX_AGE_S", "load", "path", "save"]

MAX_AGE_S = 60.0


def path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "meshnode" / "last-write"


def load() -> str | None:
    """The token of a write made less than ``MAX_AGE_S`` ago, if any."""
    p = path()
    try:
        if time.time() - p.stat().st_mtime > MAX_AGE_S:
            return None
        text = p.read_text(encoding="ascii").strip()
    except (OSError, UnicodeError):
        return None
    return text if 0 < len(text) <= 200 else None


def save(token: str | None) -> None:
    """Keep ``token``; a state directory that cannot be written costs only the wait."""
    if not token:
        return
    p = path()
    try:
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = p.with_name(f".last-write.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(token)
        os.replace(tmp, p)
    except OSError:
        pass
