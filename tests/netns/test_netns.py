"""A small swarm over shaped links in network namespaces (bench/swarm_netns.py).

1 seed and 2 receivers, every link shaped to 50 Mbit/s each way with tc tbf,
a 32 MiB model of random bytes: both receivers end with byte-identical
copies, and the receivers passed chunks to each other (their links sent a
chunk's worth of bytes or more), so the seed did not serve everyone alone.
Needs root and working ``ip netns``: skipped otherwise, failed as root
(``tests.needs``).
"""

from __future__ import annotations

import os

import pytest

from bench.swarm_netns import MiB, netns_usable, run_swarm
from tests.needs import unavailable

pytestmark = pytest.mark.netns


def test_two_receivers_swarm_over_shaped_links() -> None:
    why = netns_usable()
    if why is not None:
        unavailable(why)
    r = run_swarm(n_receivers=2, size=32 * MiB, rate_mbit=50, prefix=f"mnt{os.getpid()}", timeout_s=60, poll_s=0.1)
    assert r.identical == {"h2": True, "h3": True}
    assert set(r.sources["h2"]) == {"h1", "h3"} and set(r.sources["h3"]) == {"h1", "h2"}
    chunk = 1 * MiB  # the manifest's chunk size for 32 MiB
    assert r.tx_bytes["h2"] + r.tx_bytes["h3"] >= chunk, r.tx_bytes  # receivers served each other
    # A star would have the seed send the model twice; sharing means it sent less.
    assert r.tx_bytes["h1"] < 2 * r.size, r.tx_bytes
