"""The source book of a ``ChunkPlan`` (see ``chunkplan``): which peer holds
which chunks (full holders as one shared counter, partial holders as bitfields
counted into each chunk's rarity), the held-back sources, the preferred
chunks, and dropping a source."""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import LocalProtocolError
from .chunkpool import (
    MISSING_MASK,
    NONZERO,
    ST_IDLE,
    PlanState,
    SourceEntry,
    all_ones,
    check_peer,
    is_int,
)


class SourceBook(PlanState):
    """``ChunkPlan``'s source methods."""

    def set_source(self, peer: str, chunks: Iterable[int] | None, *, inflight: int | None = None) -> None:
        """Declare what ``peer`` holds: ``None`` for every chunk, else the set.

        ``inflight`` caps the requests in flight to this peer below
        ``per_peer_inflight`` (for example one at a time to a full holder
        that many receivers share).  Call again to replace a partial
        holder's set, or the cap.  Ignored for a banned peer.  Requests
        already in flight to the peer stay in flight.
        """
        check_peer(peer)
        if inflight is not None and (not is_int(inflight) or inflight < 1):
            raise LocalProtocolError("inflight must be an int >= 1")
        new = None
        if chunks is not None:
            new = bytearray(self._n)
            for c in chunks:
                self._check_chunk(c)
                new[c] = 1
        self._set_bits(peer, new, inflight)

    def _set_bits(self, peer: str, new: bytearray | None, inflight: int | None) -> None:
        if peer in self._banned:
            return
        cap = self._per_peer if inflight is None else min(inflight, self._per_peer)
        src = self._sources.get(peer)
        if src is not None:
            src.cap = cap
        if new is None or new.count(1) == self._n:  # a full holder
            if src is None:
                self._sources[peer] = SourceEntry(None, cap)
                self._full += 1
            elif src.bits is not None:
                self._make_full(src)
            return
        if src is None:
            src = SourceEntry(new, cap)
            self._sources[peer] = src
            self._count_bits(new, +1)
        elif src.bits is None:
            self._full -= 1
            src.bits = new
            src.count = new.count(1)
            self._count_bits(new, +1)
        else:
            old = int.from_bytes(src.bits, "little")
            now_held = int.from_bytes(new, "little")
            if old != now_held:
                self._count_bits((old & ~now_held).to_bytes(self._n, "little"), -1)
                self._count_bits((now_held & ~old).to_bytes(self._n, "little"), +1)
            src.bits = new
            src.count = new.count(1)

    def set_source_mask(self, peer: str, mask: bytes | None, *, inflight: int | None = None) -> None:
        """``set_source`` with the chunks as a mask: ``mask[c]`` is 1 when
        ``peer`` holds (or may be asked for) chunk c; None for every chunk.
        An unchanged mask costs O(n_chunks) in C."""
        check_peer(peer)
        if inflight is not None and (not is_int(inflight) or inflight < 1):
            raise LocalProtocolError("inflight must be an int >= 1")
        if mask is not None and len(mask) != self._n:
            raise LocalProtocolError(f"mask must have {self._n} bytes, got {len(mask)}")
        self._set_bits(peer, None if mask is None else bytearray(mask.translate(NONZERO)), inflight)

    def hold_back(self, peers: Iterable[str]) -> None:
        """Ask ``peers`` (sources that lag: a slow link) only for the chunks
        no other source holds, and never for an endgame duplicate: a chunk
        another source can give is not left to crawl in from a slow one
        (and passed on from there as slowly).  Replaces the previous set."""
        self._held_back = frozenset(peers)

    @property
    def held_back(self) -> frozenset[str]:
        """The sources ``hold_back`` named: a chunk arriving from one of them
        is not passed on (nor announced) before it is verified, so a slow
        arrival does not slow the neighbours that would take it on."""
        return self._held_back

    def lacks_any(self, mask: bytes) -> bool:
        """Whether a chunk whose ``mask`` byte is nonzero is not verified yet."""
        missing = int.from_bytes(self._state.translate(MISSING_MASK), "little")
        return bool(missing & int.from_bytes(bytes(mask[: self._n]).translate(NONZERO), "little"))

    def add_source_chunks(self, peer: str, chunks: Iterable[int]) -> None:
        """``peer`` now also holds ``chunks`` (incremental, O(len(chunks)))."""
        check_peer(peer)
        if peer in self._banned:
            return
        src = self._sources.get(peer)
        if src is None:
            src = SourceEntry(bytearray(self._n), self._per_peer)
            self._sources[peer] = src
        bits = src.bits
        if bits is None:
            for c in chunks:
                self._check_chunk(c)
            return
        for c in chunks:
            self._check_chunk(c)
            if not bits[c]:
                bits[c] = 1
                src.count += 1
                self._bump(c, +1)
        if src.count == self._n:
            self._make_full(src)

    def remove_source_chunks(self, peer: str, chunks: Iterable[int]) -> None:
        """``peer`` no longer holds ``chunks`` (incremental; its requests in
        flight stay, the caller fails those it must)."""
        check_peer(peer)
        src = self._sources.get(peer)
        if src is None:
            return
        held = []
        for c in chunks:
            self._check_chunk(c)
            if src.holds(c):
                held.append(c)
        if not held:
            return
        if src.bits is None:
            self._full -= 1
            src.bits = bytearray(b"\x01") * self._n
            src.count = self._n
            self._count_bits(src.bits, +1)
        for c in held:
            src.bits[c] = 0
            src.count -= 1
            self._bump(c, -1)

    def remove_source(self, peer: str) -> list[tuple[str, int]]:
        """Forget ``peer`` (it died, left, or dropped the copy).

        Its in-flight chunks return to the pool; the released requests are
        returned so the caller can cancel them.  Strikes and bans persist.
        """
        if peer not in self._sources:
            return []
        return self._drop_source(peer)

    def prefer(self, chunks: Iterable[int] | None) -> None:
        """Among equally rare idle chunks, hand out ``chunks`` first.

        ``None`` (the default) prefers none.  Receivers that pull one
        manifest at the same time can each prefer a different share, so
        that a full source they all ask uploads each chunk about once
        instead of the same rare chunks to several of them.  O(n_chunks)
        in C, plus O(changed) in Python.
        """
        other = bytearray(self._n)
        if chunks is not None:
            other = bytearray(b"\x01") * self._n
            for c in chunks:
                self._check_chunk(c)
                other[c] = 0
        changed = int.from_bytes(other, "little") ^ int.from_bytes(self._other, "little")
        for c in all_ones(changed.to_bytes(self._n, "little")):
            if self._state[c] == ST_IDLE:
                self._unbucket(c)
                self._other[c] = other[c]
                self._bucket(c)
            else:
                self._other[c] = other[c]

    def _make_full(self, src: SourceEntry) -> None:
        assert src.bits is not None
        self._count_bits(src.bits, -1)
        src.bits = None
        src.count = 0
        self._full += 1

    def _drop_source(self, peer: str) -> list[tuple[str, int]]:
        src = self._sources[peer]
        released = [(peer, c) for c in src.inflight]
        for _, c in released:
            self._release(peer, c)
        del self._sources[peer]
        if src.bits is None:
            self._full -= 1
        else:
            self._count_bits(src.bits, -1)
        return released
