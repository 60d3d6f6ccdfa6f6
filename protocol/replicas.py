"""Replica policy: how many copies of a model the mesh keeps, and on which
nodes, decided by every node alone from the same catalog.

Theory of operation
-------------------
A model may carry a policy (``ReplicaPolicy``): at least ``min`` and at
most ``max`` copies (``-1``: every eligible node) on one tier (``disk`` or
``dram``), only on nodes whose labels match ``labels``, spread over the
values of the label ``spread`` when it is set.

Each node runs ``plan`` over what it reads in the catalog (which nodes hold a
copy or are making one, which are up, since when the others are down) and
acts only on the steps that name itself: it adds a copy (pulling it from the
mesh) or drops its own.  No node asks another, and no two nodes take the same
step, because every node ranks the candidates the same way: a rendezvous
hash of the model and the node id (with the spread first), so the ranking of
two nodes does not depend on who else is in the mesh.

Counting:

* a holder that is up, or making its copy now, *counts*;
* a holder down for less than ``grace_s`` still counts (a restarting node
  is not a lost one);
* a holder down for longer is *lost*: it no longer counts toward ``min``,
  but it still takes a place under ``max`` until its records leave the
  catalog, so that a lost copy is replaced only while the count is below
  ``min``, and new nodes that join fill the model up to ``max``.

Steps:

* below ``min``: add ``min - counted`` copies on the best-ranked eligible
  nodes without one;
* below ``max`` (lost ones included): add up to ``max`` the same way;
* above ``max`` (counting only holders that are up and complete): the
  worst-ranked holders drop theirs, never below ``min`` and never a copy
  that is in use;
* a copy on a node the labels do not take (a *stray*, counted apart as
  ``outside``) is dropped once the copies inside the labels reach ``min``.

Spread: with ``spread`` set, the copies should cover ``min(max, D)``
distinct values of that label, ``D`` being the values the counted holders
and the eligible nodes with room offer (the *target*).  While fewer values
are covered, the rule adds one copy in each missing value (best-ranked node
of each), even above ``max`` and even while lost copies take their places
under it: a zone's outage must not take every copy with it.  Once the new
copies are complete, the copies above ``max`` go, from the most crowded
value first (tie: the rank), and never one whose removal would leave fewer
values covered than the target.  So the rule moves toward the spread: add
in the missing value, then drop in the crowded one, and stops there.

Every quantity is bounded: at most ``ADDS_AT_ONCE_MAX`` copies are started
for one model in one round, and the ranking is stable, so the rule does not
flap: a node it picks stays picked while the inputs stay the same.  An add
never lowers the number of values covered and a drop never takes it below
the target, which an add or drop leaves as it was; so from any start the
copies reach the target and stay there.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import LocalProtocolError

__all__ = [
    "ADDS_AT_ONCE_MAX",
    "EVERY_NODE",
    "Holder",
    "Plan",
    "ReplicaFacts",
    "ReplicaPolicy",
    "parse_labels",
    "plan",
]

EVERY_NODE = -1
TIERS = ("disk", "dram")
ADDS_AT_ONCE_MAX = 8  # copies of one model started in one round, whatever the gap
LABELS_MAX = 16
LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
REPLICAS_MAX = 1024


class InvalidPolicy(LocalProtocolError):
    """A policy or a label that cannot be: the message says what and why."""


def _label_part(text: str, what: str) -> str:
    if not 0 < len(text) <= 63 or not set(text) <= LABEL_CHARS:
        raise InvalidPolicy(f"{what} {text[:70]!r}: 1 to 63 letters, digits, '-', '_' or '.'")
    return text


def parse_labels(text: str | Mapping[str, Any] | None) -> dict[str, str]:
    """``zone=a,gpu=h100`` (or a mapping) as labels, or ``InvalidPolicy``."""
    if text is None:
        return {}
    pairs: Iterable[tuple[Any, Any]]
    if isinstance(text, str):
        items = [p.strip() for p in text.split(",") if p.strip()]
        if any("=" not in p for p in items):
            raise InvalidPolicy("labels are KEY=VALUE pairs separated by commas, e.g. zone=a,gpu=h100")
        pairs = [(k, v) for k, _, v in (p.partition("=") for p in items)]
    elif isinstance(text, Mapping):
        pairs = text.items()
    else:
        raise InvalidPolicy("labels must be KEY=VALUE pairs or an object of strings")
    out: dict[str, str] = {}
    for k, v in pairs:
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidPolicy("labels: keys and values are strings")
        out[_label_part(k.strip(), "label key")] = _label_part(v.strip(), "label value")
    if len(out) > LABELS_MAX:
        raise InvalidPolicy(f"at most {LABELS_MAX} labels")
    return out


@dataclass(frozen=True, slots=True)
class ReplicaPolicy:
    """How many copies of a model, on which tier and which nodes."""

    min: int = 1
    max: int = 1
    tier: str = "disk"
    labels: Mapping[str, str] = field(default_factory=dict)  # a node must carry all of them
    spread: str | None = None  # a label whose values the copies are spread over

    def __post_init__(self) -> None:
        if not (self.min == EVERY_NODE or 0 <= self.min <= REPLICAS_MAX):
            raise InvalidPolicy(f"replicas min must be -1 (every node) or 0 to {REPLICAS_MAX}")
        if not (self.max == EVERY_NODE or 1 <= self.max <= REPLICAS_MAX):
            raise InvalidPolicy(f"replicas max must be -1 (every node) or 1 to {REPLICAS_MAX}")
        if self.max != EVERY_NODE and (self.min == EVERY_NODE or self.min > self.max):
            raise InvalidPolicy("replicas min cannot be above max")
        if self.tier not in TIERS:
            raise InvalidPolicy(f"replicas tier must be one of {', '.join(TIERS)}")
        if self.spread is not None:
            _label_part(self.spread, "spread label")

    def to_value(self) -> dict[str, Any]:
        return {"min": self.min, "max": self.max, "tier": self.tier, "labels": dict(self.labels),
                "spread": self.spread}

    @classmethod
    def from_value(cls, raw: Any) -> ReplicaPolicy:
        """From a client's JSON or a catalog record; ``InvalidPolicy`` when it cannot be."""
        if not isinstance(raw, Mapping):
            raise InvalidPolicy("replicas must be an object: {min, max, tier, labels, spread}")
        unknown = set(raw) - {"min", "max", "tier", "labels", "spread"}
        if unknown:
            raise InvalidPolicy(f"replicas: unknown fields {', '.join(sorted(map(str, unknown)))[:200]}")
        lo, hi = raw.get("min", 1), raw.get("max", raw.get("min", 1))
        for v, what in ((lo, "min"), (hi, "max")):
            if not isinstance(v, int) or isinstance(v, bool):
                raise InvalidPolicy(f"replicas {what} must be a whole number")
        tier = raw.get("tier", "disk")
        spread = raw.get("spread")
        if not isinstance(tier, str) or (spread is not None and not isinstance(spread, str)):
            raise InvalidPolicy("replicas tier and spread are strings")
        return cls(lo, hi, tier, parse_labels(raw.get("labels")), spread)


