"""``python -m sim sweep``: many seeded chaos runs over random parameters,
with the violations counted by kind.

Each seed draws its own run: 5 to 40 nodes, 0 to 30% loss, 0 to 3 s of
clock skew, up to three crashes (some restarted), one clean leave, and a
partition or none, then ``scenarios.chaos`` runs it and its invariants are
checked.  The same seed always draws the same run, so a violation found
here is reproduced by ``python -m sim run`` with the parameters printed.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing import get_context

from .scenarios import ChaosSpec, chaos

__all__ = ["SweepResult", "draw", "sweep"]

_KINDS = [
    ("left seen as not left", re.compile(r"sees left node")),
    ("lost registration", re.compile(r"lost registration")),
    ("catalogs differ", re.compile(r"distinct catalog digests")),
    ("model views differ", re.compile(r"distinct resolved model views")),
    ("live node unknown or dead", re.compile(r"pairs: the live node is unknown")),
    ("stale digest", re.compile(r"stale")),
    ("false death", re.compile(r"^false death")),
    ("crash not detected", re.compile(r"crash|dead", re.I)),
]


def kind_of(violation: str) -> str:
    for name, pattern in _KINDS:
        if pattern.search(violation):
            return name
    return "other"


def draw(seed: int) -> ChaosSpec:
    """The run a seed stands for."""
    rng = random.Random(seed)
    nodes = rng.randint(5, 40)
    crashes = rng.randint(0, min(3, nodes - 4))
    split = rng.random() < 0.7
    t1 = rng.uniform(10.0, 40.0)
    return ChaosSpec(
        nodes=nodes,
        seed=seed,
        loss=round(rng.uniform(0.0, 0.3), 3),
        duration_s=120.0,
        partition=(round(t1, 1), round(t1 + rng.uniform(5.0, 35.0), 1)) if split else None,
        groups=2,
        crashes=crashes,
        restarts=rng.randint(0, crashes),
        leaves=1,
        models=rng.randint(1, 6),
        conflicts=rng.randint(0, 2) if split else 0,
        skew_max_s=round(rng.uniform(0.0, 3.0), 2),
        quiet_s=40.0,
        measure_bytes=False,
    )


def _one(seed: int) -> tuple[int, list[str], int]:
    out = chaos(draw(seed))
    return seed, out.violations, int(out.metrics["leaves_unheard"])


@dataclass
class SweepResult:
    seeds: int
    by_kind: Counter[str] = field(default_factory=Counter)
    failed: dict[int, list[str]] = field(default_factory=dict)  # seed -> its violations
    # Leaves no peer acknowledged (the node was cut off from all of them): a crash
    # to the rest, and not a violation, but counted so that it is seen.
    leaves_unheard: int = 0


def sweep(seeds: range, processes: int = 0) -> SweepResult:
    out = SweepResult(len(seeds))
    ctx = get_context("fork")
    with ctx.Pool(processes or None) as pool:
        for seed, violations, unheard in pool.imap_unordered(_one, seeds, chunksize=4):
            out.leaves_unheard += unheard
            if violations:
                out.failed[seed] = violations
                out.by_kind.update({kind_of(v) for v in violations})
    return out
