"""GossipNode end to end, sans I/O, in a deterministic little network.

``Mesh`` plays the part of h11's ``ConnectionPair``: it carries the ``Send``
items one node returns to the node at that address, through the real wire
codec, with a latency and, on request, loss, duplication, reordering
(jitter), partitions and crashed nodes.  Time is virtual: the mesh jumps to
the next message or the earliest ``next_deadline()``, so a minute of gossip
takes a few milliseconds and every run replays exactly from its seed.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.gossip import LEAVE_ROUNDS, GossipConfig, GossipNode, Send
from protocol.wire import (
    INT_MAX,
    Ack,
    DeltaEntry,
    Envelope,
    Gossip,
    MemberRecord,
    MemberState,
    MemberUpdate,
    NodeDelta,
    Ping,
    Sync,
    SyncDelta,
    decode,
    encode,
)

ALIVE, SUSPECT, DEAD, LEFT = (
    MemberState.ALIVE,
    MemberState.SUSPECT,
    MemberState.DEAD,
    MemberState.LEFT,
)
CFG = GossipConfig(cluster="test")

SPIN_STEP_S = 0.01

DropRule = Callable[[str, str, Envelope], bool]


def addr_of(node_id: str) -> str:
    return f"{node_id}.mesh:7946"


class Mesh:
    def __init__(
        self,
        seed: int = 0,
        config: GossipConfig = CFG,
        latency_s: float = 0.01,
        jitter_s: float = 0.0,
        loss: float = 0.0,
        duplicate: float = 0.0,
    ) -> None:
        self.config = config
        self.now = 0.0
        self.rng = random.Random(seed)
        self.latency_s = latency_s
        self.jitter_s = jitter_s
        self.loss = loss
        self.duplicate = duplicate
        self.nodes: dict[str, GossipNode] = {}  # by address
        self.rngs: dict[str, random.Random] = {}
        self.down: set[str] = set()  # addresses of crashed nodes
        self.drop_rules: list[DropRule] = []
        self.observers: list[Callable[[Mesh], None]] = []
        self.trace: list[tuple[float, str, str, str]] = []
        self.delivered = 0
        self.spins: dict[str, int] = {}  # address -> times it asked for a tick in the past
        self._same_instant: dict[str, int] = {}
        self._hold: dict[str, float] = {}
        self._queue: list[tuple[float, int, str, str, bytes]] = []
        self._counter = itertools.count()

    # -- setup ------------------------------------------------------------------

    def add(self, node_id: str, seeds: tuple[str, ...] = (), generation: int = 1) -> GossipNode:
        addr = addr_of(node_id)
        node = GossipNode(
            node_id, addr, generation, self.config, self.now, seeds=tuple(addr_of(s) for s in seeds)
        )
        self.nodes[addr] = node
        self.rngs[addr] = random.Random(self.rng.randrange(2**32))
        self.down.discard(addr)
        return node

    def node(self, node_id: str) -> GossipNode:
        return self.nodes[addr_of(node_id)]

    def crash(self, node_id: str) -> None:
        self.down.add(addr_of(node_id))

    def post(self, frm: str, sends: list[Send]) -> None:
        for s in sends:
            assert isinstance(s, Send)
            assert s.envelope.sender_addr == frm
            data = encode(s.envelope)
            if frm in self.down or any(rule(frm, s.to, s.envelope) for rule in self.drop_rules):
                continue
            if self.loss and self.rng.random() < self.loss:
                continue
            copies = 2 if self.duplicate and self.rng.random() < self.duplicate else 1
            for _ in range(copies):
                at = self.now + self.latency_s + self.rng.random() * self.jitter_s
                heapq.heappush(self._queue, (at, next(self._counter), frm, s.to, data))

    # -- running ------------------------------------------------------------------

    def _active(self) -> list[tuple[float, str]]:
        return sorted(
            (max(n.next_deadline(), self._hold.get(a, -math.inf)), a)
            for a, n in self.nodes.items()
            if a not in self.down and not n.left
        )

    def run_until(self, t_end: float, max_steps: int = 2_000_000) -> None:
        for _ in range(max_steps):
            t_msg = self._queue[0][0] if self._queue else math.inf
            active = self._active()
            t_node, who = active[0] if active else (math.inf, "")
            t_next = min(t_msg, t_node)
            if t_next > t_end:
                self.now = t_end
                return
            self.now = max(self.now, t_next)
            if t_msg <= t_node:
                _, _, frm, to, data = heapq.heappop(self._queue)
                node = self.nodes.get(to)
                if node is None or to in self.down:
                    continue
                env = decode(data, self.config.cluster)  # every message survives the codec
                self.trace.append((self.now, frm, to, type(env.body).__name__))
                self.delivered += 1
                self.post(to, node.receive(env, self.now, self.rngs[to]))
            else:
                node = self.nodes[who]
                self.post(who, node.tick(self.now, self.rngs[who]))
                self._check_spin(who, node)
            for obs in self.observers:
                obs(self)
        raise AssertionError("mesh did not reach t_end")

    def _check_spin(self, who: str, node: GossipNode) -> None:
        """A node whose deadline stays in the past after repeated ticks would
        busy-loop a real event loop (and hang a simulator): count it, and tick it
        again only after SPIN_STEP_S, as a loop with a coarse timer would."""
        if node.next_deadline() > self.now:
            self._same_instant.pop(who, None)
            return
        n = self._same_instant.get(who, 0) + 1
        self._same_instant[who] = n
        if n >= 3:
            self.spins[who] = self.spins.get(who, 0) + 1
            self._hold[who] = self.now + SPIN_STEP_S
            self._same_instant.pop(who, None)

    def run_for(self, dt: float) -> None:
        self.run_until(self.now + dt)


def state_of(viewer: GossipNode, node_id: str) -> MemberState | None:
    m = viewer.members.get(node_id)
    return None if m is None else m.state


def record_of(viewer: GossipNode, node_id: str) -> MemberRecord:
    m = viewer.members.get(node_id)
    assert m is not None
    return m.record


def assert_catalogs_equal(nodes: list[GossipNode]) -> None:
    first = nodes[0].catalog
    for n in nodes[1:]:
        assert n.catalog.digest() == first.digest()
        assert n.catalog.digest_hash() == first.digest_hash()
        assert {(a, k): v for a, k, v in n.catalog.items()} == {
            (a, k): v for a, k, v in first.items()
        }


def mesh_of(ids: tuple[str, ...], seed: int = 0, **kw: float) -> Mesh:
    mesh = Mesh(seed=seed, **kw)  # type: ignore[arg-type]
    mesh.add(ids[0])
    for nid in ids[1:]:
        mesh.add(nid, seeds=(ids[0],))
    return mesh


def all_alive(mesh: Mesh, ids: tuple[str, ...]) -> bool:
    return all(state_of(mesh.node(a), b) is ALIVE for a in ids for b in ids if a != b)


# -- joining and convergence ------------------------------------------------------


def test_two_nodes_join_via_seed_and_converge() -> None:
    mesh = Mesh(seed=1)
    a = mesh.add("a")
    a.set("reg/llama", {"v": 1}, 0.0)
    b = mesh.add("b", seeds=("a",))
    mesh.run_for(5.0)
    assert state_of(a, "b") is ALIVE
    assert state_of(b, "a") is ALIVE
    assert b.catalog.get("a", "reg/llama") == {"v": 1}
    assert_catalogs_equal([a, b])

    b.set("loc/llama@b:gpu0", "here", mesh.now)
    mesh.run_for(3.0)
    assert a.catalog.get("b", "loc/llama@b:gpu0") == "here"
    assert_catalogs_equal([a, b])

    b.delete("loc/llama@b:gpu0", mesh.now)
    mesh.run_for(3.0)
    assert a.catalog.get("b", "loc/llama@b:gpu0") is None
    assert_catalogs_equal([a, b])
    # Agreeing peers settle on one small Sync each time.
    before = a.stats.syncs_in_agreement + b.stats.syncs_in_agreement
    mesh.run_for(3.0)
    assert a.stats.syncs_in_agreement + b.stats.syncs_in_agreement > before


def test_three_nodes_learn_each_other_through_one_seed() -> None:
    ids = ("a", "b", "c")
    mesh = mesh_of(ids, seed=2)
    for i, nid in enumerate(ids):
        mesh.node(nid).set(f"k-{nid}", i, 0.0)
    mesh.run_for(10.0)
    assert all_alive(mesh, ids)
    nodes = [mesh.node(n) for n in ids]
    assert_catalogs_equal(nodes)
    assert nodes[1].catalog.get("c", "k-c") == 2
    for n in nodes:
        assert n.members.members_hash() == nodes[0].members.members_hash()


def test_many_writes_converge_with_small_budget() -> None:
    cfg = GossipConfig(cluster="test", delta_budget_bytes=1024)
    mesh = Mesh(seed=3, config=cfg)
    a, b = mesh.add("a"), mesh.add("b", seeds=("a",))
    for i in range(200):
        a.set(f"key-{i:03}", "v" * 40, 0.0)
        b.set(f"key-{i:03}", i, 0.0)
    mesh.run_for(60.0)
    assert_catalogs_equal([a, b])
    assert len([k for _, k, _ in b.catalog.items() if k.startswith("key-")]) == 400


def test_replay_is_deterministic() -> None:
    def run() -> list[tuple[float, str, str, str]]:
        mesh = mesh_of(("a", "b", "c"), seed=7, loss=0.1, jitter_s=0.05)
        mesh.node("b").set("k", 1, 0.0)
        mesh.run_for(10.0)
        return mesh.trace

    t1, t2 = run(), run()
    assert t1 == t2
    assert len(t1) > 50


# -- failure detection ---------------------------------------------------------------


def _track(mesh: Mesh, viewer: str, target: str) -> list[tuple[float, MemberState | None]]:
    history: list[tuple[float, MemberState | None]] = []

    def obs(m: Mesh) -> None:
        s = state_of(m.node(viewer), target)
        if not history or history[-1][1] != s:
            history.append((m.now, s))

    mesh.observers.append(obs)
    return history


def test_crashed_node_becomes_suspect_then_dead() -> None:
    ids = ("a", "b", "c")
    mesh = mesh_of(ids, seed=4)
    mesh.run_for(10.0)
    assert all_alive(mesh, ids)
    a_sees_c = _track(mesh, "a", "c")
    b_sees_c = _track(mesh, "b", "c")
    a_sees_b = _track(mesh, "a", "b")
    b_sees_a = _track(mesh, "b", "a")
    t_crash = mesh.now
    mesh.crash("c")
    mesh.run_for(60.0)
    for hist in (a_sees_c, b_sees_c):
        states = [s for _, s in hist]
        assert states == [ALIVE, SUSPECT, DEAD], hist
        t_suspect, t_dead = hist[1][0], hist[2][0]
        # A probe interval (plus the probe phase) to suspect...
        assert t_suspect - t_crash <= 3 * CFG.probe_interval_s
        # ...then the Lifeguard timeout: never below its floor for a 3-node mesh.
        floor = CFG.suspicion().min_timeout(3)
        assert t_dead - t_suspect >= floor - CFG.gossip_interval_s
        assert t_dead - t_suspect <= CFG.suspicion().timeout(3, 0) + 2 * CFG.gossip_interval_s
    # The two live nodes never doubted each other.
    assert [s for _, s in a_sees_b] == [ALIVE]
    assert [s for _, s in b_sees_a] == [ALIVE]
    a, b = mesh.node("a"), mesh.node("b")
    assert a.stats.suspicions_raised + b.stats.suspicions_raised >= 1
    assert "c" in a.members.gone and "c" not in a.members.live
    assert record_of(a, "c") == record_of(b, "c")


def test_crashed_peer_of_a_pair_is_declared_dead() -> None:
    mesh = mesh_of(("a", "b"), seed=5)
    mesh.run_for(5.0)
    hist = _track(mesh, "a", "b")
    mesh.crash("b")
    mesh.run_for(30.0)
    assert [s for _, s in hist] == [ALIVE, SUSPECT, DEAD]
    # Two members: nobody can confirm, so the timeout is the floor.
    assert hist[2][0] - hist[1][0] <= CFG.suspicion().min_timeout(2) + 2 * CFG.gossip_interval_s
    # Alone, a keeps re-dialling its seeds and the dead it remembers.
    a = mesh.node("a")
    assert len(a.members.live) == 0
    out = a.tick(mesh.now + CFG.gossip_interval_s, random.Random(0))
    assert any(s.to == addr_of("b") and isinstance(s.envelope.body, Sync) for s in out)


def test_suspected_but_alive_node_refutes_and_stays_alive() -> None:
    mesh = mesh_of(("a", "b"), seed=6)
    mesh.run_for(5.0)
    a, b = mesh.node("a"), mesh.node("b")
    hist = _track(mesh, "a", "b")
    t_stop = mesh.now + 2.5

    def drop_probes(frm: str, to: str, env: Envelope) -> bool:
        return mesh.now < t_stop and frm == addr_of("a") and isinstance(env.body, Ping)

    mesh.drop_rules.append(drop_probes)
    mesh.run_for(20.0)
    states = [s for _, s in hist]
    assert SUSPECT in states
    assert DEAD not in states
    assert state_of(a, "b") is ALIVE
    assert b.stats.refutations >= 1
    assert b.incarnation >= 1
    assert record_of(a, "b").incarnation == b.incarnation
    assert state_of(b, "a") is ALIVE


def test_injected_suspicion_is_refuted() -> None:
    ids = ("a", "b", "c")
    mesh = mesh_of(ids, seed=8)
    mesh.run_for(10.0)
    a, b, c = (mesh.node(n) for n in ids)
    rumour = MemberRecord("b", addr_of("b"), 1, b.incarnation, SUSPECT)
    env = Envelope("test", "a", 1, addr_of("a"), Gossip((MemberUpdate(rumour, "a"),)))
    mesh.post(addr_of("b"), b.receive(env, mesh.now, random.Random(0)))
    assert b.incarnation == rumour.incarnation + 1
    assert b.stats.refutations == 1
    # a DEAD rumour at the new incarnation is refuted the same way
    dead = MemberRecord("b", addr_of("b"), 1, b.incarnation, DEAD)
    b.receive(
        Envelope("test", "c", 1, addr_of("c"), Gossip((MemberUpdate(dead),))),
        mesh.now,
        random.Random(0),
    )
    assert b.incarnation == dead.incarnation + 1
    mesh.run_for(10.0)
    for viewer in (a, c):
        assert state_of(viewer, "b") is ALIVE
        assert record_of(viewer, "b").incarnation == b.incarnation
    # A stale rumour (older incarnation) is not news.
    old = MemberRecord("b", addr_of("b"), 1, 0, SUSPECT)
    b.receive(
        Envelope("test", "a", 1, addr_of("a"), Gossip((MemberUpdate(old, "a"),))),
        mesh.now,
        random.Random(0),
    )
    assert b.stats.refutations == 2


def test_a_stale_accusation_is_answered_with_the_refutation() -> None:
    """Sweep seed 4461: b had refuted a suspicion, but the few retransmissions of
    its refutation all went across a partition; a, on b's side, still held b
    suspect at the old incarnation and declared it dead.  b now answers a stale
    accusation straight to its sender, and gossips its record again."""
    mesh = mesh_of(("a", "b"), seed=8)
    mesh.run_for(10.0)
    a, b = mesh.node("a"), mesh.node("b")
    inc = b.incarnation
    stale = MemberRecord("b", addr_of("b"), 1, inc, SUSPECT)
    b.receive(Envelope("test", "a", 1, addr_of("a"), Gossip((MemberUpdate(stale, "a"),))), mesh.now, random.Random(0))
    assert b.incarnation == inc + 1 and b.stats.refutations == 1
    assert b.stats.stale_accusations == 0
    # a never hears that refutation; it still holds b suspect at ``inc``.
    a.receive(Envelope("test", "c", 1, addr_of("c"), Gossip((MemberUpdate(stale, "c"),))), mesh.now, random.Random(0))
    assert state_of(a, "b") is SUSPECT
    while len(b.broadcasts):  # and b's rumour of it has gone elsewhere
        b.broadcasts.take(3, 16)
    out = b.receive(
        Envelope("test", "a", 1, addr_of("a"), Gossip((MemberUpdate(stale, "a"),))), mesh.now, random.Random(0)
    )
    assert b.stats.stale_accusations == 1 and b.stats.refutations == 1 and b.incarnation == inc + 1
    (reply,) = out
    assert reply.to == addr_of("a") and isinstance(reply.envelope.body, Gossip)
    assert len(b.broadcasts) == 1  # told again to whoever it gossips with
    _deliver(a, reply, mesh.now)
    assert state_of(a, "b") is ALIVE and record_of(a, "b").incarnation == inc + 1


def test_a_ping_to_a_suspect_carries_the_suspicion() -> None:
    """Lifeguard's buddy system: the prober tells the suspect it is suspected, in
    the ping, so it refutes in its ack even when no rumour of the suspicion
    reaches it (here every message but pings and acks is lost between them)."""
    mesh = mesh_of(("a", "b"), seed=9)
    mesh.run_for(10.0)
    a, b = mesh.node("a"), mesh.node("b")
    inc = b.incarnation
    rumour = MemberRecord("b", addr_of("b"), 1, inc, SUSPECT)
    a.receive(Envelope("test", "c", 1, addr_of("c"), Gossip((MemberUpdate(rumour, "c"),))), mesh.now, random.Random(0))
    assert state_of(a, "b") is SUSPECT
    while len(a.broadcasts):  # the rumour's retransmissions went elsewhere
        a.broadcasts.take(3, 16)
    mesh.drop_rules.append(lambda frm, to, env: not isinstance(env.body, Ping | Ack))
    pings: list[Ping] = []
    mesh.drop_rules.append(
        lambda frm, to, env: bool(
            frm == addr_of("a") and isinstance(env.body, Ping) and pings.append(env.body)
        )
    )
    mesh.run_for(20.0)
    assert pings and pings[0].updates[0].record == rumour
    assert state_of(a, "b") is ALIVE and record_of(a, "b").incarnation == inc + 1
    assert b.stats.refutations == 1


def _forge(mesh: Mesh, to: str, *records: MemberRecord, via: str = "c", wall_ms: int | None = None) -> None:
    """Deliver forged member records to ``to`` as if ``via`` (an insider) gossiped them."""
    node = mesh.node(to)
    env = Envelope("test", via, 1, addr_of(via), Gossip(tuple(MemberUpdate(r) for r in records)))
    mesh.post(addr_of(to), node.receive(env, mesh.now, random.Random(0), wall_ms))


@pytest.mark.parametrize("state", [ALIVE, LEFT, DEAD])
def test_a_forged_newer_generation_is_refuted_by_moving_above_it(state: MemberState) -> None:
    """A record of b at generation+1 marked left made every node drop b and its
    registrations, and b said nothing.  Now b moves above it, warns, and the
    mesh ends with b alive and its keys back."""
    ids = ("a", "b", "c")
    mesh = mesh_of(ids, seed=9)
    b = mesh.node("b")
    b.set("reg/llama", {"by": "b"}, 0.0)
    mesh.run_for(5.0)
    assert all_alive(mesh, ids)
    forged = MemberRecord("b", addr_of("b"), 2, 0, state)
    for victim in ("a", "c"):  # the forgery reaches the others first
        _forge(mesh, victim, forged)
    _forge(mesh, "b", forged)
    assert b.stats.identity_conflicts == 1 and b.stats.generation_moves == 1
    assert b.generation == 3 and b.members.self_record == MemberRecord("b", addr_of("b"), 3, 0, ALIVE)
    assert [n.kind for n in b.notices] == ["identity_conflict"] and "generation 3" in b.notices[0].text
    mesh.run_for(10.0)
    for viewer in ("a", "c"):
        assert record_of(mesh.node(viewer), "b") == MemberRecord("b", addr_of("b"), 3, 0, ALIVE)
        assert mesh.node(viewer).catalog.get("b", "reg/llama") == {"by": "b"}
    assert_catalogs_equal([mesh.node(n) for n in ids])


def test_identity_moves_are_rate_limited() -> None:
    """Two live processes with one id would leapfrog each other: each move is
    counted and reported, and a node moves at most once per interval."""
    mesh = mesh_of(("a", "b"), seed=9)
    mesh.run_for(3.0)
    b = mesh.node("b")
    _forge(mesh, "b", MemberRecord("b", "elsewhere:1", 2, 0, ALIVE), via="a")
    _forge(mesh, "b", MemberRecord("b", "elsewhere:1", 5, 0, ALIVE), via="a")
    assert b.stats.identity_conflicts == 2 and b.stats.generation_moves == 1 and b.generation == 3
    mesh.run_for(CFG.identity_refute_interval_s)
    _forge(mesh, "b", MemberRecord("b", "elsewhere:1", 5, 0, ALIVE), via="a")
    assert b.stats.generation_moves == 2 and b.generation == 6


def test_a_record_of_us_with_another_address_is_refuted() -> None:
    ids = ("a", "b", "c")
    mesh = mesh_of(ids, seed=4)
    mesh.run_for(5.0)
    b = mesh.node("b")
    hijack = MemberRecord("b", "attacker:7946", 1, b.incarnation, ALIVE)
    for viewer in ("a", "c", "b"):
        _forge(mesh, viewer, hijack)
    assert b.incarnation == hijack.incarnation + 1 and b.generation == 1
    mesh.run_for(10.0)
    for viewer in ("a", "c"):
        assert record_of(mesh.node(viewer), "b").address == addr_of("b")


def test_a_suspicion_at_the_last_incarnation_moves_the_generation() -> None:
    """No incarnation is above 2**63-1: refuting one means a new generation,
    and every message still encodes (an overflow would be dropped by peers)."""
    mesh = mesh_of(("a", "b"), seed=5)
    mesh.run_for(3.0)
    b = mesh.node("b")
    _forge(mesh, "b", MemberRecord("b", addr_of("b"), 1, INT_MAX, SUSPECT), via="a")
    assert b.generation == 2 and b.incarnation == 0
    mesh.run_for(10.0)  # every message goes through the codec
    assert record_of(mesh.node("a"), "b") == MemberRecord("b", addr_of("b"), 2, 0, ALIVE)


def test_generations_far_ahead_of_the_clock_are_dropped() -> None:
    """A forged generation of 2**63-1 outranked every restart forever (it
    survived a wiped data dir).  Generations are clocks: one more than the
    bound ahead of ours is dropped, and the node says so."""
    wall = 1_800_000_000_000
    mesh = Mesh(seed=6)
    a = mesh.add("a", generation=wall)
    mesh.add("b", seeds=("a",), generation=wall)
    mesh.run_for(3.0)
    for gen in (INT_MAX, wall + CFG.generation_ahead_max_ms + 1):
        _forge(mesh, "a", MemberRecord("b", addr_of("b"), gen, 0, LEFT), via="b", wall_ms=wall)
        _forge(mesh, "a", MemberRecord("z", "z.mesh:1", gen, 0, ALIVE), via="b", wall_ms=wall)
    assert record_of(a, "b").generation == wall and state_of(a, "b") is ALIVE
    assert a.members.get("z") is None
    assert a.stats.future_generations_dropped == 4
    assert [n.kind for n in a.notices] == ["future_generation"]
    # Within the bound (a peer whose clock is a little ahead) is taken.
    _forge(mesh, "a", MemberRecord("z", "z.mesh:1", wall + 30_000, 0, ALIVE), via="b", wall_ms=wall)
    assert state_of(a, "z") is ALIVE


def test_keys_forged_in_our_name_are_superseded() -> None:
    """An insider sends deltas of b's keys at b's generation with versions b
    never wrote.  Peers take them (they cannot tell), but b sees in their
    digest that its keys go beyond its own, and moves its generation: every
    node then drops the forged keys and holds b's real ones."""
    ids = ("a", "b", "c")
    mesh = mesh_of(ids, seed=8)
    b = mesh.node("b")
    b.set("reg/llama", {"by": "b"}, 0.0)
    mesh.run_for(5.0)
    a = mesh.node("a")
    forged = NodeDelta("b", 1, 0, 10**6, 0, True, (DeltaEntry("reg/llama", 10**6, {"by": "evil"}, False),))
    env = Envelope("test", "c", 1, addr_of("c"), SyncDelta((forged,)))
    a.receive(env, mesh.now, random.Random(0))
    assert a.catalog.get("b", "reg/llama") == {"by": "evil"}
    mesh.run_for(10.0)
    assert b.generation == 2 and b.stats.identity_conflicts >= 1
    for n in ids:
        assert mesh.node(n).catalog.get("b", "reg/llama") == {"by": "b"}
    assert_catalogs_equal([mesh.node(n) for n in ids])


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c"]),
            st.integers(1, 6),
            st.sampled_from([0, 1, 7, INT_MAX]),
            st.sampled_from(list(MemberState)),
            st.sampled_from([addr_of("b"), "attacker:1"]),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_whatever_is_forged_about_a_node_it_ends_alive_with_its_keys(
    forgeries: list[tuple[str, int, int, MemberState, str]],
) -> None:
    ids = ("a", "b", "c")
    mesh = mesh_of(ids, seed=11)
    b = mesh.node("b")
    b.set("reg/llama", {"by": "b"}, 0.0)
    mesh.run_for(5.0)
    for to, gen, inc, state, addr in forgeries:
        _forge(mesh, to, MemberRecord("b", addr, gen, inc, state))
        mesh.run_for(1.0)
    mesh.run_for(CFG.identity_refute_interval_s * len(forgeries) + 15.0)
    me = b.members.self_record
    assert me.state is ALIVE and me.address == addr_of("b")
    for viewer in ("a", "c"):
        assert record_of(mesh.node(viewer), "b") == me
        assert mesh.node(viewer).catalog.get("b", "reg/llama") == {"by": "b"}


