"""Anti-entropy throughput (issue 25): a sync cut by the byte budget resumes at
once from the receiver's new digest, each message stays within the budget
whatever the catalog's size, a lost step costs one step, and two peers run
one such chain at a time (no second sync carrying the same keys)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from protocol.catalog import Catalog
from protocol.gossip import GossipConfig
from protocol.wire import Envelope, Sync, SyncDelta, encode

from .test_protocol_gossip import CFG, Mesh, addr_of

KEYS = 5000
BUDGET = 8 * 1024
VALUE = {"model_type": "llm", "description": "a model of the bench"}


def in_sync(mesh: Mesh) -> bool:
    a, b = mesh.node("a"), mesh.node("b")
    st = b.catalog.nodes.get("a")
    return st is not None and st.max_version == a.catalog.own.max_version


def big_pair(config: GossipConfig, **kw: float) -> tuple[Mesh, list[int]]:
    """``a`` holds KEYS keys; ``b`` joins it empty.  The sizes of every
    SyncDelta a sends (a rule that drops nothing records them)."""
    mesh = Mesh(seed=7, config=config, **kw)  # type: ignore[arg-type]
    a = mesh.add("a")
    for i in range(KEYS):
        a.set(f"reg/m{i:05d}", VALUE, 0.0)
    sizes: list[int] = []

    def record(frm: str, to: str, env: Envelope) -> bool:
        if frm == addr_of("a") and isinstance(env.body, SyncDelta):
            sizes.append(len(encode(env)))
        return False

    mesh.drop_rules.append(record)
    mesh.add("b", seeds=("a",))
    return mesh, sizes


def time_to_sync(mesh: Mesh, limit_s: float) -> float:
    t0 = mesh.now
    while not in_sync(mesh):
        assert mesh.now - t0 < limit_s, f"not in sync after {limit_s} s"
        mesh.run_for(0.05)
    return mesh.now - t0


def test_a_cut_sync_resumes_at_once_within_the_budget() -> None:
    """About 50 budgets of keys: one round trip each, back to back, not one
    per gossip interval (25 s at 0.5 s)."""
    cfg = replace(CFG, delta_budget_bytes=BUDGET)
    mesh, sizes = big_pair(cfg)
    took = time_to_sync(mesh, 30.0)
    assert took < 3.0, f"{took:.2f} s"
    assert len(sizes) >= 40  # it was cut, many times
    entry = len(encode(Envelope("t", "a", 1, addr_of("a"), SyncDelta(())))) + 200  # framing, digest, one entry
    assert max(sizes) <= BUDGET + entry + 2 * 64  # the digest of two nodes rides along
    sent = sum(sizes)
    state = sum(len(k) + 60 for k in mesh.node("a").catalog.own.keys)
    assert sent < 1.5 * state, "the keys went more than once"


def test_a_lost_step_resumes_from_the_digest_not_from_scratch() -> None:
    """Every fourth step of the chain is lost: the next sync starts where the
    receiver's digest stands, so the keys still cross about once."""
    cfg = replace(CFG, delta_budget_bytes=BUDGET)
    mesh, sizes = big_pair(cfg)
    n = [0]

    def lose(frm: str, to: str, env: Envelope) -> bool:
        if frm == addr_of("a") and isinstance(env.body, SyncDelta) and env.body.deltas:
            n[0] += 1
            return n[0] % 4 == 0
        return False

    mesh.drop_rules.append(lose)
    time_to_sync(mesh, 60.0)
    b = mesh.node("b").catalog
    assert {k: v for nid, k, v in b.items() if nid == "a"} == {k: v for _, k, v in mesh.node("a").catalog.items()}
    delivered = sum(s for i, s in enumerate(sizes, 1) if i % 4)  # roughly: what was not lost
    state = sum(len(k) + 60 for k in mesh.node("a").catalog.own.keys)
    assert delivered < 1.5 * state


@pytest.mark.parametrize("interval_s", [0.05, 0.5])
def test_one_chain_at_a_time_between_two_peers(interval_s: float) -> None:
    """Gossip rounds go on during a long chain (at 0.05 s, many of them): they
    open no second sync between the same two peers, which would carry the
    same keys again."""
    cfg = replace(CFG, delta_budget_bytes=BUDGET, gossip_interval_s=interval_s)
    mesh, sizes = big_pair(cfg, latency_s=0.02)
    time_to_sync(mesh, 30.0)
    state = sum(len(k) + 60 for k in mesh.node("a").catalog.own.keys)
    assert sum(sizes) < 1.5 * state


