"""Eviction: which of a node's copies go when a tier fills up.

Theory of operation
-------------------
Each tier has a high and a low watermark (fractions of the tier; defaults
85% and 70%).  A tier's fill is ``used / (used + free)``, as ``df`` counts it
(space reserved for root is neither).  Above the high watermark the node
deletes its least recently used copies until the tier is at or below the
low one (hysteresis: it does not evict one copy per byte written).  A copy
that must stay says why (``Resident.keep``): the replica policy's ``min``
needs it, an engine serves from it, a transfer reads it, or it is the model
being written.  Those are never chosen.

Before a transfer writes ``incoming`` bytes into a tier, the same rule runs
with them counted: when the tier would pass its high watermark, the node
evicts first (down to the low one, or as far as it can while the new copy
fits under the high one); when even every copy it may evict is not enough,
nothing is evicted and the transfer fails ``NO_SPACE``, naming the copies it
could not evict and why (``Eviction.message``).

Transfers write side by side, so each one's ``incoming`` is a reservation
until it ends: the bytes it was promised and has not yet written
(``in_flight``) count as ``reserved`` for every later decision on the tier.
Two transfers that each fit alone therefore cannot together pass the high
watermark: the second one evicts for both, or fails ``NO_SPACE``.  A
transfer's written bytes are already in ``used``, so only what is left of
its reservation counts, never a byte twice.

Everything here is pure: the node (``meshnode/copies/evictor.py``) and the
simulator give it what they read and act on what it returns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .errors import LocalProtocolError

__all__ = ["Eviction", "InvalidWatermarks", "Resident", "Watermarks", "in_flight", "plan_eviction"]

SHOWN_KEPT_MAX = 8  # copies a NO_SPACE message names (the biggest first)


class InvalidWatermarks(LocalProtocolError):
    pass


@dataclass(frozen=True, slots=True)
class Watermarks:
    high: float = 0.85
    low: float = 0.70

    def __post_init__(self) -> None:
        if not 0.0 < self.low < self.high <= 1.0:
            raise InvalidWatermarks("watermarks: 0 < low < high <= 100%")

    @classmethod
    def parse(cls, text: str) -> Watermarks:
        """``"85,70"`` (percent: high, low)."""
        parts = [p.strip().rstrip("%") for p in text.split(",")]
        try:
            high, low = (float(p) / 100 for p in parts)
        except ValueError:
            raise InvalidWatermarks(f"watermarks {text[:40]!r}: two percentages, high then low, e.g. 85,70") from None
        return cls(high, low)


@dataclass(frozen=True, slots=True)
class Resident:
    """A complete copy on the tier, as the rule sees it."""

    model: str
    size: int
    last_used: float  # when it was last read (a transfer, a serve), any clock: only the order counts
    keep: str | None = None  # why it may not be evicted; None: it may


@dataclass(frozen=True, slots=True)
class Eviction:
    evict: tuple[str, ...] = ()  # the models whose copies go, least recently used first
    freed: int = 0
    fits: bool = True  # the incoming bytes fit under the high watermark (after ``evict``)
    over: bool = False  # the tier is (or would be) above its high watermark
    kept: tuple[tuple[str, str], ...] = ()  # (model, why) of the copies it could not evict

    def message(self, tier: str, incoming: int, used: int, capacity: int, marks: Watermarks,
                reserved: int = 0) -> str:
        """Why ``incoming`` bytes do not fit: for a ``NO_SPACE`` error."""
        room = max(int(marks.high * capacity) - used - reserved, 0)
        promised = f", {reserved} more promised to transfers in flight" if reserved else ""
        text = (f"{tier} is {100 * used / max(capacity, 1):.0f}% full{promised}; {incoming} bytes more would pass "
                f"its high watermark of {marks.high:.0%} ({room} bytes left under it)")
        if self.kept:
            why = "; ".join(f"{m}: {reason}" for m, reason in self.kept[:SHOWN_KEPT_MAX])
            more = f" (and {len(self.kept) - SHOWN_KEPT_MAX} more)" if len(self.kept) > SHOWN_KEPT_MAX else ""
            text += f", and these copies cannot be evicted: {why}{more}"
        else:
            text += ", and no copy here could be evicted to make room"
        return text


def in_flight(reserved: Mapping[str, int], written: Mapping[str, int | None]) -> tuple[int, tuple[str, ...]]:
    """The bytes still promised to transfers in flight, and the reservations
    that ended.  ``reserved``: what each transfer was promised (by any key);
    ``written``: what it has written so far, or None once it ended (or a key
    missing from it: a transfer nobody knows of holds nothing)."""
    left, ended = 0, []
    for key, size in reserved.items():
        done = written.get(key)
        if done is None:
            ended.append(key)
        else:
            left += max(size - max(done, 0), 0)
    return left, tuple(sorted(ended))


def plan_eviction(used: int, free: int, residents: Iterable[Resident], marks: Watermarks,
                  incoming: int = 0, reserved: int = 0) -> Eviction:
    """What to evict from a tier with ``used`` and ``free`` bytes holding
    ``residents``, before writing ``incoming`` bytes into it (0: a sweep),
    with ``reserved`` bytes still to come from transfers in flight."""
    capacity = used + free
    high, low = marks.high * capacity, marks.low * capacity
    coming = incoming + max(reserved, 0)  # the transfers in flight write theirs too
    after = used + coming
    if after <= high and coming <= free:
        return Eviction()
    res = list(residents)
    kept = tuple(sorted(((r.model, r.keep) for r in res if r.keep is not None),
                        key=lambda x: x[0]))
    order = sorted((r for r in res if r.keep is None), key=lambda r: (r.last_used, -r.size, r.model))
    evictable = sum(r.size for r in order)
    if incoming and (after - evictable > high or coming > free + evictable):
        # Evicting would not be enough for this transfer: it is refused and nothing goes for it.
        # A sweep (no incoming of its own) evicts as far as it can all the same.
        return Eviction(fits=False, over=True, kept=kept)
    evict: list[str] = []
    freed = 0
    for r in order:
        if after - freed <= low:
            break
        evict.append(r.model)
        freed += r.size
    return Eviction(tuple(evict), freed, fits=after - freed <= high and coming <= free + freed, over=True, kept=kept)
