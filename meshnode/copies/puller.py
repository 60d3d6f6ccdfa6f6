"""The puller: builds a copy on this node from the nodes that hold it.

Data flow
---------
1. ``protocol.transfer.sources.holders`` says which reachable nodes hold the
   manifest (whole copies, and transfers of it that are running); their
   data-plane addresses are in their ``node`` records.
2. The manifest is fetched from a holder over the peer route and checked
   against its hash.
3. A ``Partial`` is opened in the target tier; after a crash it re-verifies
   what is already there, so only missing or bad chunks are fetched again.
4. ``protocol.transfer.chunkplan.ChunkPlan`` decides which chunk to ask which
   holder for (random first, then rarest first, endgame, stall reassignment,
   bans); the data plane fetches each chunk into a reused buffer and verifies
   its xxh3 digest *before* it is written.
5. When every chunk is verified: fsync and one rename (``Partial.publish``).

Every ``SOURCE_REFRESH_S`` ``protocol.transfer.swarm.refresh`` picks the
holders to pull from: in a swarm, this node's neighbours in the graph every
node derives alike from the holders and their ``rack`` labels
(``protocol.transfer.neighbours``), a seed asked for this node's share
first.  Each partial neighbour is followed with ``HAVE_WAIT``: it answers
as soon as it holds something new, so nothing about chunks is gossiped to
every node.

While it pulls, this node serves its neighbours in turn (``locate``,
``have``, ``wait_have``): its verified chunks, and over plain TCP the
chunks still arriving (``arriving``: passed on as they arrive, their last
bytes once verified), so a swarm spreads a copy about as fast as one node
receives it.  Every step has a bound: a few requests in flight per holder,
a stall timeout per chunk (shorter when chunks come fast), a bounded set of
neighbours, a clear final error.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping

import trio

from protocol.actions import CopyOf
from protocol.errors import RemoteProtocolError
from protocol.keys import COPY_PREFIX, NODE_KEY, CopyRecord, NodeInfo, RecordError
from protocol.manifest import Manifest
from protocol.transfer.chunkplan import ChunkPlan, ChunkState
from protocol.transfer.sources import banned_reason, holders
from protocol.transfer.swarm import PER_PEER_INFLIGHT, STALL_FACTOR, progress_interval_s, refresh

from ..errors import MeshError, only
from ..mesh import Mesh
from ..peers import PeerClient, Recipient
from .dataplane import (
    Arriving,
    ChunkMismatch,
    DataClient,
    DataPlaneError,
    NotFound,
    PeerBusy,
    RequestRefused,
)
from .store import Copy, Partial, Store, StoreError
from .transfer import Transfer

__all__ = ["LocalChunks", "Puller", "TransferError", "full_bitfield"]

log = logging.getLogger("meshnode.transfers")

SOURCE_REFRESH_S = 0.5
NO_SOURCE_GRACE_S = 3.0
SEED_GRACE_S = 3.0  # complete holders found this soon after a transfer starts are its seeds (shares first)
HAVE_WAIT_S = 10.0  # a neighbour's HAVE_WAIT is renewed at least this often
FULL_VERSION = 0xFFFFFFFF  # a complete copy's HAVE_WAIT version: it never changes
_BITS = [bytes((b >> (7 - i)) & 1 for i in range(8)) for b in range(256)]  # a bitfield byte -> 8 chunk bytes
_DIGITS = b"0" + b"1" * 255  # a chunk mask byte -> an ASCII binary digit


MakeRoom = Callable[[str, str, int], Awaitable[None]]  # (tier, model, bytes): evict first, or NO_SPACE


async def no_eviction(kind: str, model: str, incoming: int) -> None:
    """Without an evictor: the store's own free-space check is all there is."""


class TransferError(MeshError):
    """A transfer could not be done (``NO_SOURCE``, ``SOURCE_CORRUPT``, ...)."""


class _Building:
    """A copy this node is building, as its neighbours see it: the verified
    chunks (the plan), the ones arriving now, and a version that moves
    whenever either changes (``wait_have``)."""

    def __init__(self, partial: Partial, plan: ChunkPlan) -> None:
        self.partial = partial
        self.plan = plan
        self.arriving: dict[int, Arriving] = {}
        self.version = 1
        self.changed = trio.Event()

    def bump(self) -> None:
        self.version = self.version % (FULL_VERSION - 1) + 1  # 1 .. FULL_VERSION - 1
        event, self.changed = self.changed, trio.Event()
        event.set()

    def bitfield(self) -> bytes:
        return self.plan.verified_bits(self.arriving)