@dataclass(frozen=True, slots=True)
class ReplicaFacts:
    """A node as the rule sees it: whether it is up, since when it is down,
    its labels, whether it has room for the copy on the policy's tier."""

    node_id: str
    up: bool
    down_since: float | None = None  # when it stopped being up (None while up)
    labels: Mapping[str, str] = field(default_factory=dict)
    room: bool = True


@dataclass(frozen=True, slots=True)
class Holder:
    """A copy of the model on the policy's tier (or one being made there)."""

    node_id: str
    complete: bool = True  # False: a transfer is making it now
    in_use: bool = False  # served from, read by a transfer or a job: never dropped


@dataclass(frozen=True, slots=True)
class Plan:
    """What the mesh should do for one model: nodes that add a copy, nodes
    that drop theirs; ``counted``/``lost`` say how the rule saw it."""

    add: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()
    counted: int = 0
    lost: int = 0
    wanted_min: int = 0
    wanted_max: int = 0
    short: str | None = None  # why fewer than min can be held, when so
    drop_why: tuple[str, ...] = ()  # for each node in ``drop``, in order: why its copy goes
    outside: tuple[str, ...] = ()  # nodes up with a copy the labels do not take (not counted)
    spread_target: int = 0  # distinct values of ``spread`` the copies should cover (0: no spread)
    spread_covered: int = 0  # distinct values the counted copies cover now

    def why(self, node_id: str) -> str:
        """Why ``node_id`` drops its copy ('' when the plan does not drop it)."""
        for nid, reason in zip(self.drop, self.drop_why, strict=True):
            if nid == node_id:
                return reason
        return ""


def _rank(model: str, node_id: str) -> bytes:
    """Rendezvous hash: a node's place for a model, the same on every node."""
    return hashlib.blake2b(f"{model}\x00{node_id}".encode(), digest_size=8).digest()


def _eligible(policy: ReplicaPolicy, n: ReplicaFacts) -> bool:
    return all(n.labels.get(k) == v for k, v in policy.labels.items())


