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
while their transfer runs (``written`` says how far each has got, None once
it ended), so transfers side by side cannot together pass the watermark.  Why a copy must stay is asked of
``keep_reason`` (the replica policy's ``min``, an engine serving from it, a
transfer reading or writing it), which the daemon wires to the parts that
know.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Container

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
Written = Callable[[str, str], "int | None"]  # (model, tier) -> bytes its transfer wrote so far; None: none runs


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
        # tier -> model -> bytes make_room let in for its transfer; at most one entry per
        # transfer in flight (the ended ones go at the next look).
        self._reserved: dict[str, dict[str, int]] = {}
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

    def reserved(self, kind: str, but: str | None = None) -> int:
        """Bytes still to come on ``kind`` from the transfers in flight (but
        ``but``'s); the reservations of transfers that ended are dropped."""
        mine = self._reserved.get(kind, {})
        left, ended = in_flight({m: b for m, b in mine.items() if m != but},
                                {m: self.written(m, kind) for m in mine if m != but})
        for m in ended:
            del mine[m]
        return left

    async def make_room(self, kind: str, model: str, incoming: int) -> None:
        """Room for ``incoming`` bytes of ``model`` on ``kind`` under its high
        watermark, beside what transfers in flight still write there: evicted
        first, or ``StoreError("NO_SPACE")``.  The bytes stay reserved until
        the transfer of ``model`` to ``kind`` ends."""
        marks = self.watermarks.get(kind)
        if marks is None or incoming <= 0:
            return
        async with self._lock:
            u = await trio.to_thread.run_sync(self.store.usage, kind)
            others = self.reserved(kind, but=model)
            e = plan_eviction(u["used"], u["free"], self.residents(kind, writing=model), marks, incoming, others)
            if not e.fits:
                raise StoreError("NO_SPACE", f"{self.store.node_id}:" + e.message(
                    kind, incoming, u["used"], u["used"] + u["free"], marks, others))
            if e.evict:
                await self._evict(kind, e.evict, f"making room for {model} ({incoming} bytes)")
            if self.written(model, kind) is not None:  # a transfer runs: its bytes are promised until it ends
                self._reserved.setdefault(kind, {})[model] = incoming

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
                e = plan_eviction(u["used"], u["free"], self.residents(kind), marks, reserved=self.reserved(kind))
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