class Puller:
    def __init__(
        self, mesh: Mesh, store: Store, data: DataClient, peers: PeerClient, chunk_stall_s: float, rng: random.Random,
        *, source_wait_s: float = 60.0, make_room: MakeRoom = no_eviction,
    ) -> None:
        self.mesh = mesh
        self.store = store
        self.data = data
        self.peers = peers
        self.chunk_stall_s = chunk_stall_s
        self.source_wait_s = source_wait_s  # a running transfer waits this long for holders to come back
        self.rng = rng
        self._partials: dict[str, _Building] = {}  # manifest hash -> what we are building
        self.make_room = make_room  # the evictor's: a transfer makes room before its first chunk
        # (holder, model, manifest hash, chunk) on a ban: the router tells the holder to read its copy again
        self.on_ban: Callable[[str, str, str, int], None] = lambda *_: None
        # Over every transfer since start (the metrics): chunks_verified, bad_chunks, peer_bans, chunk_stalls.
        self.totals: Counter[str] = Counter()

    # -- serving what we are building -------------------------------------------------

    def locate(self, manifest_hash: str, index: int) -> tuple[str, int, int] | None:
        entry = self._partials.get(manifest_hash)
        if entry is None:
            return None
        plan = entry.plan
        if not 0 <= index < plan.n_chunks or plan.chunk_state(index) is not ChunkState.VERIFIED:
            return None
        return entry.partial.locate(index)

    def have(self, manifest_hash: str) -> bytes | None:
        entry = self._partials.get(manifest_hash)
        return None if entry is None else entry.bitfield()

    def arriving(self, manifest_hash: str, index: int) -> Arriving | None:
        entry = self._partials.get(manifest_hash)
        return None if entry is None else entry.arriving.get(index)

    async def wait_have(self, manifest_hash: str, known: int, timeout_s: float) -> tuple[int, bytes] | None:
        """(version, bitfield) of what this node builds, once the version
        differs from ``known`` or after ``timeout_s``; None: not building it."""
        entry = self._partials.get(manifest_hash)
        if entry is None:
            return None
        if entry.version == known:
            with trio.move_on_after(timeout_s):
                await entry.changed.wait()
            entry = self._partials.get(manifest_hash, entry)
        return entry.version, entry.bitfield()

    # -- holders ----------------------------------------------------------------------------

    def holders(self, manifest_hash: str, named: str | None = None) -> tuple[dict[str, str], set[str]]:
        """node id -> data-plane address of the reachable nodes that can serve
        this manifest (only the ``named`` one, for a transfer whose source was
        named), and which of them hold it complete."""
        h = holders(self.mesh.items(), manifest_hash, self.mesh.id, self.mesh.reachable)
        found = {nid: addr for nid in h.nodes
                 if (named is None or nid == named) and (addr := self.mesh.data_address(nid)) is not None}
        return found, {nid for nid in h.complete if nid in found}

    def _no_source_message(self, t: Transfer, plan: ChunkPlan | None = None) -> str:
        """Why no holder serves ``t``: the ones its ``plan`` banned (and the
        chunk that failed its hash), then the ones that cannot be reached."""
        banned = plan.banned if plan is not None else frozenset()
        held = []
        for nid, _key, value in self.mesh.items(COPY_PREFIX):
            try:
                if CopyRecord.from_value(value).manifest_hash != t.manifest_hash:
                    continue
            except RecordError:
                continue
            if nid in banned:
                continue
            state = self.mesh.state_of(nid)
            held.append(f"{nid} ({state.label if state else 'unknown'})")
        unreachable = f"its holder(s) {', '.join(sorted(set(held)))} cannot be reached" if held else ""
        if plan is not None and banned:
            why = banned_reason({nid: plan.bad_chunk(nid) for nid in banned})
            return f"no holder can serve {t.model!r}: {why}{'; ' + unreachable if unreachable else ''}"
        if held:
            return f"no live node can serve {t.model!r}: {unreachable}"
        return f"no node holds a copy of {t.model!r} any more"

    async def _fetch_manifest(self, manifest_hash: str, found: dict[str, str]) -> Manifest:
        errors = []
        for nid in found:
            m = self.mesh.member(nid)
            if m is None:
                continue
            try:
                data = await self.peers.get_manifest(m.record.address, manifest_hash,
                                                     to=Recipient(nid, m.record.generation))
                return Manifest.decode(data, expected_hash=manifest_hash)
            except (MeshError, RemoteProtocolError) as e:
                errors.append(f"{nid}: {e}"[:300])
        raise TransferError("NO_SOURCE", f"no live peer could send the manifest {manifest_hash[:12]}: {'; '.join(errors) or 'no holders'}")

    # -- pulling ----------------------------------------------------------------------------

    async def pull(self, t: Transfer) -> Copy:
        """Fetch ``t.manifest_hash`` from its holders into ``t.kind``; the published copy."""
        assert t.manifest_hash is not None
        named = named_source(t)
        found, _ = self.holders(t.manifest_hash, named)
        # The node that took the request may have seen the copy before gossip told us.
        with trio.move_on_after(NO_SOURCE_GRACE_S):
            while not found:
                await trio.sleep(0.1)
                found, _ = self.holders(t.manifest_hash, named)
        if not found:
            if named is not None:
                state = self.mesh.state_of(named)
                raise TransferError("NO_SOURCE", f"the named source {named} cannot serve {t.model!r} "
                                                 f"({state.label if state else 'unknown to this node'}); "
                                                 "leave the source out to pull from any holder")
            raise TransferError("NO_SOURCE", self._no_source_message(t))
        manifest = await self._fetch_manifest(t.manifest_hash, found)
        t.bytes_total, t.chunks_total = manifest.total_bytes, manifest.n_chunks
        await self.make_room(t.kind, t.model, manifest.total_bytes)
        partial = await trio.to_thread.run_sync(self.store.partial, t.kind, t.model, manifest)
        try:
            have = await trio.to_thread.run_sync(resumed_chunks, partial)
            t.chunks_resumed = len(have)
            t.bytes_done = sum(manifest.chunk(i).length for i in have)
            plan = ChunkPlan(manifest.n_chunks, have, per_peer_inflight=PER_PEER_INFLIGHT,
                             stall_timeout_s=self.chunk_stall_s, stall_factor=STALL_FACTOR)
            building = self._partials[t.manifest_hash] = _Building(partial, plan)
            await _ChunkPull(self, t, manifest, building).run()
            self._forget(t.manifest_hash)
            return await trio.to_thread.run_sync(partial.publish)
        except BaseException as e:
            self._forget(t.manifest_hash)
            if only(e, trio.Cancelled):
                # The node is stopping: keep the verified chunks for the resume.
                partial.close()
            else:
                # A failed transfer leaves nothing behind and publishes nothing.
                await trio.to_thread.run_sync(partial.discard)
            raise

    def _forget(self, manifest_hash: str) -> None:
        entry = self._partials.pop(manifest_hash, None)
        if entry is not None:
            entry.bump()  # its neighbours' HAVE_WAITs return: ask again (the store has it, or nobody)

    def _racks(self, nodes: Mapping[str, str]) -> dict[str, str]:
        """node id -> its ``rack`` label, for these nodes and this one (``--labels rack=...``)."""
        out = {}
        for nid in (*nodes, self.mesh.id):
            try:
                rack = NodeInfo.from_value(self.mesh.get(nid, NODE_KEY)).labels.get("rack")
            except RecordError:
                continue
            if rack:
                out[nid] = rack
        return out


