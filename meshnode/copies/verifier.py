"""The verifier: every chunk of every copy read again and checked against
its manifest, slowly, and a copy a peer reported bad read again at once.

``protocol.verify.VerifySchedule`` decides which chunks and when: every
chunk once per ``--verify-period`` (a week; 0: no round robin), never more
than ``--verify-rate`` bytes a second in all.  This loop reads them in a
worker thread (``Store.verify_chunks``).  A chunk that does not match
withdraws its copy: the store forgets it and removes its files, the catalog
drops its record, so no peer pulls from it again.  The round robin's place
is saved now and then in ``<data-dir>/verify.json`` and taken up again at
the next start.

``request`` is the peer action ``verify_copy``: a peer that banned this
node for a bad chunk of a copy tells it (``Router.report_bad_chunk``), and
the copy is read from that chunk on, before anything else, at the rate's
pace; a copy at most once per ``URGENT_EVERY_S`` (a peer cannot make the
node read its store in a loop).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import trio

from protocol.verify import VerifySchedule

from ..errors import MeshError
from ..persist import atomic_write
from .catalog import CopyCatalog
from .store import Copy, Store

__all__ = ["Verifier", "copy_key"]

log = logging.getLogger("meshnode.verifier")

IDLE_S = 5.0  # a look at the copies at least this often when nothing is due
CURSOR_SAVE_S = 30.0  # the round robin's place reaches the disk at most this often
CURSOR_MAX_BYTES = 4096


def copy_key(c: Copy) -> str:
    """A copy's key for the schedule: another content (or tier) is another key."""
    return f"{c.manifest_hash}@{c.kind}"


class Verifier:
    def __init__(self, store: Store, copies: CopyCatalog, *, period_s: float, rate_bps: float,
                 cursor_path: Path | None, counts: dict[str, int] | None = None) -> None:
        self.store = store
        self.copies = copies
        self.schedule = VerifySchedule(period_s, rate_bps)
        self.cursor_path = cursor_path
        self.counts = counts if counts is not None else {}
        for name in ("verified_chunks", "verified_bytes", "bad_copies"):
            self.counts.setdefault(name, 0)
        self._wake = trio.Event()
        self._saved: tuple[str, int] | None = None
        self._warned_behind = False

    def _held(self) -> dict[str, Copy]:
        return {copy_key(c): c for c in self.store.copies()}

    # -- a peer's report ------------------------------------------------------------------

    def request(self, model: str, manifest_hash: str, chunk: int) -> dict[str, Any]:
        """Read this node's copies of ``model`` with ``manifest_hash`` again,
        from ``chunk`` on, before the round robin goes on."""
        held = [c for c in self.store.copies() if c.model == model and c.manifest_hash == manifest_hash]
        if not held:
            raise MeshError("COPY_NOT_FOUND", f"{self.store.node_id} holds no copy of {model!r} "
                                              f"with manifest {manifest_hash[:12]}")
        now = trio.current_time()
        taken = [c for c in held if self.schedule.urgent(copy_key(c), chunk, now)]
        for c in taken:
            log.warning("a peer reports chunk %d of the copy of %s on %s bad: reading it again now",
                        chunk, c.model, c.kind)
        if taken:
            self._wake.set()
        return {"model_name": model, "manifest_hash": manifest_hash,
                "verifying": [f"{self.store.node_id}:{c.kind}" for c in taken],
                "note": "" if len(taken) == len(held) else
                f"read again less than {self.schedule.urgent_every_s:g} s ago, or too many requests queued"}

    # -- the loop -------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.cursor_path is not None:
            saved = await trio.to_thread.run_sync(_read_cursor, self.cursor_path)
            if saved is not None and self.schedule.restore(*saved):
                self._saved = self.schedule.cursor
        task_status.started()
        last_save = trio.current_time()
        while True:
            try:
                await self.step()
            except Exception:  # one failed step is a log line; the next reads afresh
                log.exception("re-verifying a copy failed")
                await trio.sleep(IDLE_S)
            now = trio.current_time()
            if now - last_save >= CURSOR_SAVE_S:
                last_save = now
                await self._save_cursor()

    async def step(self) -> None:
        """Take the schedule's next step, or wait until one may be due."""
        held = self._held()
        d = self.schedule.decide({k: c.manifest for k, c in held.items()}, trio.current_time())
        if self.schedule.behind and not self._warned_behind:
            self._warned_behind = True
            log.warning("re-verifying every copy once per %g s needs %.0f bytes/s, above --verify-rate's %.0f: "
                        "a round takes longer", self.schedule.period_s, self.schedule.pace_bps,
                        self.schedule.rate_bps)
        if d.step is None:
            with trio.move_on_after(min(d.wait_s, IDLE_S) if math.isfinite(d.wait_s) else IDLE_S):
                await self._wake.wait()
            self._wake = trio.Event()
            return
        s = d.step
        c = held[s.key]
        try:
            bad = await trio.to_thread.run_sync(self.store.verify_chunks, c, s.first, s.count)
        except OSError as e:  # unreadable now (EIO, a file gone: the scrub sees to that)
            log.warning("could not read chunks %d-%d of the copy of %s on %s: %s", s.first, s.first + s.count - 1,
                        c.model, c.kind, e.strerror or e)
            return
        self.counts["verified_chunks"] += s.count
        self.counts["verified_bytes"] += s.nbytes
        if not bad:
            return
        log.warning("chunk(s) %s of the copy of %s on %s do not match its manifest (found %s): withdrawn",
                    ", ".join(map(str, bad[:8])), c.model, c.kind,
                    "at a peer's report" if s.urgent else "by the periodic re-verify")
        if await trio.to_thread.run_sync(self.store.withdraw, c):
            self.copies.withdraw(c.model, c.kind)
            self.copies.sample_storage()
            self.counts["bad_copies"] += 1

    async def _save_cursor(self) -> None:
        cur, path = self.schedule.cursor, self.cursor_path
        if cur is None or cur == self._saved or path is None:
            return
        try:
            await trio.to_thread.run_sync(lambda: atomic_write(
                path, json.dumps({"key": cur[0], "chunk": cur[1]}).encode(), durable=False))
            self._saved = cur
        except OSError as e:
            log.debug("could not save the re-verify's place: %s", e)


def _read_cursor(path: Path) -> tuple[object, object] | None:
    """The saved place of the round robin, or None (missing, too large, not JSON)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(CURSOR_MAX_BYTES + 1)
        doc = json.loads(raw) if len(raw) <= CURSOR_MAX_BYTES else None
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    return doc.get("key"), doc.get("chunk")