def test_a_delta_at_a_generation_the_member_record_lacks_is_ignored() -> None:
    """A forged delta cannot install a newer generation of b's keys (which
    would outrank b's real ones everywhere): deltas go in only at the
    generation b's member record holds."""
    mesh = mesh_of(("a", "b"), seed=8)
    mesh.node("b").set("reg/llama", {"by": "b"}, 0.0)
    mesh.run_for(5.0)
    a = mesh.node("a")
    forged = NodeDelta("b", 99, 0, 1, 0, True, (DeltaEntry("reg/llama", 1, {"by": "evil"}, False),))
    a.receive(Envelope("test", "c", 1, addr_of("c"), SyncDelta((forged,))), mesh.now, random.Random(0))
    assert a.catalog.get("b", "reg/llama") == {"by": "b"} and a.catalog.nodes["b"].generation == 1


# -- leaving and restarting --------------------------------------------------------------


def test_leave_makes_peers_see_left() -> None:
    cfg = GossipConfig(cluster="test", reap_after_s=20.0, housekeeping_interval_s=1.0)
    mesh = Mesh(seed=10, config=cfg)
    mesh.add("a")
    mesh.add("b", seeds=("a",))
    mesh.add("c", seeds=("a",))
    mesh.node("b").set("k", 1, 0.0)
    mesh.run_for(10.0)
    a, b, c = (mesh.node(n) for n in "abc")
    assert c.catalog.get("b", "k") == 1
    # b tells only a directly; c must hear it as a rumour.
    mesh.drop_rules.append(lambda frm, to, env: frm == addr_of("b") and to == addr_of("c"))
    sends = b.leave(mesh.now, random.Random(0))
    assert sends and all(isinstance(s.envelope.body, Ping) for s in sends)  # a Ping: answered with an Ack
    assert b.members.self_record.state is LEFT
    assert b.leave(mesh.now, random.Random(0)) == []
    mesh.post(addr_of("b"), sends)
    hist_c = _track(mesh, "c", "b")
    mesh.run_for(10.0)
    assert state_of(a, "b") is LEFT
    assert state_of(c, "b") is LEFT
    assert DEAD not in [s for _, s in hist_c]
    assert b.leave_settled and b.leaving_ack == "a"  # a acknowledged: b may go
    assert "b" not in a.members.live and "b" not in a.members.gone
    # A node that left answers nothing and ticks nothing.
    assert b.tick(mesh.now + 10, random.Random(0)) == []
    assert (
        b.receive(Envelope("test", "a", 1, addr_of("a"), Ping(1, "b")), mesh.now, random.Random(0))
        == []
    )
    # After reap_after_s the departed are forgotten, catalog entries included.
    mesh.run_for(30.0)
    assert "b" not in a.members and "b" not in c.members
    assert a.catalog.get("b", "k") is None and "b" not in a.catalog.nodes


