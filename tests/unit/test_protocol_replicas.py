"""protocol/replicas.py: the replica rule every node runs alone."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.replicas import (
    ADDS_AT_ONCE_MAX,
    EVERY_NODE,
    Holder,
    InvalidPolicy,
    ReplicaFacts,
    ReplicaPolicy,
    parse_labels,
    plan,
)

GRACE = 30.0
NOW = 1000.0
ZONES = ("a", "b", "c")


@st.composite
def worlds(draw: st.DrawFn) -> tuple[ReplicaPolicy, list[ReplicaFacts], list[Holder]]:
    n = draw(st.integers(1, 12))
    nodes = []
    for i in range(n):
        up = draw(st.booleans()) or draw(st.booleans())
        down_since = None if up else NOW - draw(st.sampled_from([1.0, GRACE - 1, GRACE + 1, 500.0]))
        labels = {"zone": draw(st.sampled_from(ZONES))}
        if draw(st.booleans()):
            labels["gpu"] = "h100"
        nodes.append(ReplicaFacts(f"n{i}", up, down_since, labels, room=draw(st.booleans()) or draw(st.booleans())))
    holders = [Holder(x.node_id, complete=draw(st.booleans()) or draw(st.booleans()), in_use=draw(st.booleans()))
               for x in nodes if draw(st.booleans())]
    if draw(st.booleans()):
        holders.append(Holder("gone-node"))  # a holder no longer among the members
    every = draw(st.booleans()) and draw(st.booleans())
    lo = EVERY_NODE if every else draw(st.integers(0, 5))
    hi = EVERY_NODE if every else draw(st.integers(max(lo, 1), 6))
    policy = ReplicaPolicy(lo, hi, draw(st.sampled_from(["disk", "dram"])),
                           {"gpu": "h100"} if draw(st.booleans()) else {},
                           "zone" if draw(st.booleans()) else None)
    return policy, nodes, holders


def _counted(policy: ReplicaPolicy, nodes: list[ReplicaFacts], holders: list[Holder]) -> list[str]:
    facts = {n.node_id: n for n in nodes}
    out = []
    for h in holders:
        n = facts.get(h.node_id)
        if n is None or not all(n.labels.get(k) == v for k, v in policy.labels.items()):
            continue
        if n.up or (n.down_since is not None and NOW - n.down_since < GRACE):
            out.append(h.node_id)
    return out


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(worlds(), st.randoms(use_true_random=False))
def test_every_node_reads_the_same_plan_and_it_keeps_the_bounds(world, rnd: random.Random) -> None:  # type: ignore[no-untyped-def]
    policy, nodes, holders = world
    p = plan("org/m", policy, nodes, holders, NOW, GRACE)
    # The same inputs in another order (another node's view of the same catalog): the same plan.
    shuffled_nodes, shuffled_holders = nodes[:], holders[:]
    rnd.shuffle(shuffled_nodes)
    rnd.shuffle(shuffled_holders)
    assert plan("org/m", policy, shuffled_nodes, shuffled_holders, NOW, GRACE) == p
    facts = {n.node_id: n for n in nodes}
    held = {h.node_id: h for h in holders}
    assert not (p.add and p.drop)
    assert len(p.add) <= ADDS_AT_ONCE_MAX and len(set(p.add)) == len(p.add)
    for nid in p.add:  # only eligible, up nodes with room and without a copy
        n = facts[nid]
        assert n.up and n.room and nid not in held
        assert all(n.labels.get(k) == v for k, v in policy.labels.items())
    for nid in p.drop:  # only complete copies, on nodes up, not in use
        assert facts[nid].up and held[nid].complete and not held[nid].in_use
    counted = _counted(policy, nodes, holders)
    assert p.counted == len(counted)
    # Never below min by a drop; never above what is wanted by an add.
    assert len([x for x in counted if x not in p.drop]) >= min(p.wanted_min, len(counted))
    assert not p.add or len(counted) + len(p.add) <= max(p.wanted_min, p.wanted_max - p.lost)
    if p.counted < p.wanted_min and p.short is None:
        assert p.add  # short of min with room somewhere: it adds


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(worlds())
def test_applying_plans_converges_into_min_max_and_then_stands_still(world) -> None:  # type: ignore[no-untyped-def]
    policy, nodes, holders = world
    held = {h.node_id: Holder(h.node_id, True, False) for h in holders}  # nothing in use, all complete
    facts = {n.node_id: n for n in nodes}
    history: dict[str, list[str]] = {}
    for _round in range(40):
        p = plan("org/m", policy, nodes, held.values(), NOW, GRACE)
        if not p.add and not p.drop:
            break
        for nid in p.add:
            held[nid] = Holder(nid)
            history.setdefault(nid, []).append("add")
        for nid in p.drop:
            del held[nid]
            history.setdefault(nid, []).append("drop")
    else:
        raise AssertionError(f"no fixed point: {history}")
    counted = _counted(policy, nodes, list(held.values()))
    up = [x for x in counted if facts[x].up]
    # At the fixed point: min is met, or no eligible node with room is left to add on ...
    assert len(counted) >= p.wanted_min or p.short is not None
    # ... and max is kept, or what is above it waits for holders down within the grace.
    assert len(counted) <= p.wanted_max or len(up) <= p.wanted_min
    for nid, steps in history.items():  # no flapping: a node adds then drops at most once
        assert steps.count("add") <= 1 and steps.count("drop") <= 1, (nid, steps)


def test_a_restarting_holder_is_not_replaced_within_the_grace() -> None:
    policy = ReplicaPolicy(2, 2)
    nodes = [ReplicaFacts("a", True), ReplicaFacts("b", False, NOW - 5), ReplicaFacts("c", True)]
    holders = [Holder("a"), Holder("b")]
    assert plan("m", policy, nodes, holders, NOW, GRACE).add == ()
    later = plan("m", policy, nodes, holders, NOW + GRACE, GRACE)
    assert later.add == ("c",) and later.lost == 1


def test_a_lost_copy_is_replaced_only_below_min_and_new_nodes_fill_to_max() -> None:
    policy = ReplicaPolicy(1, 3)
    nodes = [ReplicaFacts("a", True), ReplicaFacts("b", False, NOW - 500), ReplicaFacts("c", True), ReplicaFacts("d", True)]
    # a and b held it; b is lost: one copy counts (>= min 1), and b still takes its place under max 3.
    p = plan("m", policy, nodes, [Holder("a"), Holder("b"), Holder("c")], NOW, GRACE)
    assert p.add == () and (p.counted, p.lost) == (2, 1)
    # Once b's records leave the catalog, a new node fills the model up to max.
    p = plan("m", policy, nodes, [Holder("a"), Holder("c")], NOW, GRACE)
    assert p.add == ("d",)


def test_every_node_means_every_eligible_node_and_strays_are_dropped() -> None:
    policy = ReplicaPolicy(EVERY_NODE, EVERY_NODE, labels={"gpu": "h100"})
    nodes = [ReplicaFacts(f"n{i}", True, labels={"gpu": "h100"}) for i in range(4)] + [ReplicaFacts("cpu", True)]
    p = plan("m", policy, nodes, [Holder("n0"), Holder("cpu")], NOW, GRACE)
    assert sorted(p.add) == ["n1", "n2", "n3"] and p.wanted_min == p.wanted_max == 4
    held = [Holder(f"n{i}") for i in range(4)] + [Holder("cpu")]
    assert plan("m", policy, nodes, held, NOW, GRACE).drop == ("cpu",)  # off the labels, once the rest are held
    busy = [Holder(f"n{i}") for i in range(4)] + [Holder("cpu", in_use=True)]
    assert plan("m", policy, nodes, busy, NOW, GRACE).drop == ()  # never a copy in use


def test_a_spread_label_puts_copies_in_different_zones_first() -> None:
    policy = ReplicaPolicy(3, 3, spread="zone")
    nodes = [ReplicaFacts(f"{z}{i}", True, labels={"zone": z}) for z in ZONES for i in range(3)]
    p = plan("m", policy, nodes, [], NOW, GRACE, fetchable=True)
    assert sorted(n[0] for n in p.add) == ["a", "b", "c"]
    # Two copies in zone a: one is added in each missing zone (above max for a while) ...
    p = plan("m", policy, nodes, [Holder("a0"), Holder("a1")], NOW, GRACE)
    assert sorted(n[0] for n in p.add) == ["b", "c"] and (p.spread_covered, p.spread_target) == (1, 3)
    held = [Holder("a0"), Holder("a1"), *(Holder(n, complete=False) for n in p.add)]
    assert plan("m", policy, nodes, held, NOW, GRACE).drop == ()  # nothing goes while the new ones are made
    # ... then, once they are complete, the crowded zone gives one up, and the reason says so.
    held = [Holder("a0"), Holder("a1"), *(Holder(n) for n in p.add)]
    p2 = plan("m", policy, nodes, held, NOW, GRACE)
    assert len(p2.drop) == 1 and p2.drop[0][0] == "a" and p2.add == ()
    assert "zone=a is the most crowded value (2 copies)" in p2.why(p2.drop[0])


def test_above_max_the_worst_ranked_drop_and_never_below_min() -> None:
    policy = ReplicaPolicy(1, 2)
    nodes = [ReplicaFacts(x, True) for x in "abcde"]
    p = plan("m", policy, nodes, [Holder(x) for x in "abcde"], NOW, GRACE)
    assert len(p.drop) == 3 and p.add == ()
    again = plan("m", policy, nodes, [Holder(x) for x in "abcde" if x not in p.drop], NOW, GRACE)
    assert again.drop == () and again.add == ()  # it stands still there
    partial = plan("m", policy, nodes, [Holder("a"), Holder("b", complete=False), Holder("c")], NOW, GRACE)
    assert "b" not in partial.drop and len(partial.drop) == 1


def test_short_of_nodes_it_says_so() -> None:
    nodes = [ReplicaFacts("a", True), ReplicaFacts("b", True, room=False)]
    p = plan("m", ReplicaPolicy(3, 3), nodes, [], NOW, GRACE, fetchable=True)
    assert p.add == ("a",) and p.short is not None and "fewer than the 3" in p.short
    # Nothing to copy from: no complete copy on a node that is up, and no source outside.
    p = plan("m", ReplicaPolicy(3, 3), nodes, [Holder("gone"), Holder("a", complete=False)], NOW, GRACE)
    assert p.add == () and p.short is not None and "nothing to copy from" in p.short


def test_policies_and_labels_are_checked() -> None:
    assert ReplicaPolicy.from_value({"min": 2, "max": 3, "tier": "dram", "labels": {"zone": "a"}}).max == 3
    assert ReplicaPolicy.from_value({"min": 2}).max == 2
    assert ReplicaPolicy.from_value({"min": -1, "max": -1}).min == EVERY_NODE
    for bad in ({"min": 3, "max": 2}, {"min": -2}, {"max": 0}, {"tier": "tape"}, {"min": "1"}, {"min": True},
                {"labels": {"zone": "a b"}}, {"spread": "bad label!"}, {"extra": 1}, [], {"min": 10**6}):
        with pytest.raises(InvalidPolicy):
            ReplicaPolicy.from_value(bad)
    assert parse_labels("zone=a, gpu=h100") == {"zone": "a", "gpu": "h100"}
    for bad_labels in ("zone", "=a", "zone=", "k=" + "v" * 64, ",".join(f"k{i}=v" for i in range(17))):
        with pytest.raises(InvalidPolicy):
            parse_labels(bad_labels)


def test_a_pin_record_from_a_peer_is_checked() -> None:
    from protocol.hlc import Stamp
    from protocol.keys import PinRecord, RecordError

    stamp = Stamp(1_000, 0, "a")
    rec = PinRecord(stamp, ReplicaPolicy(1, 3, "dram", {"zone": "a"}, "zone"))
    assert PinRecord.from_value(rec.to_value()) == rec
    assert PinRecord.from_value(PinRecord(stamp, None).to_value()).policy is None
    for bad in ({"stamp": stamp.to_wire(), "policy": {"min": 5, "max": 2}},
                {"stamp": stamp.to_wire(), "policy": {"min": 1, "labels": {"k": "x" * 99}}},
                {"stamp": stamp.to_wire(), "policy": "three"},
                {"policy": None}, "pin"):
        with pytest.raises(RecordError):
            PinRecord.from_value(bad)


def _spread_offered(policy: ReplicaPolicy, nodes: list[ReplicaFacts], holders: list[Holder]) -> int:
    """The most values of the spread label a placement can cover: those of the counted
    holders and of the eligible nodes up with room, at most max."""
    assert policy.spread is not None
    counted = set(_counted(policy, nodes, holders))
    eligible = [n for n in nodes if all(n.labels.get(k) == v for k, v in policy.labels.items())]
    offered = {n.labels.get(policy.spread, "") for n in eligible if n.node_id in counted or (n.up and n.room)}
    hi = len(eligible) if policy.max == EVERY_NODE else policy.max
    return min(hi, len(offered))


def _covered(policy: ReplicaPolicy, nodes: list[ReplicaFacts], holders: list[Holder]) -> int:
    assert policy.spread is not None
    facts = {n.node_id: n for n in nodes}
    return len({facts[nid].labels.get(policy.spread, "") for nid in _counted(policy, nodes, holders)})


@st.composite
def spread_worlds(draw: st.DrawFn) -> tuple[ReplicaPolicy, list[ReplicaFacts], list[Holder], bool]:
    policy, nodes, holders = draw(worlds())
    zones = draw(st.sampled_from([ZONES, (*ZONES, "d", "e"), ("a",)]))
    nodes = [ReplicaFacts(n.node_id, n.up, n.down_since, {**n.labels, "zone": draw(st.sampled_from(zones))}, n.room)
             if draw(st.booleans()) else n for n in nodes]
    policy = ReplicaPolicy(policy.min, policy.max, policy.tier, policy.labels, "zone")
    return policy, nodes, holders, draw(st.booleans())


ROUNDS_MAX = 8  # adds come 8 at a time on at most 12 nodes: two rounds of adds, one of drops, one still


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(spread_worlds())
def test_with_a_spread_the_plans_reach_the_spread_and_stand_still(world) -> None:  # type: ignore[no-untyped-def]
    """From any start, applying the plans round after round reaches, in a few rounds, a
    placement that covers as many values of the spread label as the nodes offer (up to
    max), inside [min, max]; no copy is dropped and made again, or made and dropped."""
    policy, nodes, holders, fetchable = world
    held = {h.node_id: Holder(h.node_id, True, False) for h in holders}  # nothing in use, all complete
    facts = {n.node_id: n for n in nodes}
    source = fetchable or any(facts[nid].up for nid in held if nid in facts)
    offered = _spread_offered(policy, nodes, list(held.values()))
    covered_before = _covered(policy, nodes, list(held.values()))
    history: dict[str, list[str]] = {}
    for _round in range(ROUNDS_MAX):
        p = plan("org/m", policy, nodes, held.values(), NOW, GRACE, fetchable=fetchable)
        if not p.add and not p.drop:
            break
        covered = _covered(policy, nodes, list(held.values()))
        for nid in p.add:
            held[nid] = Holder(nid)
            history.setdefault(nid, []).append("add")
        for nid in p.drop:
            del held[nid]
            history.setdefault(nid, []).append("drop")
        # A step never loses a value once the target is met, nor moves away from it.
        after = _covered(policy, nodes, list(held.values()))
        assert after >= min(covered, offered), (covered, after, offered, p)
    else:
        raise AssertionError(f"no fixed point in {ROUNDS_MAX} rounds: {history}")
    final = list(held.values())
    assert (p.spread_target, p.spread_covered) == (offered, _covered(policy, nodes, final)), p
    if source:
        assert _covered(policy, nodes, final) >= offered, (p, history)  # more: holders within their grace
    else:
        assert not history and _covered(policy, nodes, final) == covered_before  # nothing to copy from
    counted = _counted(policy, nodes, final)
    up = [x for x in counted if facts[x].up]
    assert len(counted) >= p.wanted_min or p.short is not None
    assert len(counted) <= p.wanted_max or len(up) <= p.wanted_min or len(counted) <= p.spread_target
    for nid, steps in history.items():  # no oscillation: one step per node, ever
        assert len(steps) == 1, (nid, steps)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.one_of(worlds(), spread_worlds().map(lambda w: w[:3])), st.booleans())
def test_short_is_none_exactly_when_the_adds_reach_min(world, fetchable: bool) -> None:  # type: ignore[no-untyped-def]
    """``short`` agrees with ``next.add``: none iff the counted copies and this round's adds
    reach min (or, when the round's cap stops the adds, the nodes left with room will)."""
    policy, nodes, holders = world
    p = plan("org/m", policy, nodes, holders, NOW, GRACE, fetchable=fetchable)
    if len(p.add) < ADDS_AT_ONCE_MAX:
        assert (p.short is None) == (p.counted + len(p.add) >= p.wanted_min), p
    else:
        held = {h.node_id for h in holders}
        room = [n for n in nodes if n.up and n.room and n.node_id not in held
                and all(n.labels.get(k) == v for k, v in policy.labels.items())]
        assert (p.short is None) == (p.counted + len(room) >= p.wanted_min), p


def test_short_counts_the_nodes_it_adds_on() -> None:
    """Issue 24.4: ``add=('b',)`` came with "0 eligible nodes with room"."""
    p = plan("m", ReplicaPolicy(2, 3), [ReplicaFacts("a", True), ReplicaFacts("b", True)], [Holder("a")], NOW, GRACE)
    assert p.add == ("b",) and p.short is None
    p = plan("m", ReplicaPolicy(3, 3), [ReplicaFacts("a", True), ReplicaFacts("b", True)], [Holder("a")], NOW, GRACE)
    assert p.add == ("b",) and p.short is not None and "1 copies, 1 being added and 0 more" in p.short


def test_two_copies_in_one_zone_move_one_to_the_other_zone() -> None:
    """Issue 24.3: copies on n1 and n2 (zone a), pinned 2..2 spread over zone, n3 in zone b.
    The rule adds on n3, then drops one in zone a; a copy on n3 made by hand is kept."""
    policy = ReplicaPolicy(2, 2, spread="zone")
    nodes = [ReplicaFacts("n1", True, labels={"zone": "a"}), ReplicaFacts("n2", True, labels={"zone": "a"}),
             ReplicaFacts("n3", True, labels={"zone": "b"})]
    p = plan("m", policy, nodes, [Holder("n1"), Holder("n2")], NOW, GRACE)
    assert p.add == ("n3",) and p.short is None and (p.spread_covered, p.spread_target) == (1, 2)
    for name in ("m", "org/other", "x"):  # whatever the ranks, the drop is in the crowded zone
        p = plan(name, policy, nodes, [Holder("n1"), Holder("n2"), Holder("n3")], NOW, GRACE)
        assert len(p.drop) == 1 and p.drop[0] in ("n1", "n2"), (name, p)
        assert "zone=a is the most crowded value (2 copies)" in p.why(p.drop[0])
        rest = [Holder(x) for x in ("n1", "n2", "n3") if x not in p.drop]
        assert plan(name, policy, nodes, rest, NOW, GRACE) == dataclasses.replace(p, add=(), drop=(), drop_why=(),
                                                                                    counted=2, spread_covered=2)
    # A copy in use in the crowded zone stays; the other one there goes.
    p = plan("m", policy, nodes, [Holder("n1", in_use=True), Holder("n2"), Holder("n3")], NOW, GRACE)
    assert p.drop == ("n2",)
    # More zones than max: the copies beyond max go, one zone each, down to max zones.
    nodes4 = [*nodes, ReplicaFacts("n4", True, labels={"zone": "c"})]
    p = plan("m", policy, nodes4, [Holder("n1"), Holder("n3"), Holder("n4")], NOW, GRACE)
    assert len(p.drop) == 1 and p.why(p.drop[0]) == "more than the policy's max of 2"


def test_a_lost_zone_is_replaced_in_another_even_when_lost_copies_fill_max() -> None:
    """One zone's outage must not leave every copy in the other: the lost copy's place
    under max does not stop the rule from restoring the spread."""
    policy = ReplicaPolicy(1, 2, spread="zone")
    nodes = [ReplicaFacts("a1", True, labels={"zone": "a"}), ReplicaFacts("b1", False, NOW - 500, {"zone": "b"}),
             ReplicaFacts("c1", True, labels={"zone": "c"}), ReplicaFacts("a2", True, labels={"zone": "a"})]
    p = plan("m", policy, nodes, [Holder("a1"), Holder("b1")], NOW, GRACE)
    assert p.lost == 1 and p.add == ("c1",)


def test_drops_say_why() -> None:
    """Issue 24.5: a copy outside the labels is not "more than the policy's max"."""
    policy = ReplicaPolicy(1, 1, labels={"zone": "z2"})
    nodes = [ReplicaFacts("a", True), ReplicaFacts("d", True, labels={"zone": "z2"}), ReplicaFacts("e", True, labels={"zone": "z2"})]
    p = plan("m", policy, nodes, [Holder("a"), Holder("d")], NOW, GRACE)
    assert p.drop == ("a",) and p.why("a") == "on a node outside the policy's labels" and p.outside == ("a",)
    assert p.counted == 1 and p.why("d") == ""
    p = plan("m", policy, nodes, [Holder("d"), Holder("e")], NOW, GRACE)
    assert len(p.drop) == 1 and p.why(p.drop[0]) == "more than the policy's max of 1" and p.outside == ()
