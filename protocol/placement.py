"""Placement: which node a step that names no node runs on.

Pure and deterministic: the same facts give the same ranking.  A node fits
when it is alive and has room on the tier (free bytes for disk and dram;
for a GPU, free VRAM minus what is reserved, against the model's
``requirements.min_vram`` or an estimate from its size).  Among those that
fit, nodes that already hold the model come first (nothing to move), then the
one with the most room left (the least loaded), then the node id.  Every node
that does not fit gets its reasons.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .units import human_bytes

__all__ = ["Candidate", "GpuFacts", "NoPlacement", "PlacementFacts", "place", "rank", "vram_needed"]

VRAM_OVERHEAD = 1.2  # weights plus activations and KV cache, when the registration gives no min_vram


@dataclass(frozen=True, slots=True)
class GpuFacts:
    index: int
    free_bytes: int
    reserved_bytes: int = 0


@dataclass(frozen=True, slots=True)
class PlacementFacts:
    """A node as placement sees it: alive, free bytes per tier, free VRAM per
    GPU, whether it holds the model (``replicas.ReplicaFacts`` is the replica
    rule's view)."""

    node_id: str
    alive: bool
    free: Mapping[str, int] = field(default_factory=dict)  # tier -> free bytes ("disk", "dram")
    gpus: Sequence[GpuFacts] = ()
    holds: bool = False  # a copy of the model on any of its devices


@dataclass(frozen=True, slots=True)
class Candidate:
    node_id: str
    device: str | None  # node:kind when it fits
    fits: bool
    holds: bool
    room_bytes: int
    reasons: tuple[str, ...] = ()

    def to_value(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "device": self.device, "fits": self.fits, "holds_model": self.holds,
                "room_bytes": self.room_bytes, "reasons": list(self.reasons)}


class NoPlacement(Exception):
    def __init__(self, code: str, message: str, ranking: list[Candidate]) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ranking = ranking


def vram_needed(size_bytes: int, requirements: Mapping[str, Any] | None) -> int:
    v = (requirements or {}).get("min_vram")
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return v
    return int(size_bytes * VRAM_OVERHEAD)


def rank(tier: str, need_bytes: int, facts: Sequence[PlacementFacts]) -> list[Candidate]:
    """Every node, best first; ``tier`` is disk, dram or gpu (``need_bytes``
    is VRAM for gpu, else the copy's size)."""
    out = []
    for f in facts:
        reasons: list[str] = []
        device: str | None = None
        room = 0
        if not f.alive:
            reasons.append("not alive")
        if tier == "gpu":
            if not f.gpus:
                reasons.append("no GPU")
            else:
                best = max(f.gpus, key=lambda g: (g.free_bytes - g.reserved_bytes, -g.index))
                room = best.free_bytes - best.reserved_bytes - need_bytes
                if room < 0:
                    reasons.append(f"needs {human_bytes(need_bytes)} of VRAM; the freest GPU (gpu{best.index}) has "
                                   f"{human_bytes(best.free_bytes - best.reserved_bytes)}")
                device = f"{f.node_id}:gpu{best.index}"
        else:
            free = f.free.get(tier)
            if free is None:
                reasons.append(f"no {tier} tier")
            else:
                room = free - (0 if f.holds else need_bytes)
                if room < 0:
                    reasons.append(f"needs {human_bytes(need_bytes)} on {tier}; has {human_bytes(free)} free")
            device = f"{f.node_id}:{tier}"
        fits = not reasons
        out.append(Candidate(f.node_id, device if fits else None, fits, f.holds, room, tuple(reasons)))
    out.sort(key=lambda c: (not c.fits, not c.holds, -c.room_bytes, c.node_id))
    return out


def place(tier: str, need_bytes: int, facts: Sequence[PlacementFacts]) -> tuple[Candidate, list[Candidate]]:
    """The best candidate and the whole ranking, or ``NoPlacement``."""
    ranking = rank(tier, need_bytes, facts)
    if ranking and ranking[0].fits:
        return ranking[0], ranking
    why = "; ".join(f"{c.node_id}: {', '.join(c.reasons)}" for c in ranking[:8]) or "no nodes"
    raise NoPlacement("NO_CAPACITY", f"no node can take it on {tier} ({why})", ranking)