def test_a_leave_is_told_again_until_a_peer_acknowledges() -> None:
    """Five of 300 random chaos runs ended with a cleanly left node seen as
    dead everywhere: its one round of fire-and-forget messages was lost."""
    cfg = GossipConfig(cluster="test", reap_after_s=20.0, housekeeping_interval_s=1.0)
    mesh = Mesh(seed=11, config=cfg)
    for n in "abc":
        mesh.add(n, seeds=("a",) if n != "a" else ())
    mesh.run_for(10.0)
    b = mesh.node("b")
    rng = random.Random(1)
    lost = True
    mesh.drop_rules.append(lambda frm, to, env: lost and frm == addr_of("b"))
    mesh.post(addr_of("b"), b.leave(mesh.now, rng))
    mesh.run_for(0.1)
    assert not b.leave_settled and b.leave_tick(mesh.now, rng) == []  # not before the probe timeout
    mesh.run_for(cfg.probe_timeout_s)
    again = b.leave_tick(mesh.now, rng)
    assert again and all(isinstance(s.envelope.body, Ping) for s in again)
    lost = False
    mesh.post(addr_of("b"), again)
    mesh.run_for(0.1)
    assert b.leave_settled and b.leaving_ack in ("a", "c")
    mesh.run_for(10.0)
    assert state_of(mesh.node("a"), "b") is LEFT and state_of(mesh.node("c"), "b") is LEFT