class _ChunkPull:
    """One transfer's pull of its chunks (``Puller.pull``, once its partial is
    open): the fetches, each verified then written back (``fetch``); the
    source round every ``SOURCE_REFRESH_S`` (``refresh_sources``); the partial
    neighbours followed (``follow``, ``learn``); and the loop that asks the
    plan what to fetch next (``run``)."""

    def __init__(self, puller: Puller, t: Transfer, manifest: Manifest, building: _Building) -> None:
        assert t.manifest_hash is not None
        self.puller = puller
        self.t = t
        self.manifest = manifest
        self.building = building
        self.mhash = t.manifest_hash
        self.partial, self.plan = building.partial, building.plan
        self.named = named_source(t)
        self.client = puller.data
        self.cut_through = not self.client.tls  # chunks still arriving are passed on (plain TCP only)
        self.rng = puller.rng
        self.started = trio.current_time()
        self.seeds: set[str] = set()  # complete holders found at the start: each is asked for this node's share first
        self.following: dict[str, trio.CancelScope] = {}  # partial neighbour -> its HAVE_WAIT task
        self.caps: dict[str, int | None] = {}  # partial neighbour -> its in-flight cap
        self.allowed: dict[str, bytes | None] = {}  # partial neighbour -> the chunks it may be asked for
        self.told: dict[str, bytes] = {}  # partial neighbour -> the chunk mask it last sent
        self.wake = trio.Event()
        self.fatal: list[BaseException] = []
        self.scopes: dict[tuple[str, int], trio.CancelScope] = {}
        self.addrs: dict[str, str] = {}
        self.last_source_seen = trio.current_time()  # when a holder that may serve (none banned) was last found
        self.banned_found: frozenset[str] = frozenset()  # holders found in the last round that the plan banned
        self.buffers: list[bytearray] = []
        self.writing: set[int] = set()
        self.by_source: dict[str, int] = {}  # chunks each peer delivered, for the log
        self.pulling: tuple[str, ...] = (puller.mesh.id,)

    def poke(self) -> None:
        self.wake.set()

    def _cancel(self, key: tuple[str, int]) -> None:
        s = self.scopes.get(key)
        if s is not None:
            s.cancel()

    # -- one chunk ------------------------------------------------------------------------

    async def fetch(self, peer: str, index: int, scope: trio.CancelScope) -> None:
        building, plan = self.building, self.plan
        ref = self.manifest.chunk(index)
        buf = self.buffers.pop() if self.buffers else bytearray(self.manifest.chunk_bytes)
        arriving = None
        # Its neighbours hear of it now, unless it comes from a source held back
        # for lagging: a chunk arriving slowly would be passed on as slowly
        # (sim/swarm.py models the same rule).
        if self.cut_through and index not in building.arriving and peer not in plan.held_back:
            arriving = building.arriving[index] = Arriving(buf, ref.length)
            building.bump()
        try:
            with scope:
                data = await self._receive(peer, index, buf, arriving)
                if data is not None:
                    await self._write_back(peer, index, data, arriving)
            if scope.cancelled_caught and plan.chunk_state(index) is not ChunkState.VERIFIED:
                plan.on_failed(peer, index, trio.current_time())
        finally:
            self.scopes.pop((peer, index), None)
            if arriving is not None:
                if arriving.ok is None:
                    arriving.done(False)  # its passing on stops short of a whole chunk
                if building.arriving.get(index) is arriving:
                    del building.arriving[index]
                    building.bump()
            if arriving is None or not arriving.readers:
                self.buffers.append(buf)  # else still being passed on from: left to the collector
            self.poke()

    async def _receive(self, peer: str, index: int, buf: bytearray, arriving: Arriving | None) -> memoryview | None:
        """Chunk ``index`` from ``peer``, its digest checked; None when it
        failed (the plan has heard, and a peer that served it bad may be banned)."""
        t, plan, puller = self.t, self.plan, self.puller
        ref = self.manifest.chunk(index)
        try:
            return await self.client.fetch_chunk(self.addrs[peer], self.mhash, index, ref.length, ref.digest, buf,
                                                 progress=None if arriving is None else arriving.progress)
        except ChunkMismatch:
            t.bad_chunks += 1
            puller.totals["bad_chunks"] += 1
            banned = plan.on_bad(peer, index, trio.current_time())
            log.warning("peer %s served a bad chunk %d of %s%s", peer, index, t.model,
                        "; banned for this transfer" if banned else "")
            if banned and peer not in t.banned:
                t.banned.append(peer)
                puller.totals["peer_bans"] += 1
                puller.on_ban(peer, t.model, self.mhash, index)  # the holder re-verifies its copy
                for (p, i), other in list(self.scopes.items()):  # its other requests: released by the plan
                    if p == peer and i != index:
                        other.cancel()
            return None
        except (NotFound, PeerBusy, DataPlaneError, KeyError) as e:
            log.debug("chunk %d from %s failed: %s", index, peer, e)
            plan.on_failed(peer, index, trio.current_time())
            return None

    async def _write_back(self, peer: str, index: int, data: memoryview, arriving: Arriving | None) -> None:
        """A verified chunk into the partial, unless an endgame twin got there first."""
        t, plan = self.t, self.plan
        if index in self.writing or plan.chunk_state(index) is ChunkState.VERIFIED:
            return  # an endgame twin got here first
        if arriving is not None:
            arriving.done(True)  # verified: its last bytes may go on
        self.writing.add(index)
        try:
            await trio.to_thread.run_sync(self.partial.write_chunk, index, data)
        except StoreError as e:
            self.fatal.append(e)
            return
        finally:
            self.writing.discard(index)
        redundant = plan.on_verified(peer, index, trio.current_time())
        self.building.bump()
        self.by_source[peer] = self.by_source.get(peer, 0) + 1
        t.chunks_fetched += 1
        self.puller.totals["chunks_verified"] += 1
        t.bytes_done += self.manifest.chunk(index).length
        for key in redundant:
            self._cancel(key)

    # -- the sources ----------------------------------------------------------------------

    def learn(self, nid: str, bits: bytes) -> None:
        """A partial neighbour told what it holds: its chunks this node may ask it for."""
        n = self.manifest.n_chunks
        mask = bitfield_mask(bits, n)
        self.told[nid] = mask
        edge = self.allowed.get(nid)
        if edge is not None:
            mask = (int.from_bytes(mask, "little") & int.from_bytes(edge, "little")).to_bytes(n, "little")
        self.plan.set_source_mask(nid, mask, inflight=self.caps.get(nid))
        self.poke()

    async def follow(self, nid: str, scope: trio.CancelScope) -> None:
        """Hear from a partial neighbour whenever it holds something new
        (HAVE_WAIT); from one that predates it, ask every round (HAVE)."""
        client, mhash = self.client, self.mhash
        known, polling = 0, False
        with scope:
            while True:
                addr = self.addrs.get(nid)
                if addr is None:
                    return
                try:
                    if polling:
                        with trio.fail_after(2):
                            bits = await client.have(addr, mhash)
                    else:
                        with trio.fail_after(HAVE_WAIT_S + 10):
                            known, bits = await client.have_wait(addr, mhash, known, HAVE_WAIT_S)
                except RequestRefused:
                    polling = True  # an older node: no HAVE_WAIT
                    continue
                except (DataPlaneError, trio.TooSlowError) as e:  # gone, or done (its copy is complete now)
                    log.debug("no news of %s from %s: %s", mhash[:12], nid, e)
                    await trio.sleep(SOURCE_REFRESH_S)
                    continue
                if nid in self.following:
                    self.learn(nid, bits)
                if polling:
                    await trio.sleep(SOURCE_REFRESH_S)

    async def refresh_sources(self, nursery: trio.Nursery) -> None:
        """Every ``SOURCE_REFRESH_S``: the holders to pull from, and the partial ones to follow."""
        t, plan, puller, mhash = self.t, self.plan, self.puller, self.mhash
        addrs, following, told, allowed, caps = self.addrs, self.following, self.told, self.allowed, self.caps
        while True:
            found, complete = puller.holders(mhash, self.named)
            if trio.current_time() - self.started <= SEED_GRACE_S:
                self.seeds.update(complete)  # copies older than this transfer: their shares first
            r = refresh(plan, found, complete, puller.mesh.id, lambda nid: bool(self.by_source.get(nid)), self.pulling,
                        self.rng, racks=puller._racks(found), key=mhash, seeds=self.seeds)
            self.pulling = r.pulling
            t.progress_every_s = progress_interval_s(len(self.pulling))
            for key in r.cancel:  # the dropped sources' chunks go back to the pool
                self._cancel(key)
            for nid in list(addrs):
                if nid not in r.chosen:
                    addrs.pop(nid)
            for nid in r.chosen:
                addrs[nid] = found[nid]
            for nid in list(following):
                if nid not in r.ask:
                    following.pop(nid).cancel()
                    told.pop(nid, None)
            for nid, cap in r.ask.items():
                edge_changed = allowed.get(nid) != r.allowed.get(nid) or caps.get(nid) != cap
                caps[nid], allowed[nid] = cap, r.allowed.get(nid)
                if nid not in following:
                    following[nid] = trio.CancelScope()
                    nursery.start_soon(self.follow, nid, following[nid])
                elif edge_changed and nid in told:
                    self.learn(nid, bitfield_of_mask(told[nid]))
            if r.usable:  # a banned holder is listed, but it is no source
                self.last_source_seen = trio.current_time()
            self.banned_found = r.banned
            t.sources = sorted(r.chosen)
            self.poke()
            await trio.sleep(SOURCE_REFRESH_S)

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Every chunk verified and written, or the transfer's error."""
        t, plan, puller = self.t, self.plan, self.puller
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.refresh_sources, nursery)
            while not plan.complete:
                if self.fatal:
                    raise self.fatal[0]
                now = trio.current_time()
                for peer, index in plan.expire(now):
                    self._cancel((peer, index))
                    puller.totals["chunk_stalls"] += 1
                    log.info("chunk %d from %s stalled; asking another peer", index, peer)
                for peer, index in plan.next_requests(now, self.rng):
                    if peer not in self.addrs:
                        plan.on_failed(peer, index, now)
                        continue
                    scope = trio.CancelScope()
                    self.scopes[(peer, index)] = scope
                    nursery.start_soon(self.fetch, peer, index, scope)
                if not self.scopes and plan.stuck(now):
                    # No holder can be reached (a partition, a restart): the verified chunks
                    # stay, and the transfer goes on when one is back, or fails at the bound.
                    if now - self.last_source_seen > puller.source_wait_s:
                        raise TransferError("NO_SOURCE", puller._no_source_message(t, plan))
                    if self.banned_found:  # say why at once: the catalog lists holders, but not one may serve
                        why = banned_reason({nid: plan.bad_chunk(nid) for nid in self.banned_found})
                        t.note = f"waiting for a holder: {why} (up to {puller.source_wait_s:g} s)"
                    elif now - self.last_source_seen > NO_SOURCE_GRACE_S:
                        t.note = f"waiting for a holder to come back (up to {puller.source_wait_s:g} s)"
                elif t.note.startswith("waiting for a holder"):
                    t.note = ""
                self.wake = trio.Event()
                deadline = plan.next_deadline()
                with trio.move_on_at(min(deadline if deadline is not None else math.inf, now + 0.5)):
                    await self.wake.wait()
            nursery.cancel_scope.cancel()
        t.rate_bps = 0.0
        log.info("transfer %s: chunks by source %s; plan %s", t.id, dict(sorted(self.by_source.items())),
                 plan.statistics())


