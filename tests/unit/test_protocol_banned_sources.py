"""A holder a transfer banned is no source (issue 24): ``sources.usable_sources``,
the source round (``swarm.refresh``) that applies it, and the reason a
transfer gives while it waits and when it fails ``NO_SOURCE``."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.transfer.chunkplan import ChunkPlan
from protocol.transfer.sources import BANS_NAMED, banned_reason, usable_sources
from protocol.transfer.swarm import refresh

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None)
NODES = [f"n{i}" for i in range(12)]
nodes = st.sets(st.sampled_from(NODES), max_size=len(NODES))


def ban(plan: ChunkPlan, peer: str, chunk: int = 0) -> None:
    """Two bad chunks from ``peer``: banned, as the daemon's plan bans."""
    plan.on_bad(peer, chunk, 0.0)
    assert plan.on_bad(peer, chunk, 0.0)


@SETTINGS
@given(nodes, nodes, nodes)
def test_a_banned_holder_is_never_a_usable_source(found: set[str], complete: set[str], banned: set[str]) -> None:
    complete &= found
    u = usable_sources(found, complete, banned)
    assert not u.nodes & banned
    assert u.nodes | u.banned == found and not u.nodes & u.banned
    assert u.complete == (found & complete) - banned
    assert u.banned == found & banned
    assert (not u.nodes) == (found <= banned)  # every holder banned (or none): no source


@SETTINGS
@given(nodes, nodes, nodes, st.integers(0, 2**32))
def test_a_round_never_chooses_or_asks_a_banned_holder(found: set[str], complete: set[str], banned: set[str],
                                                      seed: int) -> None:
    complete &= found
    plan = ChunkPlan(8, per_peer_inflight=4)
    rng = random.Random(seed)
    for nid in sorted(banned):
        ban(plan, nid)
    r = refresh(plan, found, complete, "me", lambda _p: False, ("me",), rng)
    assert not r.chosen & banned and not set(r.ask) & banned
    assert r.usable == frozenset(found - banned) and r.banned == frozenset(found & banned)
    assert not plan.sources & banned
    for nid, cap in r.ask.items():  # partial holders tell what they hold
        plan.set_source(nid, range(8), inflight=cap)
    assert all(peer not in banned for peer, _ in plan.next_requests(0.0, rng))
    if found <= banned:
        # Only banned holders (or none): the catalog may list them, the plan has no source.
        assert not r.chosen and not r.usable
        assert plan.stuck(0.0)


def test_only_banned_holders_leave_the_plan_with_no_source_after_it_had_one() -> None:
    plan = ChunkPlan(4)
    rng = random.Random(1)
    r = refresh(plan, {"a"}, {"a"}, "me", lambda _p: False, ("me",), rng)
    assert r.chosen == {"a"} and not plan.stuck(0.0)
    (peer, chunk), = plan.next_requests(0.0, rng)
    plan.on_bad(peer, chunk, 0.1)
    assert plan.on_bad(peer, chunk, 0.2)  # the second strike bans it
    assert plan.bad_chunk("a") == chunk
    r = refresh(plan, {"a"}, {"a"}, "me", lambda _p: True, r.pulling, rng)  # the catalog still lists a
    assert r.chosen == frozenset() and r.usable == frozenset() and r.banned == {"a"}
    assert plan.stuck(0.3) and plan.next_requests(0.3, rng) == []


def test_the_reason_names_each_ban_and_its_chunk_within_a_bound() -> None:
    assert banned_reason({"n5": 3}) == "node n5's copy is banned (chunk 3 failed its hash)"
    assert banned_reason({"b": None, "a": 0}) == (
        "node a's copy is banned (chunk 0 failed its hash); node b's copy is banned (a chunk failed its hash)")
    many = banned_reason({f"n{i:02d}": i for i in range(BANS_NAMED + 3)})
    assert many.count("is banned") == BANS_NAMED and many.endswith("3 more banned")
    assert banned_reason({}) == ""


@given(st.from_regex(r"[0-9a-f]{16}", fullmatch=True))
def test_a_cancel_crosses_the_peer_route_unchanged(tid: str) -> None:
    from protocol.actions import CancelTransfer, decode_action, encode_action

    assert decode_action(encode_action(CancelTransfer(tid))) == CancelTransfer(tid)


@pytest.mark.parametrize("tid", ["", "../x", "a" * 65, 7, None])
def test_a_bad_cancel_is_refused(tid: object) -> None:
    from protocol.actions import decode_action
    from protocol.registry import InvalidInput

    with pytest.raises(InvalidInput, match="transfer_id"):
        decode_action({"op": "cancel_transfer", "transfer_id": tid})
