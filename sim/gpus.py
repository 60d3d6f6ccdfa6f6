"""``python -m sim gpus``: what publishing GPU load costs the gossip, under the
rule the daemon follows (``protocol.gpus.publish_reason``), against writing
every reading.

The model: N nodes with G GPUs each, read every ``READ_S`` for an hour of
simulated time.  A GPU idles or serves: engines start (taking 40 to 95% of
its memory) and stop at random; while one serves, its utilisation wanders
between 30 and 100%, its memory moves by a KV cache's few hundred MiB,
temperature and power follow utilisation with noise.  Each reading goes
through the rule; what it publishes is what peers see.

Checked at every read (violations, not statistics): the published figures
are within every threshold of the truth (``readings_within``), and an engine
that started or stopped is in the published record at that same read.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import msgpack

from protocol.gpus import (
    GpuProcess,
    GpuReading,
    GpusRecord,
    Thresholds,
    publish_reason,
    readings_within,
)

__all__ = ["GpuSimResult", "simulate_gpus"]

READ_S = 5.0
GiB = 2**30
MiB = 2**20


@dataclass
class _Gpu:
    total: int
    engine_bytes: int = 0  # 0: idle
    pid: int = 0
    kv: int = 0
    util: float = 0.0
    temp: float = 32.0


@dataclass
class GpuSimResult:
    nodes: int
    gpus_per_node: int
    reads: int
    writes: int
    bytes_written: int
    bytes_every_read: int
    engine_changes: int
    violations: list[str]

    @property
    def minutes(self) -> float:
        return self.reads / self.nodes * READ_S / 60


def _reading(i: int, g: _Gpu, rng: random.Random) -> GpuReading:
    used = min(g.engine_bytes + g.kv + 400 * MiB, g.total)
    util = round(g.util)
    procs = (GpuProcess(g.pid, g.engine_bytes + g.kv),) if g.engine_bytes else ()
    power = int(70_000 + 6_000 * g.util + rng.gauss(0, 8_000))
    return GpuReading(i, f"GPU-{i}", "Sim H100 80GB", g.total, used, g.total - used, util, util // 2,
                      round(g.temp), max(power, 0), 700_000, procs, len(procs))


def _step(g: _Gpu, rng: random.Random, pid: int) -> bool:
    """One read interval of one GPU; True when an engine started or stopped."""
    changed = False
    if g.engine_bytes == 0 and rng.random() < 0.004:  # about one start per 20 minutes idle
        g.engine_bytes, g.pid, changed = int(g.total * rng.uniform(0.4, 0.95)), pid, True
    elif g.engine_bytes and rng.random() < 0.002:  # about one stop per 40 minutes serving
        g.engine_bytes, g.pid, g.kv, changed = 0, 0, 0, True
    if g.engine_bytes:
        g.util = min(max(g.util + rng.gauss(0, 12), 30.0), 100.0)
        g.kv = min(max(g.kv + int(rng.gauss(0, 64 * MiB)), 0), 512 * MiB)
    else:
        g.util = max(g.util * 0.3 + rng.gauss(0, 1), 0.0)
    g.temp += (30 + 0.5 * g.util - g.temp) * 0.3 + rng.gauss(0, 0.7)
    return changed


def simulate_gpus(nodes: int = 100, gpus_per_node: int = 8, seed: int = 1, hours: float = 1.0,
                  th: Thresholds | None = None) -> GpuSimResult:
    th = th or Thresholds()
    rng = random.Random(seed)
    fleet = [[_Gpu(80 * GiB) for _ in range(gpus_per_node)] for _ in range(nodes)]
    published: list[GpusRecord | None] = [None] * nodes
    published_at = [0.0] * nodes
    reads = writes = bytes_written = bytes_every = changes = 0
    violations: list[str] = []
    steps = int(hours * 3600 / READ_S)
    next_pid = 1000
    for k in range(steps):
        now = k * READ_S
        for n, gpus in enumerate(fleet):
            started_or_stopped = []
            for i, g in enumerate(gpus):
                next_pid += 1
                if _step(g, rng, next_pid):
                    started_or_stopped.append(i)
            changes += len(started_or_stopped)
            cur = GpusRecord(tuple(_reading(i, g, rng) for i, g in enumerate(gpus)), int(now * 1000), "nvml")
            size = len(msgpack.packb(cur.to_value()))
            reads += 1
            bytes_every += size
            if publish_reason(published[n], published_at[n], cur, now, th) is not None:
                published[n], published_at[n] = cur, now
                writes += 1
                bytes_written += size
            pub = published[n]
            assert pub is not None
            if not readings_within(pub.gpus, cur.gpus, th) and len(violations) < 20:
                violations.append(f"t={now:.0f} node {n}: published figures beyond a threshold of the truth")
            for i in started_or_stopped:
                if [p.pid for p in pub.gpus[i].processes] != [p.pid for p in cur.gpus[i].processes] and len(violations) < 20:
                    violations.append(f"t={now:.0f} node {n} gpu{i}: an engine change not published at once")
    return GpuSimResult(nodes, gpus_per_node, reads, writes, bytes_written, bytes_every, changes, violations)
