"""Hybrid logical clock (Kulkarni et al.), time passed in by the caller.

A stamp is ``(wall_ms, logical, node_id)``; stamps are totally ordered, so
last-writer-wins on them gives the same answer on every node.  A received
stamp more than ``max_drift_ms`` ahead of our own wall clock is refused
(``ClockSkewError``): one node with a wild clock must not drag every other
node's clock into the future.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import RemoteProtocolError

__all__ = ["HLC", "ClockSkewError", "Stamp"]


@dataclass(frozen=True, slots=True, order=True)
class Stamp:
    wall_ms: int
    logical: int
    node_id: str

    def to_wire(self) -> list[object]:
        return [self.wall_ms, self.logical, self.node_id]

    @classmethod
    def from_wire(cls, raw: object) -> Stamp:
        if (
            not isinstance(raw, list | tuple)
            or len(raw) != 3
            or not isinstance(raw[0], int)
            or not isinstance(raw[1], int)
            or not isinstance(raw[2], str)
            or isinstance(raw[0], bool)
            or isinstance(raw[1], bool)
            or not 0 <= raw[0] < 2**63
            or not 0 <= raw[1] < 2**32
            or not 0 < len(raw[2]) <= 64
        ):
            raise RemoteProtocolError("bad HLC stamp")
        return cls(raw[0], raw[1], raw[2])


class ClockSkewError(RemoteProtocolError):
    """A peer's stamp is too far ahead of our clock."""


class HLC:
    def __init__(self, node_id: str, max_drift_ms: int = 60_000) -> None:
        self.node_id = node_id
        self.max_drift_ms = max_drift_ms
        self._wall_ms = 0
        self._logical = 0

    @property
    def high_water_ms(self) -> int:
        """The highest physical time this clock has issued or seen (persist it)."""
        return self._wall_ms

    def advance_to(self, wall_ms: int) -> None:
        """Never issue a stamp below ``wall_ms`` (a restart restores its high-water mark)."""
        if wall_ms > self._wall_ms:
            self._wall_ms, self._logical = wall_ms, 0

    def now(self, now_ms: int) -> Stamp:
        """A new stamp for a local event at physical time ``now_ms``."""
        if now_ms > self._wall_ms:
            self._wall_ms, self._logical = now_ms, 0
        else:
            self._logical += 1
        return Stamp(self._wall_ms, self._logical, self.node_id)

    def observe(self, stamp: Stamp, now_ms: int) -> None:
        """Advance past a received stamp, refusing one too far in the future."""
        if stamp.wall_ms > now_ms + self.max_drift_ms:
            raise ClockSkewError(
                f"stamp from {stamp.node_id} is {stamp.wall_ms - now_ms} ms ahead of local time "
                f"(limit {self.max_drift_ms} ms)"
            )
        if stamp.wall_ms > self._wall_ms:
            self._wall_ms, self._logical = stamp.wall_ms, stamp.logical
        elif stamp.wall_ms == self._wall_ms and stamp.logical > self._logical:
            self._logical = stamp.logical
