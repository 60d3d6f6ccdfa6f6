"""Transfer intents: ``<data-dir>/transfers/<id>.json``, one per transfer
that has not finished, so a restart (after a stop or a crash) resumes it."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

from ..errors import MeshError
from ..persist import atomic_write, make_dirs
from .transfer import Transfer

__all__ = ["Intents"]

log = logging.getLogger("meshnode.transfers")


class Intents:
    """Blocking file I/O (small files): call from a thread on a hot path."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def save(self, t: Transfer) -> None:
        """Raises ``MeshError`` NO_SPACE when the data dir is full (nothing half-written stays)."""
        try:
            atomic_write(self.dir / f"{t.id}.json", json.dumps(t.intent()).encode(), durable=False)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise MeshError("NO_SPACE", f"the data dir {self.dir.parent} is full: the transfer of {t.model!r} "
                                "was not started") from None
            raise MeshError("IO_ERROR", f"cannot save the transfer's intent in {self.dir}: {e.strerror}") from None

    def drop(self, t: Transfer) -> None:
        (self.dir / f"{t.id}.json").unlink(missing_ok=True)

    def load(self) -> list[Transfer]:
        """Every saved transfer, queued to resume; an unreadable intent is logged and removed."""
        make_dirs(self.dir)
        out = []
        for p in sorted(self.dir.glob("*.json")):
            try:
                out.append(Transfer.from_intent(json.loads(p.read_text())))
            except (OSError, ValueError) as e:
                log.error("ignoring unreadable transfer intent %s: %s", p.name, e)
                p.unlink(missing_ok=True)
        return out
