"""The evictor: this node's tiers kept under their high watermark, and its
store kept clean.

Every ``interval_s`` it

1. scrubs the store (``Store.scrub``): a copy removed or changed by hand is
   forgotten and its ``copy/`` record withdrawn, within one interval;
2. removes what transfers that no longer exist left in ``.partial`` after
   ``partial_keep_s`` (``Store.sweep_partials``);
3. runs the eviction rule (``protocol.eviction``) on each tier and deletes
   the least recently used copies it names.

Beside it, one copy at a time, it computes the sha256 digest of every copy
that has none yet (``Store.compute_digest``: the copy read once) and
publishes it in the copy's record (llama-orch's catalog shows it).

Before a transfer writes into a tier, ``make_room`` runs the same rule with
the incoming bytes counted: it evicts first, or raises ``NO_SPACE`` saying
which copies it could not evict and why.  The bytes it let in stay reserved
while their transfer runs, so transfers side by side cannot together pass
the watermark.  What a transfer has already put on the tier is measured,
not reported: the blocks allocated under its ``.partial`` entries
(``written`` names the transfer and its entries, None once it ended), so
resumed bytes, sparse files and progress counters never count twice.

Why a copy must stay is asked of ``keep_reason`` (the replica policy's
``min``, an engine serving from it, a transfer reading or writing it),
which the daemon wires to the parts that know.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Container, Sequence
from pathlib import Path

import trio

from protocol.eviction import Resident, Watermarks, in_flight, plan_eviction

from ..errors import MeshError
from .catalog import CopyCatalog
from .store import TIERS, Store, StoreError

__all__ = ["Evictor"]

log = logging.getLogger("meshnode.evictor")

DIGEST_RETRY_S = 600.0
DIGEST_RETRIES_KEPT = 1000

KeepReason = Callable[[str, str], "str | None"]  # (model, tier) -> why it must stay, or None
# (model, tier) -> the id of the transfer writing it and the paths it writes into; None: none runs
Written = Callable[[str, str], "tuple[str, Sequence[Path]] | None"]
ON_DISK_FILES_MAX = 200_000  # entries one measure walks (an S3 prefix holds at most 100,000 objects)


def on_disk(paths: Sequence[Path]) -> int:
    """Bytes allocated on disk under ``paths`` (as ``df`` counts them: a sparse
    file only for what was written), without following symlinks.  Blocking."""
    total, seen = 0, 0
    stack = list(paths)
    while stack and seen < ON_DISK_FILES_MAX:
        p = stack.pop()
        seen += 1
        try:
            st = os.lstat(p)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            try:
                stack.extend(Path(e.path) for e in os.scandir(p))
            except OSError:
                continue
        elif stat.S_ISREG(st.st_mode):
            total += st.st_blocks * 512
    return total


class Evictor:
    def __init__(self, store: Store, copies: CopyCatalog, watermarks: dict[str, Watermarks], *,
                 keep_reason: KeepReason, active_partials: Callable[[], Container[str]],
                 written: Written, interval_s: float, partial_keep_s: float) -> None:
        self.store = store
        self.copies = copies
        self.watermarks = watermarks
        self.keep_reason = keep_reason
        self.active_partials = active_partials
        self.written = written
        # tier -> model -> (the transfer's id, the bytes make_room let in for it); at most one
        # entry per transfer in flight (the ended ones go at the next look).
        self._reserved: dict[str, dict[str, tuple[str, int]]] = {}
        self.interval_s = interval_s
        self.partial_keep_s = partial_keep_s
        self._lock = trio.Lock()  # one eviction at a time: a sweep and a transfer's make_room
        self.counts = {"evicted_copies": 0, "scrubbed_copies": 0}
        self._digest_after: dict[str, float] = {}  # manifest hash -> when its failed digest is tried again
        self._warned: dict[str, float] = {}  # tier -> when "over, nothing to evict" was last logged

    def residents(self, kind: str, writing: str | None = None) -> list[Resident]:
        out = []
        for c in self.store.copies():
            if c.kind != kind:
                continue
            keep = "the model being written" if c.model == writing else self.keep_reason(c.model, kind)
            out.append(Resident(c.model, c.manifest.total_bytes, self.store.last_used(c.model, kind), keep))
        return out

    async def _evict(self, kind: str, models: tuple[str, ...], why: str) -> None:
        for model in models:
            c = self.store.get(model, kind)
            # Asked again: while the earlier deletes ran, an engine may have started on it.
            if c is None or self.keep_reason(model, kind) is not None:
                continue
            try:
                await self.copies.delete_local(model, kind)
            except (MeshError, OSError) as e:
                log.warning("could not evict %s from %s: %s", model, kind, e)
                continue
            self.counts["evicted_copies"] += 1
            log.info("evicted %s from %s (%d bytes, least recently used): %s", model, kind,
                     c.manifest.total_bytes, why)

    async def reserved(self, kind: str, but: str | None = None) -> int:
        """Bytes still to come on ``kind`` from the transfers in flight (but
        ``but``'s): what each was let in with less what it has on disk.  The
        reservations of transfers that ended (or were replaced by another
        transfer of the same model) are dropped."""
        mine = self._reserved.get(kind, {})
        written: dict[str, int | None] = {}
        for m, (tid, _) in list(mine.items()):
            if m == but:
                continue
            cur = self.written(m, kind)
            written[m] = None if cur is None or cur[0] != tid else await trio.to_thread.run_sync(on_disk, cur[1])
        left, ended = in_flight({m: size for m, (_, size) in mine.items() if m != but}, written)
        for m in ended:
            mine.pop(m, None)
        return left

    async def make_room(self, kind: str, model: str, incoming: int) -> None:
        """Room for ``incoming`` bytes of ``model`` on ``kind`` under its high
        watermark, beside what transfers in flight still write there: evicted
        first, or ``StoreError("NO_SPACE")``.  What the transfer already has on
        the tier (a resume) is in the tier's used bytes and not asked again.
        The bytes stay reserved until the transfer of ``model`` to ``kind`` ends."""
        marks = self.watermarks.get(kind)
        if marks is None or incoming <= 0:
            return
        async with self._lock:
            cur = self.written(model, kind)
            have = await trio.to_thread.run_sync(on_disk, cur[1]) if cur is not None else 0
            need = max(incoming - have, 0)
            u = await trio.to_thread.run_sync(self.store.usage, kind)
            others = await self.reserved(kind, but=model)
            e = plan_eviction(u["used"], u["free"], self.residents(kind, writing=model), marks, need, others)
            if need and not e.fits:
                raise StoreError("NO_SPACE", f"{self.store.node_id}:" + e.message(
                    kind, need, u["used"], u["used"] + u["free"], marks, others))
            if e.evict:
                await self._evict(kind, e.evict, f"making room for {model} ({need} bytes)")
            if cur is not None:  # a transfer runs: its bytes are promised until it ends
                self._reserved.setdefault(kind, {})[model] = (cur[0], incoming)

    async def sweep(self) -> None:
        broken = await trio.to_thread.run_sync(self.store.scrub)
        for c in broken:
            log.warning("the copy of %s on %s is no longer whole on disk (removed or changed by hand): "
                        "withdrawn from the catalog", c.model, c.kind)
            self.copies.withdraw(c.model, c.kind)  # the store deleted it already
            self.counts["scrubbed_copies"] += 1
        active = self.active_partials()
        removed = await trio.to_thread.run_sync(self.store.sweep_partials, active, self.partial_keep_s)
        for p in removed:
            log.info("removed %s: left by a transfer that no longer exists", p.name)
        for kind in TIERS:
            marks = self.watermarks.get(kind)
            if marks is None:
                continue
            async with self._lock:
                try:
                    u = await trio.to_thread.run_sync(self.store.usage, kind)
                except (OSError, StoreError):
                    continue
                e = plan_eviction(u["used"], u["free"], self.residents(kind), marks, reserved=await self.reserved(kind))
                if e.evict:
                    pct = 100 * u["used"] / max(u["used"] + u["free"], 1)
                    await self._evict(kind, e.evict, f"{kind} was {pct:.0f}% full, above its high watermark "
                                                     f"of {marks.high:.0%}; down to {marks.low:.0%}")
                elif e.over and trio.current_time() - self._warned.get(kind, -1e9) > 300:
                    self._warned[kind] = trio.current_time()
                    log.warning("%s is above its high watermark of %.0f%% and no copy here may be evicted%s",
                                kind, 100 * marks.high,
                                ": " + "; ".join(f"{m}: {why}" for m, why in e.kept[:8]) if e.kept else "")
        if broken or removed:
            self.copies.sample_storage()

    async def digest_one(self) -> bool:
        """Compute the digest of one copy that has none; False when every copy has one."""
        now = trio.current_time()
        for c in self.store.copies():
            if self.store.digest(c.model, c.kind) is not None or self._digest_after.get(c.manifest_hash, 0) > now:
                continue
            try:
                digest = await trio.to_thread.run_sync(self.store.compute_digest, c)
            except OSError as e:  # unreadable now: the others go first, this one again later
                log.warning("could not digest the copy of %s on %s: %s", c.model, c.kind, e)
                if len(self._digest_after) >= DIGEST_RETRIES_KEPT:
                    self._digest_after.clear()
                self._digest_after[c.manifest_hash] = now + DIGEST_RETRY_S
                return True
            if self.store.get(c.model, c.kind) is c:
                self.copies.publish(c)
                log.info("the copy of %s on %s has digest %s", c.model, c.kind, digest)
            return True
        return False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._digests)
            task_status.started()
            while True:
                try:
                    await self.sweep()
                except Exception:  # one bad sweep is a log line; the next reads the disk afresh
                    log.exception("a sweep of the store failed")
                await trio.sleep(self.interval_s)

    async def _digests(self) -> None:
        while True:
            try:
                more = await self.digest_one()
            except Exception:
                log.exception("computing a copy's digest failed")
                more = False
            if not more:
                await trio.sleep(self.interval_s)