def test_a_leave_nobody_acknowledges_gives_up_after_its_rounds() -> None:
    cfg = GossipConfig(cluster="test")
    mesh = Mesh(seed=12, config=cfg)
    mesh.add("a")
    mesh.add("b", seeds=("a",))
    mesh.run_for(5.0)
    b = mesh.node("b")
    mesh.crash("a")  # nobody to answer
    rng = random.Random(2)
    rounds = [b.leave(mesh.now, rng)]
    while not b.leave_settled:
        mesh.run_for(cfg.probe_timeout_s)
        rounds.append(b.leave_tick(mesh.now, rng))
    assert len([r for r in rounds if r]) == LEAVE_ROUNDS and b.leaving_ack is None
    assert b.leave_deadline() == math.inf


def test_a_node_that_thinks_everyone_dead_tells_the_dead_it_leaves() -> None:
    """Sweep seed 4741: a node cut off from every peer left with nobody live to
    tell, so the mesh saw it dead.  With no live peer, the leave is told to the
    dead it remembers: one that is reachable again acknowledges it."""
    cfg = GossipConfig(cluster="test")
    mesh = Mesh(seed=13, config=cfg)
    mesh.add("a")
    mesh.add("b", seeds=("a",))
    mesh.run_for(5.0)
    cut = True
    mesh.drop_rules.append(lambda frm, to, env: cut)
    mesh.run_for(60.0)
    a, b = mesh.node("a"), mesh.node("b")
    assert state_of(a, "b") is DEAD and state_of(b, "a") is DEAD and not b.members.live
    cut = False
    rng = random.Random(3)
    sends = b.leave(mesh.now, rng)
    assert [s.to for s in sends] == [addr_of("a")]
    mesh.post(addr_of("b"), sends)
    mesh.run_for(0.1)
    assert b.leave_settled and b.leaving_ack == "a"
    assert state_of(a, "b") is LEFT


