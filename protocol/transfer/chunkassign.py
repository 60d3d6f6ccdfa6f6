"""The assignment of a ``ChunkPlan`` (see ``chunkplan``, steps 1 to 4 of its
docstring): which idle chunk goes to which free source, random first, then
rarest first, then the partial holders, then endgame duplicates."""

from __future__ import annotations

import random

from .chunkpool import (
    IDLE_MASK,
    MAX_DUPLICATES,
    ST_IDLE,
    ST_INFLIGHT,
    PlanState,
    SourceEntry,
    all_ones,
)


class Assigner(PlanState):
    """``ChunkPlan``'s ``next_requests`` and the steps behind it."""

    def next_requests(self, now: float, rng: random.Random) -> list[tuple[str, int]]:
        """Fill every free slot; returns the ``(peer, chunk)`` requests to send."""
        out: list[tuple[str, int]] = []
        if self._verified == self._n:
            return out
        stalled = self._stalled_until
        free = [
            (peer, src)
            for peer, src in self._sources.items()
            if len(src.inflight) < src.cap and not (stalled and self._is_stalled(peer, now))
        ]
        if not free:
            return out
        if self._idle_count() > 0:
            self._assign_fresh(free, now, rng, out)
        if self._endgame and free and self._idle_count() == 0:
            self._assign_duplicates(free, now, rng, out)
        return out

    def _idle_count(self) -> int:
        return self._n - self._verified - len(self._chunk_peers)

    def _assign_fresh(
        self,
        free: list[tuple[str, SourceEntry]],
        now: float,
        rng: random.Random,
        out: list[tuple[str, int]],
    ) -> None:
        # Keys 0 and 1 hold chunks no partial source has: without a full
        # source, nobody has them.
        keys = sorted(k for k in self._buckets if k >> 1 or self._full)
        if self._random_left > 0:
            # Phase 1: uniformly random picks over every idle chunk that has a
            # holder, the preferred ones first (lazy Fisher-Yates over a copy;
            # O(idle), start-up only).
            for tier in (0, 1):
                pool = [c for k in keys if k & 1 == tier for c in self._buckets[k]]
                end = len(pool)
                while self._random_left > 0 and end and free:
                    j = rng.randrange(end)
                    end -= 1
                    pool[j], pool[end] = pool[end], pool[j]
                    if self._try_assign(pool[end], free, now, rng, out, duplicate=False):
                        self._random_left -= 1
        # Phase 2: rarest first, the preferred chunks first among equally
        # rare ones, random order within a bucket.  While a
        # free peer holds every chunk, walk the buckets (a lazy Fisher-Yates
        # inside each): every chunk examined is assignable, so a call costs
        # about one step per free slot.
        for key in keys:
            bucket = self._buckets.get(key)
            if bucket is None:
                continue
            pos = self._pos
            end = len(bucket)
            while end and _any_full(free):
                j = rng.randrange(end)
                end -= 1
                a, b = bucket[j], bucket[end]
                bucket[j], bucket[end] = b, a
                pos[b], pos[a] = j, end
                # _try_assign takes ``a`` out of the bucket; whatever moves
                # into slot ``end`` comes from the examined tail.
                self._try_assign(a, free, now, rng, out, duplicate=False)
            if not _any_full(free):
                break
        if free and self._idle_count() > 0:
            self._assign_to_partials(free, now, rng, out)

    def _assign_to_partials(
        self,
        free: list[tuple[str, SourceEntry]],
        now: float,
        rng: random.Random,
        out: list[tuple[str, int]],
    ) -> None:
        """Fill free partial holders, least busy first, each with its rarest
        idle chunks (random among equals).  O(n_chunks) per peer, in C but
        for the chunks the peer holds."""
        idle = int.from_bytes(self._state.translate(IDLE_MASK), "little")
        counts = self._partial_count
        for peer, src in sorted(free, key=lambda ps: len(ps[1].inflight)):
            if src.bits is None:
                continue  # a full holder left free here has nothing idle to take
            held_idle = idle & int.from_bytes(src.bits, "little")
            if not held_idle:
                continue
            by_count: dict[int, list[int]] = {}
            held_back = peer in self._held_back
            for c in all_ones(held_idle.to_bytes(self._n, "little")):
                if held_back and (self._full or counts[c] > 1):
                    continue  # another source holds it
                by_count.setdefault(counts[c], []).append(c)
            slots = src.cap - len(src.inflight)
            for key in sorted(by_count):
                group = by_count[key]
                while group and slots:
                    j = rng.randrange(len(group))
                    group[j], group[-1] = group[-1], group[j]
                    c = group.pop()
                    self._assign(peer, src, c, now, out, duplicate=False)
                    idle &= ~(1 << (8 * c))
                    slots -= 1
                if not slots:
                    break
        free[:] = [(p, s) for p, s in free if len(s.inflight) < s.cap]

    def _assign_duplicates(
        self,
        free: list[tuple[str, SourceEntry]],
        now: float,
        rng: random.Random,
        out: list[tuple[str, int]],
    ) -> None:
        singles: list[tuple[float, int]] = []
        for c, peers in self._chunk_peers.items():
            if len(peers) < MAX_DUPLICATES:
                singles.append((self._sources[peers[0]].inflight[c], c))
        singles.sort()
        for _, c in singles:
            if not free:
                return
            self._try_assign(c, free, now, rng, out, duplicate=True)

    def _try_assign(
        self,
        chunk: int,
        free: list[tuple[str, SourceEntry]],
        now: float,
        rng: random.Random,
        out: list[tuple[str, int]],
        *,
        duplicate: bool,
    ) -> bool:
        # Least busy first; at equal load a partial holder before a full one,
        # whose upload is the only way to the chunks no partial holder has.
        best: list[int] = []
        best_load = (self._per_peer, True)
        held_back = self._held_back
        for k, (peer, src) in enumerate(free):
            if not src.holds(chunk) or (duplicate and chunk in src.inflight):
                continue
            if held_back and peer in held_back and (duplicate or self._full + self._partial_count[chunk] > 1):
                continue
            load = (len(src.inflight), src.bits is None)
            if load < best_load:
                best_load = load
                best = [k]
            elif load == best_load:
                best.append(k)
        if not best:
            return False
        k = best[0] if len(best) == 1 else best[rng.randrange(len(best))]
        peer, src = free[k]
        self._assign(peer, src, chunk, now, out, duplicate=duplicate)
        if len(src.inflight) >= src.cap:
            del free[k]
        return True

    def _assign(
        self,
        peer: str,
        src: SourceEntry,
        chunk: int,
        now: float,
        out: list[tuple[str, int]],
        *,
        duplicate: bool,
    ) -> None:
        src.inflight[chunk] = now
        self._chunk_peers.setdefault(chunk, []).append(peer)
        if self._state[chunk] == ST_IDLE:
            self._unbucket(chunk)
            self._state[chunk] = ST_INFLIGHT
        self._stats["duplicates" if duplicate else "requests"] += 1
        out.append((peer, chunk))


def _any_full(free: list[tuple[str, SourceEntry]]) -> bool:
    return any(src.bits is None for _, src in free)
