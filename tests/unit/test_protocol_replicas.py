"""protocol/replicas.py: the replica rule every node runs alone."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.replicas import (
    ADDS_AT_ONCE_MAX,
    EVERY_NODE,
    Holder,
    InvalidPolicy,
    NodeFacts,
    ReplicaPolicy,
    parse_labels,
    plan,
)

GRACE = 30.0
NOW = 1000.0
ZONES = ("a", "b", "c")


@st.composite
def worlds(draw: st.DrawFn) -> tuple[ReplicaPolicy, list[NodeFacts], list[Holder]]:
    n = draw(st.integers(1, 12))
    nodes = []
    for i in range(n):
        up = draw(st.booleans()) or draw(st.booleans())
        down_since = None if up else NOW - draw(st.sampled_from([1.0, GRACE - 1, GRACE + 1, 500.0]))
        labels = {"zone": draw(st.sampled_from(ZONES))}
        if draw(st.booleans()):
            labels["gpu"] = "h100"
        nodes.append(NodeFacts(f"n{i}", up, down_since, labels, room=draw(st.booleans()) or draw(st.booleans())))
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


def _counted(policy: ReplicaPolicy, nodes: list[NodeFacts], holders: list[Holder]) -> list[str]:
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
    nodes = [NodeFacts("a", True), NodeFacts("b", False, NOW - 5), NodeFacts("c", True)]
    holders = [Holder("a"), Holder("b")]
    assert plan("m", policy, nodes, holders, NOW, GRACE).add == ()
    later = plan("m", policy, nodes, holders, NOW + GRACE, GRACE)
    assert later.add == ("c",) and later.lost == 1


def test_a_lost_copy_is_replaced_only_below_min_and_new_nodes_fill_to_max() -> None:
    policy = ReplicaPolicy(1, 3)
    nodes = [NodeFacts("a", True), NodeFacts("b", False, NOW - 500), NodeFacts("c", True), NodeFacts("d", True)]
    # a and b held it; b is lost: one copy counts (>= min 1), and b still takes its place under max 3.
    p = plan("m", policy, nodes, [Holder("a"), Holder("b"), Holder("c")], NOW, GRACE)
    assert p.add == () and (p.counted, p.lost) == (2, 1)
    # Once b's records leave the catalog, a new node fills the model up to max.
    p = plan("m", policy, nodes, [Holder("a"), Holder("c")], NOW, GRACE)
    assert p.add == ("d",)


def test_every_node_means_every_eligible_node_and_strays_are_dropped() -> None:
    policy = ReplicaPolicy(EVERY_NODE, EVERY_NODE, labels={"gpu": "h100"})
    nodes = [NodeFacts(f"n{i}", True, labels={"gpu": "h100"}) for i in range(4)] + [NodeFacts("cpu", True)]
    p = plan("m", policy, nodes, [Holder("n0"), Holder("cpu")], NOW, GRACE)
    assert sorted(p.add) == ["n1", "n2", "n3"] and p.wanted_min == p.wanted_max == 4
    held = [Holder(f"n{i}") for i in range(4)] + [Holder("cpu")]
    assert plan("m", policy, nodes, held, NOW, GRACE).drop == ("cpu",)  # off the labels, once the rest are held
    busy = [Holder(f"n{i}") for i in range(4)] + [Holder("cpu", in_use=True)]
    assert plan("m", policy, nodes, busy, NOW, GRACE).drop == ()  # never a copy in use


def test_a_spread_label_puts_copies_in_different_zones_first() -> None:
    policy = ReplicaPolicy(3, 3, spread="zone")
    nodes = [NodeFacts(f"{z}{i}", True, labels={"zone": z}) for z in ZONES for i in range(3)]
    p = plan("m", policy, nodes, [], NOW, GRACE, fetchable=True)
    assert sorted(n[0] for n in p.add) == ["a", "b", "c"]
    p = plan("m", policy, nodes, [Holder("a0"), Holder("a1")], NOW, GRACE)
    assert len(p.add) == 1 and p.add[0][0] in "bc"


def test_above_max_the_worst_ranked_drop_and_never_below_min() -> None:
    policy = ReplicaPolicy(1, 2)
    nodes = [NodeFacts(x, True) for x in "abcde"]
    p = plan("m", policy, nodes, [Holder(x) for x in "abcde"], NOW, GRACE)
    assert len(p.drop) == 3 and p.add == ()
    again = plan("m", policy, nodes, [Holder(x) for x in "abcde" if x not in p.drop], NOW, GRACE)
    assert again.drop == () and again.add == ()  # it stands still there
    partial = plan("m", policy, nodes, [Holder("a"), Holder("b", complete=False), Holder("c")], NOW, GRACE)
    assert "b" not in partial.drop and len(partial.drop) == 1


def test_short_of_nodes_it_says_so() -> None:
    nodes = [NodeFacts("a", True), NodeFacts("b", True, room=False)]
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
