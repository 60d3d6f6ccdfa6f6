"""The mesh as the daemon's parts see it: the catalog and the members, and
the loop that drives the gossip state machine.

``Mesh`` wraps ``protocol.GossipNode`` with the clock and the peer sender:
parts read and write the catalog through it (``get``, ``items``, ``set``,
``delete``), ask about members (``state_of``, ``reachable``, ``online``,
``data_address``), and never touch the state machine themselves.  It also
runs the gossip ticks, takes decoded peer messages (``receive``), and logs
what the state machine reports (identity conflicts, bad peers).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable, Iterator
from typing import Any

import trio

from protocol import GossipNode, MemberState, RemoteProtocolError
from protocol.catalog import Entry
from protocol.causal import After, seen
from protocol.keys import NODE_KEY, NodeInfo, RecordError
from protocol.membership import Member
from protocol.wire import MsgType, WrongCluster, WrongVersion, decode

from .peers import PeerSender
from .ratelimit import LogOnce

__all__ = ["Mesh", "wall_ms"]

log = logging.getLogger("meshnode.mesh")

WAIT_PULL_EVERY_S = 0.5  # a reader waiting for a write asks its writer again this often
MEMBER_LINES_MAX = 20  # member changes logged at once; the rest as a count
LATE_LOG_EVERY_S = 30.0  # missed deadlines of our own are logged at most this often


def wall_ms() -> int:
    return int(time.time() * 1000)


class Mesh:
    def __init__(self, gossip: GossipNode, sender: PeerSender, rng: random.Random) -> None:
        self.gossip = gossip
        self.sender = sender
        self.rng = rng
        self.bad_messages = 0
        self.received_bytes = 0
        self._log_once = LogOnce()
        self._leave_acked = trio.Event()
        self._catalog_changed = trio.Event()
        self._members_logged_hash: int | None = None
        self._member_states: dict[str, tuple[str, int]] = {}  # as last logged: state, generation
        self.last_tick: float | None = None  # trio time the gossip loop last ran (the watchdog's pulse)
        self._late_logged: tuple[float, int] | None = None  # when, and late_ticks then
        gossip.catalog.subscribe(self)  # wakes readers waiting for a write (wait_seen)

    # -- who we are ---------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self.gossip.id

    @property
    def cluster(self) -> str:
        return self.gossip.config.cluster

    @property
    def generation(self) -> int:
        """Set at start; moved up only to refute an identity conflict."""
        return self.gossip.generation

    @property
    def left(self) -> bool:
        return self.gossip.left

    @property
    def version(self) -> int:
        """Moves whenever what this node knows changes."""
        return self.gossip.version

    # -- members ------------------------------------------------------------------------

    def members(self) -> Iterator[Member]:
        return iter(self.gossip.members)

    def member(self, node_id: str) -> Member | None:
        return self.gossip.members.get(node_id)

    def state_of(self, node_id: str) -> MemberState | None:
        m = self.gossip.members.get(node_id)
        return None if m is None else m.state

    def reachable(self, node_id: str) -> bool:
        """Worth asking: ourselves, or a member alive or suspect."""
        if node_id == self.id:
            return not self.left
        m = self.gossip.members.get(node_id)
        return m is not None and m.state.reachable

    def online(self, node_id: str) -> bool:
        """Alive (ourselves, until we leave)."""
        if node_id == self.id:
            return not self.left
        return self.state_of(node_id) is MemberState.ALIVE

    def address_of(self, node_id: str) -> str | None:
        m = self.gossip.members.get(node_id)
        return None if m is None else m.record.address

    def data_address(self, node_id: str) -> str | None:
        """``host:port`` of a reachable member's data plane (its ``node`` record)."""
        m = self.gossip.members.get(node_id)
        if m is None or not m.state.reachable:
            return None
        try:
            info = NodeInfo.from_value(self.get(node_id, NODE_KEY))
        except RecordError:
            return None
        return f"{m.record.address.rsplit(':', 1)[0]}:{info.data_port}"

    # -- the catalog --------------------------------------------------------------------

    def get(self, node_id: str, key: str) -> Any:
        return self.gossip.catalog.get(node_id, key)

    def items(self, prefix: str = "") -> Iterator[tuple[str, str, Any]]:
        """Every live ``(node_id, key, value)`` whose key starts with ``prefix``."""
        return self.gossip.catalog.items(prefix)

    def origins(self) -> list[str]:
        """Every node the catalog holds keys of."""
        return list(self.gossip.catalog.nodes)

    def entry(self, node_id: str, key: str) -> Entry | None:
        st = self.gossip.catalog.nodes.get(node_id)
        return None if st is None else st.keys.get(key)

    def own_keys(self, prefix: str = "") -> Iterable[tuple[str, Entry]]:
        """Our own entries (tombstones too) whose key starts with ``prefix``."""
        return [(k, e) for k, e in self.gossip.catalog.own.keys.items() if k.startswith(prefix)]

    def check(self, key: str, value: Any) -> None:
        """``LocalProtocolError`` unless ``set(key, value)`` would work."""
        self.gossip.catalog.check(key, value)

    def set(self, key: str, value: Any) -> int:
        return self.gossip.set(key, value, trio.current_time())

    def delete(self, key: str) -> bool:
        return self.gossip.delete(key, trio.current_time())

    # -- driving the state machine ------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The gossip ticks, until cancelled."""
        g = self.gossip
        task_status.started()
        while True:
            self.last_tick = trio.current_time()
            try:
                self.sender.enqueue(g.tick(trio.current_time(), self.rng))
                self._log_notices()
            except Exception:  # a bug in a tick must not take the node down
                log.exception("gossip tick failed")
            # Sleep until the next timer, but never longer than a quarter second.
            await trio.sleep_until(min(g.next_deadline(), trio.current_time() + 0.25))

    def receive(self, data: bytes, remote: str, signer: str | None = None) -> None:
        """Decode, check and apply one peer message; ``signer`` is the node id
        its credential proved (None when the node needs none).  Raises
        RemoteProtocolError (and logs it)."""
        self.received_bytes += len(data)
        try:
            env = decode(data, self.cluster)
            if signer is not None and env.sender != signer:
                raise RemoteProtocolError(f"message from {env.sender!r} signed by {signer!r}")
        except (WrongCluster, WrongVersion, RemoteProtocolError) as e:
            self._note_bad_peer(remote, e)
            raise
        if env.type is MsgType.ACK:
            self.sender.answered(env.sender_addr)
        self.sender.enqueue(self.gossip.receive(env, trio.current_time(), self.rng, wall_ms()))
        if self.gossip.left and self.gossip.leave_settled:
            self._leave_acked.set()
        self._log_notices()

    # -- read your writes (protocol.causal) -----------------------------------------------

    def key_changed(self, node_id: str, key: str, value: Any | None) -> None:
        ev, self._catalog_changed = self._catalog_changed, trio.Event()
        ev.set()

    def node_cleared(self, node_id: str) -> None:
        self.key_changed(node_id, "", None)

    def token(self) -> str:
        """The causality token of everything this node has written so far."""
        return After.of(self.gossip.catalog).text()

    async def wait_seen(self, after: After, timeout_s: float) -> bool:
        """Wait until this node has seen ``after`` (pulling from its writer
        meanwhile), at most ``timeout_s``; whether it has."""
        if seen(self.gossip.catalog, after):
            return True
        if after.node_id != self.id and self.gossip.members.get(after.node_id) is None:
            # A writer this node has never heard of (another mesh's, say): nothing to pull
            # from and nothing the gossip will bring, so no wait; the answer says it is not caught up.
            return False
        deadline = trio.current_time() + timeout_s
        next_pull = trio.current_time()
        while not seen(self.gossip.catalog, after):
            now = trio.current_time()
            if now >= deadline:
                return False
            if now >= next_pull:  # ask the writer itself, not a random peer
                self.sender.enqueue(self.gossip.sync_with(after.node_id))
                next_pull = now + WAIT_PULL_EVERY_S
            ev = self._catalog_changed
            with trio.move_on_at(min(deadline, next_pull)):
                await ev.wait()
        return True

    async def leave(self, timeout_s: float) -> None:
        """Tell peers we are leaving (they show us as ``left``), round after
        round until one acknowledges (``GossipNode.leave``), within ``timeout_s``."""
        g = self.gossip
        sends = g.leave(trio.current_time(), self.rng)
        told = 0
        with trio.move_on_after(timeout_s):
            while True:
                told += len(sends)
                async with trio.open_nursery() as n:
                    for s in sends:
                        n.start_soon(self.sender.send_now, s)
                if g.leave_settled or not sends:  # acknowledged, or nobody left to tell
                    break
                with trio.move_on_at(g.leave_deadline()):  # the next round, unless acknowledged first
                    await self._leave_acked.wait()
                sends = g.leave_tick(trio.current_time(), self.rng)
        lv = g.leaving_ack
        log.info("left the mesh (told %d peers; %s)", told,
                 f"acknowledged by {lv}" if lv else "no peer acknowledged: they may show this node as dead")

    def _log_notices(self) -> None:
        while self.gossip.notices:
            log.warning("%s", self.gossip.notices.popleft().text)
        self._log_member_changes()
        self._log_lateness()

    def _log_lateness(self) -> None:
        """A WARNING when this node missed its own gossip deadlines (a starved
        CPU): at most one per ``LATE_LOG_EVERY_S``, with the count since."""
        g = self.gossip
        late = g.stats.late_ticks
        before = 0 if self._late_logged is None else self._late_logged[1]
        if late == before:
            return
        now = trio.current_time()
        if self._late_logged is not None and now - self._late_logged[0] < LATE_LOG_EVERY_S:
            return
        self._late_logged = (now, late)
        log.warning("this node missed its own gossip deadlines %d time%s (its CPU is starved?): it gives peers "
                    "%dx longer before it declares them dead until it keeps time again", late - before,
                    "" if late - before == 1 else "s", 1 + g.lag)

    def _log_member_changes(self) -> None:
        """INFO lines for what an operator wants to know of the membership: a
        member joined, became suspect, dead or left, came back, restarted.
        Checked only when the member table's hash moved; bounded per call."""
        members = self.gossip.members
        h = members.members_hash()
        if h == self._members_logged_hash:
            return
        self._members_logged_hash = h
        now: dict[str, tuple[str, int]] = {}
        lines: list[str] = []
        for m in members:
            r = m.record
            if r.node_id == self.id:
                continue
            now[r.node_id] = (m.state.label, r.generation)
            before = self._member_states.get(r.node_id)
            if before is None:
                lines.append(f"member {r.node_id} joined ({r.address}, {m.state.label})")
            elif before[1] != r.generation:
                lines.append(f"member {r.node_id} restarted (generation {r.generation}, {m.state.label})")
            elif before[0] != m.state.label:
                what = {"alive": "is alive again", "left": "left the mesh"}.get(m.state.label, f"is {m.state.label}")
                lines.append(f"member {r.node_id} {what}")
        lines += [f"member {nid} forgotten" for nid in self._member_states.keys() - now.keys()]
        self._member_states = now
        for line in lines[:MEMBER_LINES_MAX]:
            log.info("%s", line)
        if len(lines) > MEMBER_LINES_MAX:
            log.info("... and %d more member changes", len(lines) - MEMBER_LINES_MAX)

    def _note_bad_peer(self, remote: str, e: Exception) -> None:
        self.bad_messages += 1
        if not self._log_once((remote.rsplit(":", 1)[0], type(e).__name__)):
            return
        if isinstance(e, WrongCluster):
            log.warning("refused a node of another cluster at %s: %s", remote, e)
        elif isinstance(e, WrongVersion):
            log.warning("refused a peer at %s that speaks another protocol: %s", remote, e)
        else:
            log.warning("dropped a bad message from %s: %s", remote, e)

    def statistics(self) -> dict[str, Any]:
        g = self.gossip
        s = g.stats
        return {
            "bad_messages": self.bad_messages,
            "messages_in": s.messages_in,
            "messages_out": s.messages_out,
            "suspicions_raised": s.suspicions_raised,
            "deaths_declared": s.deaths_declared,
            "refutations": s.refutations,
            "identity_conflicts": s.identity_conflicts,
            "generation_moves": s.generation_moves,
            "future_generations_dropped": s.future_generations_dropped,
            "gossip_rounds": s.gossip_rounds,
            "late_ticks": s.late_ticks,
            "lag": g.lag,
            "gossip_received_bytes": self.received_bytes,
            "gossip_sent_bytes": self.sender.stats["bytes"],
            "catalog_nodes": len(g.catalog.nodes),
            "catalog_keys": sum(len(st.keys) for st in g.catalog.nodes.values()),
            **{f"send_{k}": v for k, v in self.sender.stats.items()},
        }
