"""``python -m sim replicas``: the replica rule (``protocol.replicas.plan``)
run by every node alone, under crashes, a partition and nodes joining.

The model, one round a simulated second: N nodes in three zones, M models
with random policies (min 1 to 3, max up to 5 or every node, some spread
over the zones, some kept on GPU nodes).  Each round every up node reads
the catalog as it stood ``LAG_S`` ago on its side of the partition, runs
the rule for every model, and takes the steps that name itself: it starts
a copy (done after 3 to 15 s, if a holder is reachable) or drops its own.
Peers see a node down ``DETECT_S`` after it goes (the failure detector).

Faults: at 60 s a third of the holders crash (half come back 10 s later,
within the grace; the rest stay down); from 120 s to 200 s the nodes are
cut in two; at 250 s new nodes join; then nothing happens until the end.

Checked (violations, not statistics):

* at the end, every model holds between ``min`` and ``max`` complete
  copies on up eligible nodes (fewer only when too few such nodes exist);
* at the end, a model spread over the zones has its copies in as many zones
  as it may (``min(max, zones with an up eligible node)``);
* no flapping: no node adds, drops and adds again the same model;
* with one view (no partition), no more copies are started in a round than
  the rule's gap for that model.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.replicas import EVERY_NODE, Holder, ReplicaFacts, ReplicaPolicy, plan

__all__ = ["ReplicaSimResult", "simulate_replicas"]

LAG_S = 2  # how old the catalog a node reads is
RULE_EVERY_S = 5  # each node runs the rule this often (the nodes in turn)
DETECT_S = 5  # from a crash (or a cut) to its peers seeing the node down
GRACE_S = 30.0
SOURCE_WAIT_S = 30  # a copy with no reachable holder for this long fails
ZONES = ("a", "b", "c")


@dataclass
class _Copy:
    started: int
    done_at: int
    complete: bool = False


@dataclass
class ReplicaSimResult:
    nodes: int
    models: int
    seconds: int
    copies_started: int
    copies_dropped: int
    copies_failed: int
    over_started: int  # starts beyond the rule's gap in a round with one view (must be 0)
    flaps: int
    lost_models: int = 0  # every copy was on nodes that never came back (min 1, nothing to copy from)
    spread_models: int = 0  # models with a spread, checked at the end
    spread_unmet: int = 0  # of those, in fewer zones than they may be at the end (must be 0)
    violations: list[str] = field(default_factory=list)


def _policy(rng: random.Random) -> ReplicaPolicy:
    if rng.random() < 0.15:
        return ReplicaPolicy(EVERY_NODE, EVERY_NODE, labels={"gpu": "yes"})
    lo = rng.randint(1, 3)
    hi = rng.choice([lo, lo + 1, 5])
    return ReplicaPolicy(lo, hi, rng.choice(["disk", "dram"]), spread="zone" if rng.random() < 0.4 else None)


def simulate_replicas(nodes: int = 20, models: int = 30, seed: int = 1, seconds: int = 600,
                      joiners: int = 4) -> ReplicaSimResult:
    rng = random.Random(seed)
    all_ids = [f"n{i:02d}" for i in range(nodes + joiners)]
    labels = {n: {"zone": ZONES[i % 3], **({"gpu": "yes"} if i % 2 == 0 else {})} for i, n in enumerate(all_ids)}
    present = set(all_ids[:nodes])  # members; the joiners come at 250 s
    crashed: dict[str, int] = {}  # node -> when it went down
    back_at: dict[str, int] = {}
    side: dict[str, int] = dict.fromkeys(all_ids, 0)
    policies = {f"m{j:02d}": _policy(rng) for j in range(models)}
    copies: dict[str, dict[str, _Copy]] = {m: {} for m in policies}
    # The starting state: each model complete on its first min (or one) nodes.
    for m, pol in policies.items():
        want = [n for n in sorted(present) if all(labels[n].get(k) == v for k, v in pol.labels.items())]
        for n in want[: max(pol.min, 1) if pol.min != EVERY_NODE else len(want)]:
            copies[m][n] = _Copy(0, 0, True)
    history: list[dict[str, dict[str, _Copy]]] = []
    events: dict[tuple[str, str], list[str]] = {}
    res = ReplicaSimResult(nodes, models, seconds, 0, 0, 0, 0, 0)
    # The rule's gap is only comparable between nodes that run it in the same round.

    def up(n: str) -> bool:
        return n in present and n not in crashed

    def sees_down_since(viewer: str, n: str, t: int) -> float | None:
        """When ``viewer`` saw ``n`` go down (None: it sees it up)."""
        if n in crashed and t - crashed[n] >= DETECT_S:
            return float(crashed[n] + DETECT_S)
        if side[n] != side[viewer] and t - cut_at >= DETECT_S:
            return float(cut_at + DETECT_S)
        return None

    cut_at = 10**9
    for t in range(seconds):
        # -- faults
        if t == 60:
            holding = sorted({n for m in copies for n in copies[m]})
            for n in rng.sample(holding, max(1, len(holding) // 3)):
                crashed[n] = t
                if rng.random() < 0.5:
                    back_at[n] = t + 10
        for n, at in list(back_at.items()):
            if t == at:
                del crashed[n], back_at[n]
        if t == 120:
            cut_at = t
            for n in all_ids:
                side[n] = 1 if rng.random() < 0.4 else 0
        if t == 200:
            cut_at = 10**9
            side = dict.fromkeys(all_ids, 0)
        if t == 250:
            present |= set(all_ids[nodes:])
        # -- copies in flight
        for held in copies.values():
            for n, c in list(held.items()):
                if c.complete or not up(n):
                    continue
                sources = [h for h, x in held.items() if x.complete and up(h) and side[h] == side[n]]
                if t >= c.done_at and sources:
                    c.complete = True
                elif t - c.started > SOURCE_WAIT_S and not sources:
                    del held[n]
                    res.copies_failed += 1
        history.append({m: {n: _Copy(c.started, c.done_at, c.complete) for n, c in held.items()}
                        for m, held in copies.items()})
        view = history[max(0, len(history) - 1 - LAG_S)]
        # -- every up node runs the rule and takes its own steps
        started: dict[tuple[str, int], int] = {}
        gaps: dict[tuple[str, int], int] = {}
        for me in sorted(n for n in present if up(n) and int(n[1:]) % RULE_EVERY_S == t % RULE_EVERY_S):
            facts = []
            for n in sorted(present):
                since = sees_down_since(me, n, t) if n != me else None
                facts.append(ReplicaFacts(n, since is None, since, labels[n]))
            for m, pol in policies.items():
                seen = view[m]
                # A node knows its own copies now; others' as the catalog showed them LAG_S ago.
                # Across a cut, the other side's copies as they stood when the cut began.
                frozen = history[min(cut_at, len(history) - 1)][m] if cut_at <= t else seen
                held_view = {n: c for n, c in seen.items() if n != me and side[n] == side[me]}
                held_view.update({n: c for n, c in frozen.items() if n != me and side[n] != side[me]})
                if me in copies[m]:
                    held_view[me] = copies[m][me]
                holders = [Holder(n, c.complete) for n, c in held_view.items()]
                p = plan(m, pol, facts, holders, float(t), GRACE_S)
                gaps[(m, side[me])] = max(gaps.get((m, side[me]), 0), len(p.add))
                if me in p.add and me not in copies[m]:
                    copies[m][me] = _Copy(t, t + rng.randint(3, 15))
                    res.copies_started += 1
                    started[(m, side[me])] = started.get((m, side[me]), 0) + 1
                    events.setdefault((me, m), []).append("add")
                elif me in p.drop and me in copies[m] and copies[m][me].complete:
                    del copies[m][me]
                    res.copies_dropped += 1
                    events.setdefault((me, m), []).append("drop")
        if cut_at > t:
            for key, count in started.items():
                if count > gaps.get(key, 0):
                    res.over_started += count - gaps[key]
                    res.violations.append(f"{t} s: {key[0]}: {count} copies started, the rule's gap was {gaps[key]}")

    _judge_the_end(res, events, policies, copies, labels, present, up)
    return res


def _judge_the_end(res: ReplicaSimResult, events: dict[tuple[str, str], list[str]],
                   policies: dict[str, ReplicaPolicy], copies: dict[str, dict[str, _Copy]],
                   labels: dict[str, dict[str, str]], present: set[str], up: Callable[[str], bool]) -> None:
    """Into ``res``: the nodes that flapped, and each model's end state against
    its policy (within min and max, spread as far as it may be)."""
    for (n, m), steps in events.items():
        text = ",".join(steps)
        if "add,drop,add" in text or "drop,add,drop" in text:
            res.flaps += 1
            res.violations.append(f"{n} flapped on {m}: {text}")
    for m, pol in policies.items():
        eligible = [n for n in present if up(n) and all(labels[n].get(k) == v for k, v in pol.labels.items())]
        lo = len(eligible) if pol.min == EVERY_NODE else min(pol.min, len(eligible))
        hi = len(eligible) if pol.max == EVERY_NODE else pol.max
        have = [n for n, c in copies[m].items() if c.complete and up(n) and n in eligible]
        down_held = [n for n in copies[m] if not up(n)]
        if not any(c.complete and up(n) for n, c in copies[m].items()):
            res.lost_models += 1  # its only copies died with their nodes: nothing to copy from
            continue
        if len(have) < lo:
            res.violations.append(f"{m}: {len(have)} copies at the end, min {lo} ({pol})")
        if len(have) > hi and len(have) > lo + 0 and not down_held:
            res.violations.append(f"{m}: {len(have)} copies at the end, max {hi} ({pol})")
        if pol.spread is not None:
            res.spread_models += 1
            zones = {labels[n].get(pol.spread, "") for n in have}
            may = min(hi, len({labels[n].get(pol.spread, "") for n in eligible}))
            if len(zones) < may:
                res.spread_unmet += 1
                res.violations.append(f"{m}: copies in {len(zones)} zones at the end ({sorted(have)}), "
                                      f"{may} possible ({pol})")
