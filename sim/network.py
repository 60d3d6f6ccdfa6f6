"""The virtual network: loss, delay, partitions and crashed hosts.

Theory of operation
-------------------
Messages are one-way datagrams.  ``Network.admit`` decides, when a message is
sent, whether it is lost (probability ``loss``) and, if not, how long it is in
flight (``delay_min_s`` plus an exponential tail of mean ``delay_jitter_s``).
``Network.arrives`` is asked when it arrives: a host that is down, or
one now on the other side of a partition from the sender, never gets it.

A partition is a group assignment: ``groups[i]`` is node ``i``'s side; nodes
talk only within a side.  ``None`` means no partition.  Every partition is
kept in ``history`` (start, end, groups), so the invariant checker can ask
whether two nodes were cut off from each other at some time in a window.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

__all__ = ["Network", "PartitionEpoch"]


@dataclass(slots=True)
class PartitionEpoch:
    start: float
    end: float  # math.inf while in force
    groups: list[int]

    def separates(self, a: int, b: int) -> bool:
        return self.groups[a] != self.groups[b]


class Network:
    def __init__(
        self,
        n_nodes: int,
        rng: random.Random,
        *,
        loss: float = 0.0,
        delay_min_s: float = 0.001,
        delay_jitter_s: float = 0.004,
    ) -> None:
        assert 0.0 <= loss < 1.0 and delay_min_s >= 0.0 and delay_jitter_s >= 0.0
        self.rng = rng
        self.loss = loss
        self.delay_min_s = delay_min_s
        self.delay_jitter_s = delay_jitter_s
        self.up: list[bool] = [True] * n_nodes
        self.groups: list[int] | None = None
        self.history: list[PartitionEpoch] = []
        self.sent = 0
        self.lost = 0
        self.cut = 0  # dropped by a partition
        self.to_down = 0  # dropped because the receiver was down

    # -- faults ----------------------------------------------------------------

    def partition(self, groups: list[int], now: float) -> None:
        assert len(groups) == len(self.up)
        self.heal(now)
        self.groups = list(groups)
        self.history.append(PartitionEpoch(now, math.inf, self.groups))

    def heal(self, now: float) -> None:
        if self.groups is not None:
            self.history[-1].end = now
            self.groups = None

    def separated_during(self, a: int, b: int, start: float, end: float) -> bool:
        """Were ``a`` and ``b`` on different sides at any time in ``[start, end]``?"""
        for ep in reversed(self.history):
            if ep.end < start:
                break
            if ep.start <= end and ep.separates(a, b):
                return True
        return False

    # -- the datagram path -----------------------------------------------------

    def admit(self, src: int, dst: int) -> float | None:
        """The message's flight time, or ``None`` if it is lost or cut off."""
        self.sent += 1
        g = self.groups
        if g is not None and g[src] != g[dst]:
            self.cut += 1
            return None
        if self.loss and self.rng.random() < self.loss:
            self.lost += 1
            return None
        if self.delay_jitter_s:
            return self.delay_min_s + self.rng.expovariate(1.0 / self.delay_jitter_s)
        return self.delay_min_s

    def arrives(self, src: int, dst: int) -> bool:
        """Asked when a message lands: is the receiver up and on the sender's side?"""
        if not self.up[dst]:
            self.to_down += 1
            return False
        g = self.groups
        if g is not None and g[src] != g[dst]:
            self.cut += 1
            return False
        return True