def test_entries_come_out_in_version_order_after_overwrites_and_a_restore() -> None:
    """The version index behind ``since``: overwrites and collection leave stale
    pairs behind, a restore arrives in any order; deltas stay gap-free."""
    c = Catalog("n", 1)
    for r in range(5):
        for i in range(400):
            c.set(f"k{i}", r, float(r))
    for i in range(0, 400, 3):
        c.delete(f"k{i}", 10.0)
    assert c.collect_tombstones(10.0 + c.tombstone_grace_s) > 0
    got = [v for v, _, _ in c.own.since(0)]
    assert got == sorted(e.version for e in c.own.keys.values())
    snap = c.snapshot()
    snap["n"]["entries"].reverse()
    d = Catalog("n", 2)
    d.restore(snap, 0.0, 2)
    assert [v for v, _, _ in d.own.since(1500)] == sorted(e.version for e in d.own.keys.values() if e.version > 1500)


def test_a_flood_from_one_origin_never_crowds_out_a_single_write() -> None:
    """A relay holds a flood of one origin and one write of another that the
    receiver lacks: every delta it cuts to the budget carries the single write
    (smallest backlog first), whatever the random draw."""
    relay, flood, one = Catalog("x", 1), Catalog("f", 1), Catalog("w", 1)
    for i in range(2000):
        flood.set(f"reg/f{i:05d}", VALUE, 0.0)
    one.set("reg/one", VALUE, 0.0)
    for src in (flood, one):
        for d in src.delta_for(dict(relay.digest()), 1 << 30, random.Random(0)):
            relay.apply_delta(d, 0.0)
    receiver = Catalog("r", 1)
    for seed in range(40):
        ds = relay.delta_for(dict(receiver.digest()), BUDGET, random.Random(seed))
        assert [e.key for d in ds if d.node_id == "w" for e in d.entries] == ["reg/one"], seed
        assert sum(len(d.entries) for d in ds if d.node_id == "f") > 0  # the flood gets the rest


def churn(n: int, seconds: float, every_s: float = 5.0) -> tuple[Mesh, dict[str, int]]:
    """``n`` nodes, each rewriting a key of its own every ``every_s`` (a storage
    figure moving, say) for ``seconds``; what each kind of message cost."""
    from protocol.wire import SyncDigest

    from .test_protocol_gossip import mesh_of

    ids = tuple(f"n{i:03d}" for i in range(n))
    mesh = mesh_of(ids, seed=1)
    mesh.run_for(30.0)
    cost: dict[str, int] = {"full_digests": 0, "digest_entries": 0, "syncs": 0}

    def count(frm: str, to: str, env: Envelope) -> bool:
        b = env.body
        if isinstance(b, (SyncDigest, SyncDelta)) and b.digest is not None:
            cost["full_digests"] += 1
            cost["digest_entries"] += len(b.digest)
        if isinstance(b, Sync):
            cost["syncs"] += 1
            cost["digest_entries"] += len(b.recent or {})
        return False

    mesh.drop_rules.append(count)
    rng = random.Random(2)
    phase = {x: rng.random() * every_s for x in ids}
    t0 = mesh.now
    k = 0
    while mesh.now - t0 < seconds:
        before = mesh.now - t0
        mesh.run_for(0.25)
        for x in ids:
            if (mesh.now - t0 + phase[x]) // every_s != (before + phase[x]) // every_s:
                k += 1
                mesh.node(x).set("storage", {"free": k}, mesh.now)
    mesh.run_for(10.0)
    first = mesh.node(ids[0]).catalog
    assert all(mesh.node(x).catalog.digest() == first.digest() for x in ids)  # every change reached everyone
    return mesh, cost


def test_steady_gossip_carries_what_changed_not_every_digest() -> None:
    """Forty nodes, each changing a key every 5 s: the syncs name the origins
    that changed (a few entries each), and whole digests (forty entries) go
    only with the full syncs, about one per node per full interval (before:
    one per sync whose hashes differed, several per node per second)."""
    n, seconds = 40, 30.0
    _mesh, cost = churn(n, seconds)
    full_syncs = n * seconds / CFG.full_sync_interval_s
    assert cost["full_digests"] <= 6 * full_syncs, cost  # each full sync: a few messages carry a digest
    assert cost["digest_entries"] / (n * seconds / CFG.gossip_interval_s) < 2 * n, cost


def test_an_idle_node_opens_one_sync_a_round_and_sends_no_digest() -> None:
    """Nothing written: one small sync a round per node (the pull half), the
    hashes agree, and no digest crosses but with the periodic full syncs."""
    from .test_protocol_gossip import mesh_of

    ids = tuple(f"n{i}" for i in range(10))
    mesh = mesh_of(ids, seed=3)
    mesh.run_for(40.0)
    syncs = [0]
    digests = [0]

    def count(frm: str, to: str, env: Envelope) -> bool:
        syncs[0] += isinstance(env.body, Sync)
        digests[0] += getattr(env.body, "digest", None) is not None
        return False

    mesh.drop_rules.append(count)
    mesh.run_for(60.0)
    rounds = 60.0 / CFG.gossip_interval_s
    assert syncs[0] <= len(ids) * rounds * CFG.idle_sync_fanout * 1.1
    assert digests[0] == 0