def test_restarted_node_supersedes_old_self_and_resets_catalog() -> None:
    ids = ("a", "b", "c")
    mesh = mesh_of(ids, seed=11)
    mesh.node("b").set("old", 1, 0.0)
    mesh.node("b").set("both", "gen1", 0.0)
    mesh.run_for(10.0)
    assert mesh.node("c").catalog.get("b", "old") == 1
    # b restarts: same id and address, generation 2, a fresh catalog.
    mesh.crash("b")
    mesh.run_for(0.3)
    b2 = mesh.add("b", seeds=("a",), generation=2)
    b2.set("both", "gen2", mesh.now)
    b2.set("new", 2, mesh.now)
    mesh.run_for(15.0)
    for viewer in (mesh.node("a"), mesh.node("c")):
        rec = record_of(viewer, "b")
        assert rec.generation == 2 and rec.state is ALIVE
        assert viewer.catalog.nodes["b"].generation == 2
        assert viewer.catalog.get("b", "old") is None
        assert viewer.catalog.get("b", "both") == "gen2"
        assert viewer.catalog.get("b", "new") == 2
    assert b2.stats.identity_conflicts == 0
    assert b2.members.self_record.generation == 2
    assert all_alive(mesh, ids)
    assert_catalogs_equal([mesh.node(n) for n in ids])


