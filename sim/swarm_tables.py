"""The tables of ``python -m sim swarm``: the swarm against the star at a few
sizes (``swarm_table``), and issue 26's targets, each MET or MISSED
(``swarm_targets``).  The runs themselves are ``sim.swarm``'s."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .swarm import SwarmResult, SwarmSpec, run_swarm, simulate

__all__ = ["Target", "swarm_table", "swarm_targets"]


def swarm_table(sizes: list[int], chunks: int = 256, seed: int = 1,
                progress: Callable[[SwarmResult], None] | None = None) -> list[list[str]]:
    """For each swarm size: the last receiver's time against S/B, the star's
    (simulated) time, and how much the seed and everyone uploaded."""
    rows = [["receivers", "swarm last / (S/B)", "star last / (S/B)", "star / swarm", "seed sent / S",
             "all sent / (N x S)", "endgame dups", "wall s"]]
    for n in sizes:
        sw = run_swarm(n, chunks=chunks, seed=seed)
        st = run_swarm(n, chunks=chunks, seed=seed, star=True)
        if progress is not None:
            progress(sw)
        rows.append([
            str(n),
            f"{sw.last_s / sw.s_over_b:.2f}",
            f"{st.last_s / st.s_over_b:.2f}",
            f"{st.last_s / sw.last_s:.1f}x",
            f"{sw.seed_sent / sw.size:.2f}",
            f"{sw.bytes_sent / (n * sw.size):.3f}",
            str(sw.duplicates),
            f"{sw.wall_s + st.wall_s:.1f}",
        ])
    return rows


@dataclass(frozen=True)
class Target:
    what: str
    measured: float
    limit: float
    unit: str = "x"

    @property
    def met(self) -> bool:
        return self.measured <= self.limit

    def row(self) -> list[str]:
        if self.unit == "%":
            m, lim = f"{100 * self.measured:.2f}%", f"{100 * self.limit:g}%"
        elif self.unit == "s":
            m, lim = f"{self.measured:.0f} s", f"{self.limit:g} s"
        else:
            m, lim = f"{self.measured:.3f}{self.unit}", f"{self.limit:g}{self.unit}"
        return [self.what, m, f"<= {lim}", "MET" if self.met else "MISSED"]


def _worst(r: SwarmResult) -> float:
    return max(r.bound_ratio.values())


def swarm_targets(*, seed: int = 1, big: int = 1000,
                  progress: Callable[[str, SwarmResult], None] | None = None) -> list[Target]:
    """Issue 26's targets in the simulator: one seed, equal links, 256
    chunks at 100 and ``big`` receivers; 10% slow receivers; 10% dying and
    10% joining late; two seeds; four racks of 25 behind one shared uplink
    each; the control plane against the data at 100."""
    def run(name: str, spec: SwarmSpec) -> SwarmResult:
        r = simulate(spec)
        if progress is not None:
            progress(name, r)
        return r

    out = []
    r100 = run("100 receivers", SwarmSpec(100, seed=seed))
    out += [
        Target("slowest / (S/B), 100 receivers", r100.last_s / r100.s_over_b, 1.10),
        Target("seed sent / S, 100 receivers", r100.seed_sent / r100.size, 1.10),
        Target("all bytes sent / (N x S), 100 receivers", r100.bytes_sent / (100 * r100.size), 1.02),
        Target("control plane / data bytes, 100 receivers", sum(r100.control.values()) / r100.bytes_sent, 0.01,
               "%"),
    ]
    rbig = run(f"{big} receivers", SwarmSpec(big, seed=seed))
    out += [
        Target(f"slowest / (S/B), {big:,} receivers", rbig.last_s / rbig.s_over_b, 1.25),
        Target(f"seed sent / S, {big:,} receivers", rbig.seed_sent / rbig.size, 1.10),
        Target(f"all bytes sent / (N x S), {big:,} receivers", rbig.bytes_sent / (big * rbig.size), 1.02),
        Target(f"wall time of the {big:,}-receiver run", rbig.wall_s, 180.0, "s"),
    ]
    slow = run("10% slow", SwarmSpec(100, seed=seed, slow=0.1))
    out.append(Target("10% on a quarter of the link: slowest / its own bound", _worst(slow), 1.15))
    churn = run("10% die, 10% late", SwarmSpec(100, seed=seed, die=0.1, late=0.1))
    out.append(Target("10% die, 10% join late: slowest healthy / its own bound", _worst(churn), 1.15))
    two = run("two seeds", SwarmSpec(100, seed=seed, seeds=2))
    out.append(Target("two seeds: slowest / its own bound", _worst(two), 1.15))
    racks = run("4 racks", SwarmSpec(100, seed=seed, racks=4))
    out.append(Target("4 racks of 25: the most a rack pulled across its uplink / S",
                      max(racks.rack_in) / racks.size, 1.10))
    return out
