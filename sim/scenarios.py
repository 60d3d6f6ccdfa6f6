"""Scenarios: the fault schedules the CLI, the bench and the tests run.

``chaos`` is the general one: N nodes on a lossy, delayed network with clock
skew; registrations (some of the same model on both sides of a partition); a
partition into groups at ``t1`` healed at ``t2``; crashes (some restarted with
a higher generation and their catalog restored from disk); a graceful leave;
then a quiet time, a probe update timed to every live node, and the
end-of-run invariants.  The smaller functions measure one thing each and are
what ``bench`` runs over many seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from protocol.gossip import GossipConfig

from .audit import CrashWatch, SpreadWatch
from .engine import SimConfig, Simulation

__all__ = [
    "ChaosSpec",
    "Outcome",
    "bytes_per_round",
    "chaos",
    "crash_detection",
    "false_deaths",
    "spread",
]


@dataclass(frozen=True, slots=True)
class ChaosSpec:
    nodes: int = 50
    seed: int = 1
    loss: float = 0.05
    duration_s: float = 120.0
    partition: tuple[float, float] | None = (30.0, 60.0)
    groups: int = 2
    crashes: int = 2
    restarts: int = 1  # how many of the crashed come back
    leaves: int = 1
    models: int = 6
    conflicts: int = 2  # models registered on both sides of the partition
    skew_max_s: float = 0.5
    delay_min_s: float = 0.001
    delay_jitter_s: float = 0.004
    quiet_s: float = 40.0  # no faults in the last quiet_s seconds
    cold: bool = False
    wire: bool = False
    measure_bytes: bool = True


@dataclass(slots=True)
class Outcome:
    trace_hash: str
    violations: list[str]
    metrics: dict[str, Any] = field(default_factory=dict)


def _sim(spec: ChaosSpec) -> Simulation:
    return Simulation(
        SimConfig(
            nodes=spec.nodes,
            seed=spec.seed,
            loss=spec.loss,
            delay_min_s=spec.delay_min_s,
            delay_jitter_s=spec.delay_jitter_s,
            skew_max_s=spec.skew_max_s,
            warm=not spec.cold,
            wire=spec.wire,
            measure_bytes=spec.measure_bytes,
        )
    )


def chaos(spec: ChaosSpec) -> Outcome:
    assert spec.duration_s > spec.quiet_s > 0
    sim = _sim(spec)
    rng = sim.rng
    n = spec.nodes
    fault_end = spec.duration_s - spec.quiet_s
    t_start = 5.0 if not spec.cold else 10.0
    # Who crashes, restarts and leaves: distinct nodes, never a seed (so restarts can rejoin).
    pool = list(range(min(n, sim.cfg.seeds), n))
    rng.shuffle(pool)
    crashed = pool[: spec.crashes]
    leavers = pool[spec.crashes : spec.crashes + spec.leaves]
    watches: list[CrashWatch] = []

    def crash(i: int) -> None:
        sim.crash(i)
        watches.append(sim.watch_crash(i))

    for k, i in enumerate(crashed):
        t = rng.uniform(t_start, max(t_start, fault_end - 20.0))
        sim.at(t, partial(crash, i))
        if k < spec.restarts:
            sim.at(t + rng.uniform(5.0, 15.0), partial(sim.restart, i))
    for i in leavers:
        sim.at(rng.uniform(t_start, fault_end), partial(sim.leave, i))

    # Registrations spread over the run; conflicting ones go to both sides of the partition.
    groups: list[int] | None = None
    if spec.partition is not None:
        groups = [rng.randrange(spec.groups) for _ in range(n)]
        t1, t2 = spec.partition
        assert t2 <= fault_end, "the partition must heal before the quiet time"
        sim.at(t1, partial(sim.partition, groups))
        sim.at(t2, sim.heal)

    def register(model: str, side: int | None) -> None:
        cand = [i for i in sim.live() if side is None or groups is None or groups[i] == side]
        if cand:
            sim.register(rng.choice(cand), model)

    for m in range(spec.models):
        sim.at(rng.uniform(t_start, fault_end), partial(register, f"model-{m}", None))
    if spec.partition is not None:
        t1, t2 = spec.partition
        for c in range(spec.conflicts):
            for side in range(spec.groups):
                t = rng.uniform(t1 + 1.0, t2 - 1.0)
                sim.at(t, partial(register, f"contested-{c}", side))

    sim.run_until(fault_end + spec.quiet_s / 2)
    live = sim.live()
    probe: SpreadWatch | None = None
    if live:
        probe = sim.write_probe(rng.choice(live), "probe", sim.now)
    bytes0 = sim.bytes_total
    t_probe = sim.now
    sim.run_until(spec.duration_s)

    violations = list(sim.violations)
    violations.extend(sim.audit.check_converged())
    violations.extend(sim.audit.left_seen_as_left())
    for ev in sim.audit.false_deaths:
        violations.append(f"false death: node {ev.observer} declared {ev.target} (gen {ev.generation}) dead at t={ev.t:.2f}")
    gi = sim.cfg.gossip.gossip_interval_s
    live_n = max(1, len(sim.live()))
    metrics: dict[str, Any] = {
        "nodes": n,
        "live_at_end": len(sim.live()),
        "delivered": sim.delivered,
        "sent": sim.net.sent,
        "lost": sim.net.lost,
        "cut_by_partition": sim.net.cut,
        "suspicions": sim.audit.suspicions,
        "false_suspicions": len(sim.audit.false_suspicions),
        "deaths_declared": sim.audit.deaths,
        "false_deaths": len(sim.audit.false_deaths),
        "suspect_pairs_at_end": sim.audit.suspected_at_end,
        "writes": len(sim.writes),
        "leaves_unheard": sum(1 for j in range(n) if sim.left[j] and not sim.left_acked[j]),
        "crash_agreed_dead_s": [w.all_dead for w in watches if not w.abandoned],
        "crash_first_dead_s": [w.first_dead for w in watches if not w.abandoned],
        "bytes_per_node_per_round": sim.bytes_total / (live_n * spec.duration_s / gi),
        "quiet_bytes_per_node_per_round": (sim.bytes_total - bytes0)
        / (live_n * max(sim.now - t_probe, gi) / gi),
    }
    if probe is not None:
        t99, t100 = probe.time_to(0.99), probe.time_to(1.0)
        metrics["probe_s_to_99"] = t99
        metrics["probe_s_to_100"] = t100
        metrics["probe_rounds_to_99"] = None if t99 is None else t99 / gi
        metrics["probe_rounds_to_100"] = None if t100 is None else t100 / gi
        if t100 is None:
            violations.append(f"probe update reached {len(probe.times)} of {probe.targets} live nodes")
    return Outcome(sim.trace_hash(), violations, metrics)


# -- single measurements (what bench runs per seed) ---------------------------------


STEADY_FROM_S = 15.0
STEADY_FOR_S = 10.0


def spread(nodes: int, seed: int, loss: float, *, rounds_max: int = 40, measure_bytes: bool = False,
           gossip: GossipConfig | None = None) -> dict[str, Any]:
    """One update written on a random node of a quiet mesh: time to reach 99% and 100%."""
    cfg = SimConfig(nodes=nodes, seed=seed, loss=loss, measure_bytes=measure_bytes)
    if gossip is not None:
        cfg = replace(cfg, gossip=gossip)
    sim = Simulation(cfg)
    gi = cfg.gossip.gossip_interval_s
    sim.run_until(2.0)  # random gossip phases settle
    steady = math.nan
    if measure_bytes:  # a quiet window, for the steady-state byte rate
        # Past the start (each node's first writes and full syncs spread in
        # the first seconds): what an idle mesh sends, round after round.
        sim.run_until(STEADY_FROM_S)
        steady0, t0 = sim.bytes_total, sim.now
        sim.run_until(STEADY_FROM_S + STEADY_FOR_S)
        steady = (sim.bytes_total - steady0) / (nodes * (sim.now - t0) / gi)
    origin = sim.rng.randrange(nodes)
    w = sim.write_probe(origin, "probe", {"seed": seed})
    b0 = sim.bytes_total
    step = gi / 4
    while not w.done and sim.now - w.t0 < rounds_max * gi:
        sim.run_for(step)
    elapsed = sim.now - w.t0
    t99, t100 = w.time_to(0.99), w.time_to(1.0)
    return {
        "seed": seed,
        "rounds_to_99": math.inf if t99 is None else t99 / gi,
        "rounds_to_100": math.inf if t100 is None else t100 / gi,
        "s_to_100": math.inf if t100 is None else t100,
        "steady_bytes": steady,
        "spread_bytes": (sim.bytes_total - b0) / (nodes * max(elapsed, gi) / gi),
        "violations": len(sim.violations),
    }


def crash_detection(nodes: int, seed: int, loss: float = 0.0, *, limit_s: float = 90.0) -> dict[str, Any]:
    """One random node crashes in a quiet mesh: until every live node agrees it is dead."""
    sim = Simulation(SimConfig(nodes=nodes, seed=seed, loss=loss))
    sim.run_until(3.0)
    target = sim.rng.randrange(nodes)
    sim.crash(target)
    w = sim.watch_crash(target)
    while w.all_dead is None and sim.now - w.t0 < limit_s:
        sim.run_for(0.5)
    return {
        "seed": seed,
        "agreed_dead_s": math.inf if w.all_dead is None else w.all_dead,
        "first_dead_s": math.inf if w.first_dead is None else w.first_dead,
        "false_deaths": len(sim.audit.false_deaths),
        "violations": len(sim.violations),
    }


def false_deaths(nodes: int, seed: int, loss: float, duration_s: float) -> dict[str, Any]:
    """A healthy mesh on a lossy network for ``duration_s``: every death is false."""
    sim = Simulation(SimConfig(nodes=nodes, seed=seed, loss=loss, check_sample=4))
    sim.run_until(duration_s)
    return {
        "seed": seed,
        "duration_s": duration_s,
        "false_deaths": len(sim.audit.false_deaths),
        "deaths": sim.audit.deaths,
        "suspicions": sim.audit.suspicions,
        "false_suspicions": len(sim.audit.false_suspicions),
        "violations": len(sim.violations),
        "delivered": sim.delivered,
    }


def heal(nodes: int, seed: int, loss: float, redial_s: float | None = None, *, cut_s: float = 30.0,
         limit_s: float = 120.0) -> dict[str, Any]:
    """Two halves cut apart for ``cut_s`` (each declares the other dead), one
    write on each side, then the cut heals: time until every live node sees
    every other alive and all catalogs agree.  ``redial_s`` overrides the
    re-dial interval of dead members (the lever that finds the other side)."""
    gossip = GossipConfig() if redial_s is None else GossipConfig(redial_interval_s=redial_s)
    sim = Simulation(SimConfig(nodes=nodes, seed=seed, loss=loss, gossip=gossip))
    sim.run_until(3.0)
    sim.partition([i % 2 for i in range(nodes)])
    sim.run_until(3.0 + cut_s / 2)
    sim.register(0, "west")
    sim.register(1, "east")
    sim.run_until(3.0 + cut_s)
    dead_during = sim.audit.membership_gaps()[0]
    sim.heal()
    t0 = sim.now
    gi = gossip.gossip_interval_s
    took = math.inf
    while sim.now - t0 < limit_s:
        sim.run_for(gi / 4)
        live = sim.live()
        if sim.audit.membership_gaps()[0] == 0 and len({sim.node(i).catalog.digest_hash() for i in live}) == 1:
            took = sim.now - t0
            break
    return {"seed": seed, "dead_pairs_during_cut": dead_during, "s_to_heal": took, "rounds_to_heal": took / gi,
            "violations": len(sim.violations)}


def bytes_per_round(nodes: int, seed: int, loss: float) -> dict[str, Any]:
    return spread(nodes, seed, loss, measure_bytes=True)