def test_restart_supersedes_dead_old_self() -> None:
    mesh = mesh_of(("a", "b"), seed=12)
    mesh.node("b").set("old", 1, 0.0)
    mesh.run_for(5.0)
    mesh.crash("b")
    mesh.run_for(30.0)
    a = mesh.node("a")
    assert state_of(a, "b") is DEAD
    b2 = mesh.add("b", seeds=("a",), generation=2)
    mesh.run_for(10.0)
    assert record_of(a, "b").generation == 2
    assert state_of(a, "b") is ALIVE
    assert a.catalog.get("b", "old") is None
    assert state_of(b2, "a") is ALIVE


# -- hostile networks ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", [13, 14, 15])
def test_duplicated_and_reordered_messages_are_harmless(seed: int) -> None:
    ids = ("a", "b", "c")
    mesh = mesh_of(ids, seed=seed, duplicate=0.5, jitter_s=0.2)
    dead_seen: list[tuple[str, str]] = []

    def no_deaths(m: Mesh) -> None:
        for x in ids:
            for y in ids:
                if x != y and state_of(m.node(x), y) in (DEAD, LEFT):
                    dead_seen.append((x, y))

    mesh.observers.append(no_deaths)
    rng = random.Random(seed)
    for _ in range(30):
        n = mesh.node(rng.choice(ids))
        if rng.random() < 0.7:
            n.set(f"k{rng.randrange(6)}", rng.randrange(100), mesh.now)
        else:
            n.delete(f"k{rng.randrange(6)}", mesh.now)
        mesh.run_for(0.3)
    mesh.run_for(20.0)
    assert dead_seen == []
    assert all_alive(mesh, ids)
    assert_catalogs_equal([mesh.node(n) for n in ids])


