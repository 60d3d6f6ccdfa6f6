"""Chunk planning: which chunk of a manifest to fetch from which peer.

Theory of operation
-------------------
A receiver pulls one manifest's chunks from every source at once.  A source
is a peer that holds a complete copy (``set_source(peer, None)``) or one that
is itself mid-transfer and holds a subset (``set_source(peer, chunks)``,
updated as it announces progress, or ``add_source_chunks`` for the new ones
only).  ``ChunkPlan`` is the pure bookkeeping behind that: the I/O layer asks
it what to request, reports what happened, and sends/cancels the requests it
is told about.  No clock, no randomness of its own, no sockets.

Each chunk is MISSING (idle), INFLIGHT (requested from one peer, or two in
endgame) or VERIFIED.  The caller drives::

    expire(now)          -> requests stalled too long: cancel them
    next_requests(now, rng) -> (peer, chunk) pairs to request
    on_verified(peer, chunk, now) -> duplicate requests now redundant: cancel
    on_bad(peer, chunk, now)      -> True when that peer is now banned
    on_failed(peer, chunk, now)   -> the chunk goes back to the pool
    next_deadline()      -> when to call expire/next_requests again

``next_requests`` fills every free slot (a peer has fewer than
``per_peer_inflight`` requests in flight, is not banned and not stalled):

1. The first ``random_first`` picks of the plan's life are uniformly random
   among idle chunks that some free peer holds, so receivers that start
   together diverge and soon have chunks to trade with each other.
2. After that, rarest first: idle chunks in ascending order of how many
   (unbanned) sources hold them; among equally rare ones the chunks given
   to ``prefer`` first (the random picks too), then random order.  Rarity is kept per
   chunk and updated incrementally when a partial holder's set changes; a
   full holder raises every chunk equally, so it is one shared counter.
3. Each chunk goes to the free peer holding it with the fewest requests in
   flight, which spreads load over the sources; at equal load a partial
   holder before a full one (the full holders' upload is the only way to
   the chunks nobody else has yet), then at random.  Once no
   free peer holds every chunk, the free partial holders are filled least
   busy first, each with its own rarest idle chunks.
4. Endgame (when enabled): once *every* missing chunk is in flight, free
   slots duplicate in-flight chunks, oldest request first, at most two
   requests per chunk and never twice to one peer.  The first copy to verify
   wins; ``on_verified`` returns the other request so the caller cancels it.

Failures: ``on_failed`` (network error, refusal) returns the chunk to the
pool with no penalty.  ``on_bad`` (bytes that do not match the digest) also
counts a strike; at ``ban_after_bad`` strikes the peer is banned for the
plan's life: it gets nothing more, its requests are released and its chunks
no longer count toward rarity; ``bad_chunk(peer)`` says which chunk it last
served bad (for the reason a transfer gives).  ``expire`` releases requests in flight for
``stall_timeout_s`` with no progress (no verified chunk from their peer since
the request or the peer's last delivery, whichever is later: a source whose
upload is shared by many receivers is slow, not stalled) and marks their
peer stalled (no new requests) until ``now + stall_timeout_s``, so the chunk
goes to another holder.  With ``stall_factor`` the timeout is also at most
that many times the usual time a chunk takes here (an average of the
recent ones, from request to verified), but never under ``stall_floor_s``:
in a swarm whose chunks take half a second, a holder that died without a
word is given up in seconds, not at the full timeout.

``stuck(now)`` is true when chunks are missing and no unbanned, unstalled
source holds any of them (for example the only holder is gone): the caller
can fail the transfer with a clear reason, or wait until ``next_deadline()``
if a stall may end.

Bounds and cost: at most ``per_peer_inflight`` requests per peer and two
per chunk.  Each idle chunk sits in a bucket keyed by its partial-holder
count (``_pos`` makes moving it O(1)), so while some free peer holds every
chunk, ``next_requests`` costs about one step per request it makes.  Filling
a free partial holder scans its bitfield in C, then takes a Python step per
idle chunk it holds (O(n_chunks)); the first random picks copy the idle list
on each call until they are used up; ``set_source`` and ``stuck`` are
O(n_chunks); ``expire``, ``next_deadline`` and the endgame are O(requests in
flight).  Nothing is ever O(n_chunks x peers) outside the C scans.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Iterable

from ..errors import LocalProtocolError
from .chunkassign import Assigner
from .chunkpool import (
    MAX_CHUNKS,
    MAX_DUPLICATES,
    MAX_PER_PEER_INFLIGHT,
    MISSING_MASK,
    ST_IDLE,
    ST_INFLIGHT,
    ST_VERIFIED,
    SourceEntry,
    all_ones,
    check_peer,
    is_int,
)
from .chunksources import SourceBook

__all__ = ["MAX_CHUNKS", "ChunkPlan", "ChunkState", "PeerState", "choose_sources"]

_TOOK_WEIGHT = 0.25  # a source's chunk time: the weight of its newest chunk in the average
_VERIFIED_DIGIT = b"001" + bytes(253)  # state byte -> ASCII 1 when verified, else 0


class ChunkState(enum.Enum):
    MISSING = ST_IDLE
    INFLIGHT = ST_INFLIGHT
    VERIFIED = ST_VERIFIED


class PeerState(enum.Enum):
    UNKNOWN = "unknown"
    READY = "ready"  # a source with at least one free slot
    BUSY = "busy"  # a source whose slots are all in use
    STALLED = "stalled"
    BANNED = "banned"


class ChunkPlan(SourceBook, Assigner):
    """Chunk -> peer assignment for one transfer.  See the module docstring.

    The state and its primitives are in ``chunkpool``, the source methods in
    ``chunksources``, ``next_requests`` in ``chunkassign``: one plan, split
    by idea."""

    def __init__(
        self,
        n_chunks: int,
        have: Iterable[int] = (),
        *,
        per_peer_inflight: int = 4,
        stall_timeout_s: float = 10.0,
        ban_after_bad: int = 2,
        random_first: int = 4,
        endgame: bool = True,
        stall_factor: float = 0.0,
        stall_floor_s: float = 1.0,
    ) -> None:
        if not is_int(n_chunks) or not 0 <= n_chunks <= MAX_CHUNKS:
            raise LocalProtocolError(f"n_chunks must be an int in [0, {MAX_CHUNKS}]")
        if not is_int(per_peer_inflight) or not 1 <= per_peer_inflight <= MAX_PER_PEER_INFLIGHT:
            raise LocalProtocolError(
                f"per_peer_inflight must be an int in [1, {MAX_PER_PEER_INFLIGHT}]"
            )
        if not isinstance(stall_timeout_s, int | float) or not (
            math.isfinite(stall_timeout_s) and stall_timeout_s > 0
        ):
            raise LocalProtocolError("stall_timeout_s must be a finite number > 0")
        if not is_int(ban_after_bad) or ban_after_bad < 1:
            raise LocalProtocolError("ban_after_bad must be an int >= 1")
        if not is_int(random_first) or random_first < 0:
            raise LocalProtocolError("random_first must be an int >= 0")
        for name, v in (("stall_factor", stall_factor), ("stall_floor_s", stall_floor_s)):
            if not isinstance(v, int | float) or not (math.isfinite(v) and v >= 0):
                raise LocalProtocolError(f"{name} must be a finite number >= 0")
        self._n = n_chunks
        self._per_peer = per_peer_inflight
        self._stall_max_s = self._stall_s = float(stall_timeout_s)
        self._stall_factor = float(stall_factor)
        self._stall_floor_s = float(stall_floor_s)
        self._took_s: float | None = None  # the recent time a chunk took, from request to verified
        self._ban_after = ban_after_bad
        self._random_left = random_first
        self._endgame = bool(endgame)

        self._state = bytearray(n_chunks)  # ST_IDLE / ST_INFLIGHT / ST_VERIFIED
        self._verified = 0
        self._chunk_peers: dict[int, list[str]] = {}  # in-flight chunk -> peers (<= 2)
        self._sources: dict[str, SourceEntry] = {}
        self._full = 0  # sources holding every chunk
        self._partial_count = [0] * n_chunks  # partial sources holding each chunk
        self._other = bytearray(n_chunks)  # 1: not among the preferred chunks (prefer())
        # Idle chunks, bucketed by key 2 * partial count (rarity minus the full
        # sources) + 1 when not preferred: each bucket is an unordered list,
        # ``_pos[c]`` is c's index in its bucket, so add/remove/move and a
        # uniform draw are all O(1).
        self._buckets: dict[int, list[int]] = {}
        self._pos = [0] * n_chunks
        self._strikes: dict[str, int] = {}
        self._last_bad: dict[str, int] = {}  # peer -> the last chunk it served bad (one per struck peer)
        self._banned: set[str] = set()
        self._stalled_until: dict[str, float] = {}
        self._held_back: frozenset[str] = frozenset()  # sources asked only for what no other source holds
        self._stats = {
            "requests": 0,
            "duplicates": 0,
            "verified_by_peers": 0,
            "redundant": 0,
            "bad": 0,
            "failed": 0,
            "expired": 0,
        }
        for c in have:
            self._check_chunk(c)
            if self._state[c] != ST_VERIFIED:
                self._state[c] = ST_VERIFIED
                self._verified += 1
        idle = [c for c in range(n_chunks) if self._state[c] == ST_IDLE]
        if idle:
            self._buckets[0] = idle
            for i, c in enumerate(idle):
                self._pos[c] = i

    # -- outcomes -----------------------------------------------------------

    def on_verified(self, peer: str, chunk: int, now: float) -> list[tuple[str, int]]:
        """Chunk ``chunk`` from ``peer`` matched its digest and was stored.

        Returns the other requests for that chunk (endgame duplicates), now
        redundant and released: the caller should cancel them.
        """
        self._check_chunk(chunk)
        src = self._sources.get(peer)
        if src is not None and now > src.delivered_at:
            src.delivered_at = now
        if src is not None and chunk in src.inflight:
            took = max(0.0, now - src.inflight[chunk])
            src.took_s = took if src.took_s is None else (1 - _TOOK_WEIGHT) * src.took_s + _TOOK_WEIGHT * took
            src.took_n += 1
        if self._stall_factor and src is not None and chunk in src.inflight:
            self._took_s = took if self._took_s is None else 0.9 * self._took_s + 0.1 * took
            self._stall_s = min(self._stall_max_s, max(self._stall_floor_s, self._stall_factor * self._took_s))
        self._release(peer, chunk)
        if self._state[chunk] == ST_VERIFIED:
            return []
        others = [(p, chunk) for p in self._chunk_peers.get(chunk, ())]
        for p, c in others:
            self._release(p, c)
        if self._state[chunk] == ST_IDLE:
            self._unbucket(chunk)
        self._state[chunk] = ST_VERIFIED
        self._verified += 1
        self._stats["verified_by_peers"] += 1
        self._stats["redundant"] += len(others)
        return others

    def on_bad(self, peer: str, chunk: int, now: float) -> bool:
        """``peer`` sent bytes that do not match the digest: a strike.

        Returns True when the peer is banned (now or before).  A newly banned
        peer's other requests are released; the caller should cancel
        everything it still has outstanding with that peer.
        """
        self._check_chunk(chunk)
        check_peer(peer)
        self._release(peer, chunk)
        self._stats["bad"] += 1
        strikes = self._strikes.get(peer, 0) + 1
        self._strikes[peer] = strikes
        self._last_bad[peer] = chunk
        if peer not in self._banned and strikes >= self._ban_after:
            self._banned.add(peer)
            self._stalled_until.pop(peer, None)
            if peer in self._sources:
                self._drop_source(peer)
        return peer in self._banned

    def on_failed(self, peer: str, chunk: int, now: float, *, backoff_s: float = 0.0) -> None:
        """The request failed (network error, refusal): the chunk goes back.

        No strike.  ``backoff_s > 0`` also keeps the peer from new requests
        until ``now + backoff_s`` (like a stall).
        """
        self._check_chunk(chunk)
        self._release(peer, chunk)
        self._stats["failed"] += 1
        if backoff_s > 0 and peer in self._sources:
            until = now + backoff_s
            if until > self._stalled_until.get(peer, -math.inf):
                self._stalled_until[peer] = until

    def expire(self, now: float) -> list[tuple[str, int]]:
        """Release requests that made no progress for ``stall_timeout_s``.

        A request's stall clock starts when it is made and restarts whenever
        its peer delivers a verified chunk (``on_verified``): a peer whose
        upload is shared by many requests is slow, not stalled.  Their peers
        are stalled (no new requests) until ``now + stall_timeout_s``.
        Returns the released requests so the caller can cancel them.
        """
        for peer in [p for p, t in self._stalled_until.items() if t <= now]:
            del self._stalled_until[peer]
        expired = [
            (peer, c)
            for peer, src in self._sources.items()
            for c, started in src.inflight.items()
            if now >= max(started, src.delivered_at) + self._stall_s  # as in next_deadline()
        ]
        for peer, c in expired:
            src = self._sources[peer]
            took = now - src.inflight[c]  # at least: it never came, so the peer counts as that slow
            src.took_s = took if src.took_s is None else max(src.took_s, took)
            src.took_n += 1
            self._release(peer, c)
            self._stalled_until[peer] = now + self._stall_s
        self._stats["expired"] += len(expired)
        return expired

    # -- queries ------------------------------------------------------------

    @property
    def n_chunks(self) -> int:
        return self._n

    @property
    def complete(self) -> bool:
        return self._verified == self._n

    @property
    def verified_count(self) -> int:
        return self._verified

    def missing(self) -> set[int]:
        """Chunks not verified yet (idle or in flight)."""
        return set(all_ones(self._state.translate(MISSING_MASK)))

    def verified_bits(self, also: Iterable[int] = ()) -> bytes:
        """The verified chunks (and ``also`` these) as a bitfield: bit i,
        most significant first, is chunk i (the data plane's HAVE).  O(n) in C."""
        if not self._n:
            return b""
        digits = bytearray(self._state.translate(_VERIFIED_DIGIT))
        for c in also:
            if 0 <= c < self._n:
                digits[c] = 0x31
        digits += b"0" * (-self._n % 8)
        return int(digits, 2).to_bytes(len(digits) // 8, "big")

    def chunk_state(self, chunk: int) -> ChunkState:
        self._check_chunk(chunk)
        return ChunkState(self._state[chunk])

    def inflight(self, peer: str | None = None) -> list[tuple[str, int]]:
        """Requests in flight, ``(peer, chunk)``, for one peer or all."""
        if peer is not None:
            src = self._sources.get(peer)
            return [] if src is None else [(peer, c) for c in src.inflight]
        return [(p, c) for p, src in self._sources.items() for c in src.inflight]

    @property
    def banned(self) -> frozenset[str]:
        return frozenset(self._banned)

    @property
    def sources(self) -> frozenset[str]:
        """Known, unbanned sources."""
        return frozenset(self._sources)

    def strikes(self, peer: str) -> int:
        return self._strikes.get(peer, 0)

    def bad_chunk(self, peer: str) -> int | None:
        """The last chunk ``peer`` served bad (``on_bad``), if it ever did."""
        return self._last_bad.get(peer)

    def holds(self, peer: str, chunk: int) -> bool:
        """Whether ``peer`` is a source of ``chunk`` as far as the plan knows."""
        self._check_chunk(chunk)
        src = self._sources.get(peer)
        return src is not None and src.holds(chunk)

    def useful(self, peer: str) -> bool:
        """Whether ``peer`` is a source holding a chunk not verified yet."""
        src = self._sources.get(peer)
        if src is None or self._verified == self._n:
            return False
        if src.bits is None:
            return True
        missing = int.from_bytes(self._state.translate(MISSING_MASK), "little")
        return bool(int.from_bytes(src.bits, "little") & missing)

    def rarity(self, chunk: int) -> int:
        """How many unbanned sources hold ``chunk``."""
        self._check_chunk(chunk)
        return self._full + self._partial_count[chunk]

    def took_s(self, peer: str) -> float | None:
        """How long ``peer``'s chunks take here, from request to verified (a
        recent average; a request that stalled counts as its wait): None
        before it delivered or stalled."""
        src = self._sources.get(peer)
        return None if src is None else src.took_s

    def lagging(self, factor: float, *, least: int = 3, chunks: int = 3) -> frozenset[str]:
        """The sources that lag: stalled now, or whose chunks take more than
        ``factor`` times the median of the sources measured over at least
        ``chunks`` chunks each (when at least ``least`` are).  O(sources)."""
        out = {p for p in self._stalled_until if p in self._sources}
        measured = [(p, s.took_s) for p, s in self._sources.items() if s.took_s is not None and s.took_n >= chunks]
        if len(measured) >= least:
            median = sorted(t for _, t in measured)[len(measured) // 2]
            out.update(p for p, t in measured if t > factor * median)
        return frozenset(out)

    def peer_state(self, peer: str, now: float) -> PeerState:
        if peer in self._banned:
            return PeerState.BANNED
        src = self._sources.get(peer)
        if src is None:
            return PeerState.UNKNOWN
        if self._is_stalled(peer, now):
            return PeerState.STALLED
        return PeerState.BUSY if len(src.inflight) >= src.cap else PeerState.READY

    def stuck(self, now: float) -> bool:
        """Chunks are missing and no unbanned, unstalled source holds any of them."""
        if self._verified == self._n:
            return False
        usable = [s for p, s in self._sources.items() if not self._is_stalled(p, now)]
        if any(s.bits is None for s in usable):
            return False
        missing = int.from_bytes(self._state.translate(MISSING_MASK), "little")
        return not any(int.from_bytes(s.bits or b"", "little") & missing for s in usable)

    def next_deadline(self) -> float | None:
        """Earliest time a request stalls or a stall ends; None when neither can."""
        times = [t for p, t in self._stalled_until.items() if p in self._sources]
        times.extend(
            max(started, src.delivered_at) + self._stall_s
            for src in self._sources.values()
            for started in src.inflight.values()
        )
        return min(times) if times else None

    def statistics(self) -> dict[str, int]:
        inflight = sum(len(s.inflight) for s in self._sources.values())
        return {
            "n_chunks": self._n,
            "verified": self._verified,
            "missing": self._n - self._verified,
            "inflight_requests": inflight,
            "inflight_chunks": len(self._chunk_peers),
            "sources": len(self._sources),
            "full_sources": self._full,
            "banned": len(self._banned),
            "stalled": sum(1 for p in self._stalled_until if p in self._sources),
            **self._stats,
        }

    # -- helpers ------------------------------------------------------------

    def _assert_invariants(self) -> None:
        """Cross-check every redundant structure (tests and the simulator)."""
        idle = [c for c in range(self._n) if self._state[c] == ST_IDLE]
        bucketed = sorted(c for b in self._buckets.values() for c in b)
        assert bucketed == idle, "bucket contents differ from idle chunks"
        for key, bucket in self._buckets.items():
            assert bucket, "empty bucket kept"
            for i, c in enumerate(bucket):
                assert self._pos[c] == i and self._key(c) == key
        counts = [0] * self._n
        for src in self._sources.values():
            if src.bits is not None:
                assert src.count == src.bits.count(1) < self._n or self._n == 0
                for c in all_ones(src.bits):
                    counts[c] += 1
            assert len(src.inflight) <= self._per_peer and 1 <= src.cap <= self._per_peer
        assert counts == self._partial_count, "rarity counts drifted"
        assert self._full == sum(s.bits is None for s in self._sources.values())
        requests = {(p, c) for p, s in self._sources.items() for c in s.inflight}
        assert requests == {(p, c) for c, ps in self._chunk_peers.items() for p in ps}
        for c, ps in self._chunk_peers.items():
            assert 1 <= len(ps) <= MAX_DUPLICATES and len(set(ps)) == len(ps)
            assert self._state[c] == ST_INFLIGHT
        assert self._state.count(ST_INFLIGHT) == len(self._chunk_peers)
        assert self._state.count(ST_VERIFIED) == self._verified
        assert not self._banned & set(self._sources)


def choose_sources(
    found: Iterable[str],
    complete: Iterable[str],
    current: Iterable[str],
    useless: Iterable[str],
    limit: int,
    rng: random.Random,
) -> set[str]:
    """At most ``limit`` of the holders ``found`` to pull from.

    ``complete`` are the holders with the whole copy, ``current`` the
    sources already in use, ``useless`` partial holders that hold nothing
    still missing.  Sticky: a current source stays while it is found and
    useful, so connections and rarity counts do not churn.  At least one
    complete holder is kept when there is one (the only way to the chunks
    no receiver has yet), then the rest are filled at random, so that in a
    swarm larger than ``limit`` every receiver sees a different slice of it
    and the chunks still spread.  A useless source makes room for another
    holder when there is one to try.  O(len(found)).
    """
    if not is_int(limit) or limit < 1:
        raise LocalProtocolError("limit must be an int >= 1")
    found_list = sorted(set(found))  # sorted: the choice depends on rng only
    found_set = set(found_list)
    full = found_set & set(complete)
    dull = set(useless) - full
    out = {p for p in current if p in found_set and p not in dull}
    if len(out) > limit:
        out = set(rng.sample(sorted(out), limit))
    if full and not out & full:
        if len(out) >= limit:
            out.remove(rng.choice(sorted(out)))
        out.add(rng.choice(sorted(full)))
    rest = [p for p in found_list if p not in out and p not in dull]
    rng.shuffle(rest)
    rest.sort(key=lambda p: p not in full)  # complete holders first, random among each kind
    out.update(rest[: max(0, limit - len(out))])
    if len(out) < limit:  # nothing better to try: a useless source may become useful
        spare = [p for p in found_list if p in dull and p not in out]
        out.update(rng.sample(spare, min(len(spare), limit - len(out))))
    return out
