"""``python -m sim serving``: engines that crash and hang, watched by the
daemon's own state machine (``protocol.serving.ServiceLife``) with its
default policy, in simulated time.

Each service's engine is, at any moment, up, crashed (its process exited:
the supervisor hears it at once), or hung (it answers no probe: only the
probes can tell).  Faults strike at random (``--crash-every`` and
``--hang-every`` seconds on average, per service); a respawned engine is
healthy after a startup time.  The supervisor probes every
``probe_interval_s`` with a timeout and acts on what ``ServiceLife``
returns: kill, respawn after the backoff, give up.

Checked for every service (violations): a hang is caught within 30 s and a
crash at once; a service gives up only after ``crash_limit`` crashes within
``crash_window_s``; no engine is started while one runs or after a stop;
every wait before a respawn is within the backoff's bounds.  Printed: the
time to catch hangs and crashes, availability, restarts, and services given
up.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

from protocol.serving import LifePolicy, ServiceAction, ServiceLife, ServiceState

__all__ = ["ServingSimResult", "simulate_serving"]

HANG_TARGET_S = 30.0
STARTUP_S = 20.0  # a respawned engine loads its weights this long before it is healthy


@dataclass
class ServingSimResult:
    services: int
    hours: float
    hangs_caught_s: list[float] = field(default_factory=list)
    crashes_caught_s: list[float] = field(default_factory=list)
    healthy_s: float = 0.0
    restarts: int = 0
    given_up: int = 0
    violations: list[str] = field(default_factory=list)

    @property
    def availability(self) -> float:
        return self.healthy_s / (self.services * self.hours * 3600)


def simulate_serving(services: int = 200, hours: float = 6.0, seed: int = 1, crash_every_s: float = 3 * 3600,
                     hang_every_s: float = 6 * 3600, policy: LifePolicy | None = None) -> ServingSimResult:
    p = policy or LifePolicy()
    rng = random.Random(seed)
    end = hours * 3600
    res = ServingSimResult(services, hours)
    for i in range(services):
        _one(i, p, rng, end, crash_every_s, hang_every_s, res)
    return res


def _one(i: int, p: LifePolicy, rng: random.Random, end: float, crash_every_s: float, hang_every_s: float,
         res: ServingSimResult) -> None:
    life = ServiceLife(p)
    engine = "up"  # up, hung, crashed, none
    ready_at = STARTUP_S  # the first start loads too
    fault_at = 0.0
    events: list[tuple[float, int, str]] = []
    seq = 0

    def at(t: float, what: str) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, what))

    def next_fault(now: float) -> None:
        c, h = rng.expovariate(1 / crash_every_s), rng.expovariate(1 / hang_every_s)
        at(now + min(c, h), "crash" if c < h else "hang")

    life.spawned(0.0)
    at(STARTUP_S / 4, "probe")
    next_fault(0.0)
    healthy_since: float | None = None
    crash_times: list[float] = []
    while events:
        now, _, what = heapq.heappop(events)
        if now > end:
            break
        was_healthy = life.state is ServiceState.HEALTHY
        act = ServiceAction.NOTHING
        if what in ("crash", "hang") and engine == "up" and now >= ready_at:
            engine = "crashed" if what == "crash" else "hung"
            fault_at = now
            if what == "crash":  # the process exits: the supervisor's wait returns now
                crash_times.append(now)
                act = life.exited(now, -9)
                res.crashes_caught_s.append(0.0)
                engine = "none"
        elif what in ("crash", "hang"):
            next_fault(now)
            continue
        elif what == "probe":
            if life.state in (ServiceState.ERROR, ServiceState.RESTARTING, ServiceState.STOPPED):
                continue
            ok = engine == "up" and now >= ready_at
            act = life.probe_ok(now) if ok else life.probe_failed(now, "no answer")
            at(now + (0.5 if life.state is ServiceState.STARTING else p.probe_interval_s) + (0 if ok else p.probe_timeout_s),
               "probe")
        elif what == "respawn":
            if life.state is not ServiceState.RESTARTING:
                continue
            if engine not in ("none",):
                res.violations.append(f"service {i}: respawned at {now:.0f} s while an engine still ran")
            life.spawned(now)
            engine, ready_at = "up", now + STARTUP_S
            at(now + 0.5, "probe")
            next_fault(now)
        if act is ServiceAction.KILL:
            if engine == "hung":
                caught = now - fault_at
                res.hangs_caught_s.append(caught)
                if caught > HANG_TARGET_S:
                    res.violations.append(f"service {i}: a hang caught after {caught:.0f} s")
                crash_times.append(now)
            engine = "none"
        if life.state is ServiceState.RESTARTING and what != "respawn" and act in (ServiceAction.KILL, ServiceAction.SPAWN):
            assert life.restart_at is not None
            wait = life.restart_at - now
            if not p.backoff_initial_s - 1e-6 <= wait <= p.backoff_max_s + 1e-6:
                res.violations.append(f"service {i}: a backoff of {wait:.0f} s")
            res.restarts += 1
            at(life.restart_at, "respawn")
        if life.state is ServiceState.ERROR:
            recent = [t for t in crash_times if now - t < p.crash_window_s]
            if len(recent) < p.crash_limit and life.ever_healthy:
                res.violations.append(f"service {i}: gave up after {len(recent)} crashes in the window")
            res.given_up += 1
            if healthy_since is not None:
                res.healthy_s += now - healthy_since
            return
        is_healthy = life.state is ServiceState.HEALTHY
        if is_healthy and not was_healthy:
            healthy_since = now
        elif was_healthy and not is_healthy and healthy_since is not None:
            res.healthy_s += now - healthy_since
            healthy_since = None
    if healthy_since is not None:
        res.healthy_s += end - healthy_since