def test_lossy_network_still_converges() -> None:
    ids = ("a", "b", "c", "d")
    mesh = mesh_of(ids, seed=16, loss=0.15, jitter_s=0.05)
    for i, nid in enumerate(ids):
        for j in range(5):
            mesh.node(nid).set(f"k{j}", i * 10 + j, 0.0)
    mesh.run_for(40.0)
    mesh.loss = 0.0
    mesh.run_for(30.0)
    assert all_alive(mesh, ids)
    assert_catalogs_equal([mesh.node(n) for n in ids])


def test_partition_heals() -> None:
    ids = ("a", "b", "c")
    mesh = mesh_of(ids, seed=17)
    mesh.run_for(10.0)
    side = {addr_of("c")}
    mesh.drop_rules.append(lambda frm, to, env: (frm in side) != (to in side))
    mesh.node("c").set("during", 1, mesh.now)
    mesh.run_for(40.0)
    assert state_of(mesh.node("a"), "c") is DEAD
    assert state_of(mesh.node("c"), "a") is DEAD
    mesh.drop_rules.clear()
    mesh.run_for(30.0)
    assert all_alive(mesh, ids)
    assert mesh.node("a").catalog.get("c", "during") == 1
    assert_catalogs_equal([mesh.node(n) for n in ids])


def _deliver(node: GossipNode, send: Send, now: float) -> list[Send]:
    return node.receive(decode(encode(send.envelope), "test"), now, random.Random(0))


def test_same_delta_delivered_twice_changes_nothing_more() -> None:
    mesh = mesh_of(("a", "b"), seed=18)
    mesh.run_for(5.0)
    a, b = mesh.node("a"), mesh.node("b")
    a.set("x", 1, mesh.now)
    a.set("y", 2, mesh.now)
    now = mesh.now
    # b opens; a answers with its digest; b sends what a lacks (nothing) and its
    # digest; a sends what b lacks.
    sync = Send(
        addr_of("a"),
        Envelope(
            "test", "b", 1, addr_of("b"), Sync(b.catalog.digest_hash(), b.members.members_hash())
        ),
    )
    (m1,) = _deliver(a, sync, now)
    (m2,) = _deliver(b, m1, now)
    assert isinstance(m2.envelope.body, SyncDelta) and m2.envelope.body.digest is not None
    (m3,) = _deliver(a, m2, now)
    body = m3.envelope.body
    assert isinstance(body, SyncDelta)
    assert {e.key for d in body.deltas for e in d.entries} == {"x", "y"}
    assert _deliver(b, m3, now) == []
    assert b.catalog.get("a", "y") == 2
    digest, version = dict(b.catalog.digest()), b.version
    # The same delta again, and a's digest message again: nothing changes.
    assert _deliver(b, m3, now) == []
    assert _deliver(b, m1, now + 0.1)[0].envelope.body.deltas == ()  # type: ignore[union-attr]
    assert dict(b.catalog.digest()) == digest
    assert b.version == version
    # b's own delta bounced back to b is ignored too.
    _deliver(b, m2, now)
    assert dict(b.catalog.digest()) == digest
    assert_catalogs_equal([a, b])