def plan(model: str, policy: ReplicaPolicy, nodes: Iterable[ReplicaFacts], holders: Iterable[Holder],
         now: float, grace_s: float, *, fetchable: bool = False) -> Plan:
    """The steps for ``model`` under ``policy``, the same on every node that
    reads the same ``nodes`` and ``holders``.  A copy is added only from
    somewhere: a complete copy on a node that is up, or, when ``fetchable``,
    the model's source outside the mesh."""
    facts = {n.node_id: n for n in nodes}
    held = {h.node_id: h for h in holders}
    eligible = [n for n in facts.values() if _eligible(policy, n)]
    lo = len(eligible) if policy.min == EVERY_NODE else policy.min
    hi = len(eligible) if policy.max == EVERY_NODE else policy.max
    lo = min(lo, hi)

    counted: list[str] = []  # eligible holders up, making it, or down for less than the grace
    lost: list[str] = []  # holders down for longer, or gone from the members
    stray: list[str] = []  # holders up on a node the labels no longer take
    for nid in held:
        n = facts.get(nid)
        if n is None or not (n.up or (n.down_since is not None and now - n.down_since < grace_s)):
            lost.append(nid)
        elif _eligible(policy, n):
            counted.append(nid)
        elif n.up:
            stray.append(nid)

    spread = policy.spread

    def value(nid: str) -> str:
        return facts[nid].labels.get(spread, "") if spread is not None else ""

    values: dict[str, int] = {}  # spread value -> counted copies in it
    if spread is not None:
        for nid in counted:
            values[value(nid)] = values.get(value(nid), 0) + 1

    def add_order(n: ReplicaFacts) -> tuple[int, bytes]:
        return (values.get(value(n.node_id), 0), _rank(model, n.node_id))

    candidates = sorted((n for n in eligible if n.up and n.room and n.node_id not in held), key=add_order)
    covered = len(values)
    target = min(hi, len(values.keys() | {value(n.node_id) for n in candidates})) if spread is not None else 0
    source = fetchable or any(h.complete and facts[nid].up for nid, h in held.items() if nid in facts)
    # The spread's term adds one copy in each missing value: candidates in a value with no copy
    # sort first, and each pick counts in its value, so the next goes to another one.
    gap = max(lo - len(counted), hi - len(counted) - len(lost), target - covered, 0) if source else 0
    adds: list[str] = []
    while candidates and len(adds) < min(gap, ADDS_AT_ONCE_MAX):
        n = candidates.pop(0)
        adds.append(n.node_id)
        if spread is not None:  # the next pick prefers another value of the label
            values[value(n.node_id)] = values.get(value(n.node_id), 0) + 1
            candidates.sort(key=add_order)

    drops: list[str] = []
    why: list[str] = []
    if not adds:
        up_complete = [nid for nid in counted if facts[nid].up and held[nid].complete]
        # Strays first (once the eligible copies are enough), then the copies above max.
        if len(counted) >= lo:
            for nid in sorted(stray):
                if held[nid].complete and not held[nid].in_use:
                    drops.append(nid)
                    why.append("on a node outside the policy's labels")
        excess = max(min(len(counted) - hi, len(up_complete) - lo), 0)
        worst_first = sorted((nid for nid in up_complete if not held[nid].in_use),
                             key=lambda nid: _rank(model, nid), reverse=True)
        if spread is None:
            for nid in worst_first[:excess]:
                drops.append(nid)
                why.append(f"more than the policy's max of {hi}")
        else:
            # The most crowded value first (among equals, the worst-ranked copy); never one that
            # would leave fewer values covered than the target.  ``values`` holds no adds here.
            left = dict(values)
            queues: dict[str, list[str]] = {}  # value -> its droppable copies, worst-ranked first
            for nid in worst_first:
                queues.setdefault(value(nid), []).append(nid)
            for _ in range(excess):  # each pass takes one copy: bounded
                open_values = [v for v, q in queues.items() if q and (left[v] > 1 or len(left) > target)]
                if not open_values:
                    break
                v = max(open_values, key=lambda x: (left[x], _rank(model, queues[x][0])))
                drops.append(queues[v].pop(0))
                why.append(f"more than the policy's max of {hi}; {spread}={v or '(none)'} is the most crowded "
                           f"value ({left[v]} copies)" if left[v] > 1 else f"more than the policy's max of {hi}")
                left[v] -= 1
                if not left[v]:
                    del left[v]

    # ``short``: min cannot be reached, counting what this plan adds and what later rounds can.
    reachable = len(counted) + len(adds) + len(candidates)
    short = None
    if not source and len(counted) < lo:
        short = "no complete copy on a node that is up, and no source outside the mesh: nothing to copy from"
    elif reachable < lo:
        short = (f"{len(counted)} copies, {len(adds)} being added and {len(candidates)} more eligible nodes "
                 f"with room: fewer than the {lo} the policy wants")
    return Plan(tuple(adds), tuple(drops), len(counted), len(lost), lo, hi, short, tuple(why),
                tuple(sorted(stray)), target, covered)
