"""The shared state of a ``ChunkPlan`` (see ``chunkplan``): each chunk's
state, the idle chunks bucketed by rarity, the requests in flight and the
per-source records.  ``PlanState`` declares it and keeps the primitives the
source book (``chunksources``), the assignment (``chunkassign``) and the plan
itself all use; ``ChunkPlan.__init__`` sets it up."""

from __future__ import annotations

import math
from collections.abc import Iterator

from ..errors import LocalProtocolError

MAX_CHUNKS = 2**24
MAX_PER_PEER_INFLIGHT = 1024
MAX_DUPLICATES = 2

ST_IDLE = 0
ST_INFLIGHT = 1
ST_VERIFIED = 2
# state byte -> 1 when the chunk is still missing (idle or in flight) / idle
MISSING_MASK = bytes([1, 1, 0]) + bytes(253)
IDLE_MASK = bytes([1, 0, 0]) + bytes(253)
NONZERO = bytes([0]) + bytes([1]) * 255  # any byte -> 1 when nonzero


def all_ones(bits: bytes | bytearray) -> Iterator[int]:
    """Indexes of the 1 bytes of a 0/1 byte string."""
    i = bits.find(1)
    while i != -1:
        yield i
        i = bits.find(1, i + 1)


class SourceEntry:
    __slots__ = ("bits", "cap", "count", "delivered_at", "inflight", "took_n", "took_s")

    def __init__(self, bits: bytearray | None, cap: int) -> None:
        self.cap = cap  # requests in flight at most (<= per_peer_inflight)
        self.bits = bits  # None: holds every chunk; else bits[c] == 1 when it holds c
        self.count = 0 if bits is None else bits.count(1)
        self.inflight: dict[int, float] = {}  # chunk -> requested at
        self.delivered_at = -math.inf  # when it last delivered a verified chunk
        self.took_s: float | None = None  # how long its chunks take, request to verified (recent average)
        self.took_n = 0  # the chunks (and stalls) that average counts

    def holds(self, chunk: int) -> bool:
        return self.bits is None or self.bits[chunk] == 1


class PlanState:
    """The plan's state (set by ``ChunkPlan.__init__``) and its primitives."""

    _n: int
    _per_peer: int
    _stall_max_s: float
    _stall_s: float
    _stall_factor: float
    _stall_floor_s: float
    _took_s: float | None
    _ban_after: int
    _random_left: int
    _endgame: bool
    _state: bytearray  # ST_IDLE / ST_INFLIGHT / ST_VERIFIED
    _verified: int
    _chunk_peers: dict[int, list[str]]  # in-flight chunk -> peers (<= 2)
    _sources: dict[str, SourceEntry]
    _full: int  # sources holding every chunk
    _partial_count: list[int]  # partial sources holding each chunk
    _other: bytearray  # 1: not among the preferred chunks (prefer())
    _buckets: dict[int, list[int]]  # idle chunks by _key(): see ChunkPlan.__init__
    _pos: list[int]
    _strikes: dict[str, int]
    _last_bad: dict[str, int]
    _banned: set[str]
    _stalled_until: dict[str, float]
    _held_back: frozenset[str]
    _stats: dict[str, int]

    def _count_bits(self, bits: bytes | bytearray, delta: int) -> None:
        for c in all_ones(bits):
            self._bump(c, delta)

    def _bump(self, chunk: int, delta: int) -> None:
        """Change ``chunk``'s partial-holder count, moving it between buckets."""
        if self._state[chunk] == ST_IDLE:
            self._unbucket(chunk)
            self._partial_count[chunk] += delta
            self._bucket(chunk)
        else:
            self._partial_count[chunk] += delta

    def _key(self, chunk: int) -> int:
        return 2 * self._partial_count[chunk] + self._other[chunk]

    def _bucket(self, chunk: int) -> None:
        bucket = self._buckets.setdefault(self._key(chunk), [])
        self._pos[chunk] = len(bucket)
        bucket.append(chunk)

    def _unbucket(self, chunk: int) -> None:
        key = self._key(chunk)
        bucket = self._buckets[key]
        i = self._pos[chunk]
        last = bucket.pop()
        if last != chunk:
            bucket[i] = last
            self._pos[last] = i
        if not bucket:
            del self._buckets[key]

    def _release(self, peer: str, chunk: int) -> bool:
        """Drop request ``(peer, chunk)`` if it is in flight; True when it was."""
        src = self._sources.get(peer)
        if src is None or chunk not in src.inflight:
            return False
        del src.inflight[chunk]
        peers = self._chunk_peers[chunk]
        peers.remove(peer)
        if not peers:
            del self._chunk_peers[chunk]
            if self._state[chunk] == ST_INFLIGHT:
                self._state[chunk] = ST_IDLE
                self._bucket(chunk)
        return True

    def _is_stalled(self, peer: str, now: float) -> bool:
        until = self._stalled_until.get(peer)
        return until is not None and now < until

    def _check_chunk(self, chunk: int) -> None:
        if not is_int(chunk) or not 0 <= chunk < self._n:
            raise LocalProtocolError(f"chunk index {chunk!r} outside [0, {self._n})")


def is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_peer(peer: object) -> None:
    if not isinstance(peer, str) or not peer:
        raise LocalProtocolError("peer must be a non-empty string")