class LocalChunks:
    """What the data plane serves: verified chunks of the copies in the store,
    and of the copies this node is still building."""

    def __init__(self, store: Store, puller: Puller) -> None:
        self.store = store
        self.puller = puller

    def locate(self, manifest_hash: str, index: int) -> tuple[str, int, int] | None:
        return self.store.locate(manifest_hash, index) or self.puller.locate(manifest_hash, index)

    def have(self, manifest_hash: str) -> bytes | None:
        c = self.store.find(manifest_hash)
        if c is not None:
            return full_bitfield(c.manifest.n_chunks)
        return self.puller.have(manifest_hash)

    async def wait_have(self, manifest_hash: str, known: int, timeout_s: float) -> tuple[int, bytes] | None:
        """A neighbour's HAVE_WAIT: what this node holds of the manifest once
        it differs from the version the neighbour knows (``FULL_VERSION`` for
        a complete copy, which never changes)."""
        c = self.store.find(manifest_hash)
        if c is not None:
            if known == FULL_VERSION:
                await trio.sleep(timeout_s)
            return FULL_VERSION, full_bitfield(c.manifest.n_chunks)
        return await self.puller.wait_have(manifest_hash, known, timeout_s)

    def arriving(self, manifest_hash: str, index: int) -> Arriving | None:
        return self.puller.arriving(manifest_hash, index)


