"""Virtual time for the simulator.

There is one global simulated time, ``SimClock.now`` (seconds).  Each node sees
``now + skew`` where its skew is fixed when the run starts, so a node's timers,
tombstone ages and HLC stamps all run on a clock that is off by a constant,
exactly as a badly synchronised host would be.  Nothing here reads a real clock.
"""

from __future__ import annotations

import random

__all__ = ["SimClock"]


class SimClock:
    def __init__(self, n_nodes: int, skew_max_s: float, rng: random.Random) -> None:
        assert skew_max_s >= 0.0
        self.now = 0.0
        self.skew_max_s = skew_max_s
        # Node i's offset from true time, drawn once per run from the run's seed.
        self.skews: list[float] = [
            rng.uniform(-skew_max_s, skew_max_s) if skew_max_s > 0 else 0.0 for _ in range(n_nodes)
        ]

    def local(self, node: int) -> float:
        """What node ``node`` reads on its own clock now."""
        return self.now + self.skews[node]

    def local_ms(self, node: int) -> int:
        return max(0, int(self.local(node) * 1000.0) + 1_700_000_000_000)

    def to_global(self, node: int, local_t: float) -> float:
        """The true time at which node ``node``'s clock shows ``local_t``."""
        return local_t - self.skews[node]