def test_stray_acks_and_pings_for_others() -> None:
    mesh = mesh_of(("a", "b"), seed=19)
    mesh.run_for(3.0)
    a = mesh.node("a")
    rng = random.Random(0)
    # An ack nobody asked for is ignored; a ping for someone else is not acked.
    assert a.receive(Envelope("test", "b", 1, addr_of("b"), Ack(987654, "b")), mesh.now, rng) == []
    assert a.receive(Envelope("test", "b", 1, addr_of("b"), Ping(5, "zed")), mesh.now, rng) == []
    out = a.receive(Envelope("test", "b", 1, addr_of("b"), Ping(5, "a")), mesh.now, rng)
    assert len(out) == 1 and isinstance(out[0].envelope.body, Ack)
    assert out[0].to == addr_of("b") and out[0].envelope.body.seq == 5


def test_indirect_probe_through_a_helper() -> None:
    ids = ("a", "b", "c")
    mesh = mesh_of(ids, seed=20)
    mesh.run_for(10.0)
    # The direct a<->c link fails both ways; b can still reach c.
    mesh.drop_rules.append(
        lambda frm, to, env: (
            {frm, to} == {addr_of("a"), addr_of("c")} and isinstance(env.body, Ping | Ack)
        )
    )
    hist = _track(mesh, "a", "c")
    mesh.run_for(30.0)
    assert DEAD not in [s for _, s in hist]
    assert state_of(mesh.node("a"), "c") is ALIVE
    assert any(kind == "PingReq" for _, _, _, kind in mesh.trace)


def test_sends_are_well_formed() -> None:
    mesh = mesh_of(("a", "b", "c"), seed=21)
    mesh.run_for(5.0)
    for addr, node in mesh.nodes.items():
        for s in node.tick(mesh.now + 2.0, random.Random(1)):
            assert s.envelope.sender == node.id
            assert s.envelope.sender_addr == addr
            assert s.envelope.cluster == "test"
            assert s.to != addr
            assert decode(encode(s.envelope), "test") == s.envelope


def test_late_tick_does_not_spin() -> None:
    """A tick that comes late (a stalled event loop) must not leave the node asking
    to be ticked again and again at the same instant."""
    node = GossipNode("a", addr_of("a"), 1, CFG, 0.0)
    node.members.merge(MemberUpdate(MemberRecord("b", addr_of("b"), 1, 0, ALIVE)), 0.0)
    rng = random.Random(0)
    now = 0.0
    # On time until the first probe goes out (b never answers).
    while not any(isinstance(s.envelope.body, Ping) for s in node.tick(now, rng)):
        now = node.next_deadline()
    # The loop stalls for 1.3 s, then the node is ticked on time again.
    now += 1.3
    node.tick(now, rng)
    for _ in range(20):
        now = max(now, node.next_deadline())
        for _ in range(3):
            node.tick(now, rng)
        assert node.next_deadline() > now, f"still due at {now}"


def test_on_time_ticks_always_move_the_deadline() -> None:
    node = GossipNode("a", addr_of("a"), 1, CFG, 0.0)
    node.members.merge(MemberUpdate(MemberRecord("b", addr_of("b"), 1, 0, ALIVE)), 0.0)
    rng = random.Random(0)
    now = 0.0
    for _ in range(200):
        now = max(now, node.next_deadline())
        for _ in range(3):
            node.tick(now, rng)
            if node.next_deadline() > now:
                break
        assert node.next_deadline() > now
    assert now > 30.0
    assert state_of(node, "b") is DEAD


def test_joiner_converges_with_origin_that_collected_tombstones() -> None:
    cfg = GossipConfig(
        cluster="test", delta_budget_bytes=1024, tombstone_grace_s=1.0, housekeeping_interval_s=1.0
    )
    mesh = Mesh(seed=23, config=cfg)
    a = mesh.add("a")
    for i in range(100):
        a.set(f"key-{i:03}", "v" * 40, 0.0)
    a.delete("key-050", 0.0)
    mesh.run_for(5.0)
    assert a.catalog.own.last_gc_version == a.catalog.own.max_version
    b = mesh.add("b", seeds=("a",))
    mesh.run_for(120.0)
    assert_catalogs_equal([a, b])


def test_on_time_run_with_refutations_never_spins() -> None:
    mesh = mesh_of(("a", "b"), seed=6)
    mesh.run_for(5.0)
    t_stop = mesh.now + 2.5
    mesh.drop_rules.append(
        lambda frm, to, env: (
            mesh.now < t_stop and frm == addr_of("a") and isinstance(env.body, Ping)
        )
    )
    mesh.run_for(20.0)
    assert mesh.node("b").stats.refutations >= 1
    assert mesh.spins == {}


def test_no_spins_in_a_quiet_mesh() -> None:
    mesh = mesh_of(("a", "b", "c"), seed=24)
    mesh.run_for(60.0)
    assert mesh.spins == {}


def test_local_health_stays_bounded_and_recovers() -> None:
    ids = ("a", "b", "c")
    mesh = mesh_of(ids, seed=25, loss=0.3)
    peak = {"h": 0}

    def obs(m: Mesh) -> None:
        for n in ids:
            h = m.node(n).health
            assert 0 <= h <= m.config.health_max
            peak["h"] = max(peak["h"], h)

    mesh.observers.append(obs)
    mesh.run_for(30.0)
    assert peak["h"] > 0  # a lossy network does make nodes doubt themselves
    mesh.loss = 0.0
    mesh.run_for(90.0)
    assert all_alive(mesh, ids)
    assert [mesh.node(n).health for n in ids] == [0, 0, 0]