def resumed_chunks(p: Partial) -> set[int]:
    """The verified chunks a partial left by an earlier run holds; a new one
    holds nothing (hashing its preallocated zeros costs a core-second per
    256 MiB)."""
    return p.verified_chunks() if p.resumed else set()


def named_source(t: Transfer) -> str | None:
    """The node a transfer was told to copy from, if it was told: then only it is asked."""
    src = t.source
    if isinstance(src, CopyOf) and src.device is not None:
        return src.device.split(":", 1)[0]
    return None


def full_bitfield(n: int) -> bytes:
    """Every one of ``n`` chunks present; bit i is byte i // 8, mask 0x80 >> i % 8 (the data plane's order)."""
    bits = bytearray(b"\xff" * ((n + 7) // 8))
    if n % 8:
        bits[-1] = (0xFF << (8 - n % 8)) & 0xFF
    return bytes(bits)


def bits_of(bitfield: bytes, n: int) -> set[int]:
    return {i for i in range(min(n, len(bitfield) * 8)) if bitfield[i // 8] & (0x80 >> (i % 8))}


def bitfield_mask(bitfield: bytes, n: int) -> bytes:
    """A HAVE bitfield (bit i, MSB first) as a chunk mask (byte i is 1 when chunk i is held); O(n) in C."""
    mask = b"".join(_BITS[b] for b in bitfield[: (n + 7) // 8])[:n]
    return mask + bytes(n - len(mask))


def bitfield_of_mask(mask: bytes) -> bytes:
    """The inverse of ``bitfield_mask``."""
    digits = bytes(mask).translate(_DIGITS) + b"0" * (-len(mask) % 8)
    return int(digits, 2).to_bytes(len(digits) // 8, "big") if digits else b""
