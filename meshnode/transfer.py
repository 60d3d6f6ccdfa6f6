"""Transfers: building a copy on this node from the copies the mesh holds.

Data flow
---------
1. The copy's identity is its manifest hash.  The catalog says which nodes
   hold that hash complete (``copy/<model>@<kind>`` keys) and which are
   fetching it now (``xfer/<id>`` keys); their data-plane ports are in their
   ``node`` key.
2. The manifest is fetched from a holder over the peer HTTP route and checked
   against its hash.
3. A ``Partial`` is opened in the target tier; after a crash it re-verifies
   what is already there, so only missing or bad chunks are fetched again.
4. ``protocol.chunkplan.ChunkPlan`` decides which chunk to ask which peer for
   (random first, then rarest first, endgame, stall reassignment, bans); the
   data plane fetches each chunk into a reused buffer and verifies its xxh3
   digest *before* it is written.
5. When every chunk is verified: fsync, one rename (``Partial.publish``), a
   ``copy/`` key in the catalog.  For a move, the source is then deleted.

A transfer whose intent file is in ``<data-dir>/transfers`` is resumed when
the node restarts.  Every step has a bound: a few requests in flight per
peer, a stall timeout per chunk, a retry budget, and a clear final error.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import trio

from protocol.chunkplan import ChunkPlan, ChunkState, choose_sources
from protocol.errors import RemoteProtocolError
from protocol.keys import COPY_PREFIX
from protocol.manifest import Manifest

from .dataplane import ChunkMismatch, DataPlaneError, NotFound, PeerBusy
from .errors import MeshError, first_mesh_error
from .persist import atomic_write, make_dirs
from .service import METADATA_FILES_MAX
from .sources.guard import confine_path
from .store import Copy, Partial, StoreError

if TYPE_CHECKING:
    from .node import MeshNode

__all__ = ["Transfer", "TransferError", "Transfers", "xfer_key"]

log = logging.getLogger("meshnode.transfer")

XFER_PREFIX = "xfer/"
ACTIVE_MAX = 4
PROGRESS_INTERVAL_S = 1.0
SOURCE_REFRESH_S = 0.5
PER_PEER_INFLIGHT = 4  # requests in flight per source, for one receiver alone
# While other receivers pull the same copy (a swarm), one request at a time
# per source: each source's upload is shared by all of them, and a chunk is
# served on only once it is complete, so fewer chunks in flight at once means
# each completes (and can be passed on) sooner, and fewer are fetched twice.
SWARM_INFLIGHT = 1
NO_SOURCE_GRACE_S = 3.0
# A receiver pulls from at most this many holders at once (asking each
# partial one for its bitfield every SOURCE_REFRESH_S): in a larger swarm each
# receiver sees its own random slice, sticky while useful.
MAX_SOURCES = 24
FINISHED_KEPT = 50


def xfer_key(transfer_id: str) -> str:
    return XFER_PREFIX + transfer_id


class TransferError(MeshError):
    """A transfer could not be done (``NO_SOURCE``, ``SOURCE_CORRUPT``, ...)."""


@dataclass
class Transfer:
    id: str
    model: str
    kind: str  # target tier on this node
    source: str | None  # "node:kind" asked for, or None for any holder
    manifest_hash: str | None
    keep_source: bool = True
    status: str = "queued"  # queued, running, done, failed
    bytes_total: int = 0
    bytes_done: int = 0
    chunks_total: int = 0
    chunks_resumed: int = 0
    chunks_fetched: int = 0
    bad_chunks: int = 0
    rate_bps: float = 0.0
    sources: list[str] = field(default_factory=list)
    banned: list[str] = field(default_factory=list)
    error: dict[str, str] | None = None
    started_ms: int = 0
    finished_ms: int = 0
    note: str = ""
    options: dict[str, Any] = field(default_factory=dict)  # revision and file patterns of a web source
    source_id: str | None = None
    claim: list[Any] | None = None
    fetched: dict[str, Any] | None = None
    files_done: int = 0
    files_total: int = 0

    def public(self, node_id: str) -> dict[str, Any]:
        d = asdict(self)
        d["transfer_id"] = d.pop("id")
        d["node_id"] = node_id
        d["target_device"] = f"{node_id}:{self.kind}"
        return d


class Transfers:
    """The transfers this node runs (it is always the receiving end)."""

    def __init__(self, node: MeshNode) -> None:
        self.node = node
        self.dir = node.cfg.data_dir / "transfers"
        self.by_id: dict[str, Transfer] = {}
        self._partials: dict[str, tuple[Partial, ChunkPlan]] = {}
        self._limiter = trio.CapacityLimiter(ACTIVE_MAX)
        self._nursery: trio.Nursery | None = None

    # -- serving what we are building ---------------------------------------------------

    def locate(self, manifest_hash: str, index: int) -> tuple[str, int, int] | None:
        entry = self._partials.get(manifest_hash)
        if entry is None:
            return None
        partial, plan = entry
        if not 0 <= index < plan.n_chunks or plan.chunk_state(index) is not ChunkState.VERIFIED:
            return None
        return partial.locate(index)

    def have(self, manifest_hash: str) -> bytes | None:
        entry = self._partials.get(manifest_hash)
        if entry is None:
            return None
        _, plan = entry
        bits = bytearray(full_bitfield(plan.n_chunks))
        for i in plan.missing():
            bits[i // 8] &= ~(0x80 >> (i % 8)) & 0xFF
        return bytes(bits)

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        make_dirs(self.dir)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            resumed = self._load_intents()
            self._forget_unfinished({t.id for t in resumed})
            for t in resumed:
                log.info("resuming transfer %s of %s to %s", t.id, t.model, t.kind)
                self._launch(t)
            task_status.started()
            await trio.sleep_forever()

    def _load_intents(self) -> list[Transfer]:
        out = []
        for p in sorted(self.dir.glob("*.json")):
            try:
                t = Transfer(**json.loads(p.read_text()))
            except (OSError, ValueError, TypeError) as e:
                log.error("ignoring unreadable transfer intent %s: %s", p.name, e)
                p.unlink(missing_ok=True)
                continue
            t.status = "queued"
            t.chunks_fetched = t.bytes_done = 0  # counted afresh; resumed chunks are counted as such
            out.append(t)
        return out

    def _forget_unfinished(self, resumed: set[str]) -> None:
        """Our ``xfer/`` keys saved as queued or running whose intent is gone
        (or unreadable) end as failed, so peers neither wait on their claim
        nor ask this node for chunks of a transfer that no longer runs."""
        g = self.node.gossip
        if g is None:
            return
        now = trio.current_time()
        for key, e in list(g.catalog.own.keys.items()):
            v = e.value
            if not key.startswith(XFER_PREFIX) or e.tombstone or not isinstance(v, dict):
                continue
            if v.get("status") in ("queued", "running") and key[len(XFER_PREFIX):] not in resumed:
                error = {"code": "INTERRUPTED", "message": "the node restarted with no record of this transfer to resume"}
                g.set(key, {**v, "status": "failed", "error": error, "finished_ms": int(time.time() * 1000)}, now)

    def _save_intent(self, t: Transfer) -> None:
        atomic_write(self.dir / f"{t.id}.json", json.dumps(asdict(t)).encode(), durable=False)

    def _drop_intent(self, t: Transfer) -> None:
        (self.dir / f"{t.id}.json").unlink(missing_ok=True)

    def start(self, model: str, kind: str, source: str | None, manifest_hash: str | None, keep_source: bool,
              options: dict[str, Any] | None = None) -> Transfer:
        """Start (or join) a transfer of ``model`` into ``kind`` on this node."""
        self.node.store.tier_root(kind)  # raises for an unknown tier
        for t in self.by_id.values():
            if t.model == model and t.kind == kind and t.status in ("queued", "running"):
                return t  # one transfer per target at a time: asking again joins it
        t = Transfer(
            id=secrets.token_hex(8),
            model=model,
            kind=kind,
            source=source,
            manifest_hash=manifest_hash,
            keep_source=keep_source,
            started_ms=int(time.time() * 1000),
            options=options or {},
        )
        self._save_intent(t)
        self._launch(t)
        return t

    def _launch(self, t: Transfer) -> None:
        assert self._nursery is not None
        self.by_id[t.id] = t
        if len(self.by_id) > 1000:  # bound the history of finished transfers
            for old in [x for x in self.by_id.values() if x.status in ("done", "failed")][:100]:
                del self.by_id[old.id]
        self._nursery.start_soon(self._run_one, t)

    async def _run_one(self, t: Transfer) -> None:
        async with self._limiter:
            t.status = "running"
            self._publish_progress(t)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._progress, t)
                    await self._transfer(t)
                    nursery.cancel_scope.cancel()
                t.status = "done"
                log.info("transfer %s done: %s on %s:%s (%d chunks fetched, %d resumed)",
                         t.id, t.model, self.node.cfg.node_id, t.kind, t.chunks_fetched, t.chunks_resumed)
            except Exception as exc:
                e = first_mesh_error(exc)
                t.status = "failed"
                if e is not None:
                    t.error = {"code": e.code, "message": e.message}
                    log.error("transfer %s of %s failed: %s", t.id, t.model, e.message)
                else:  # a bug must not take the node down
                    t.error = {"code": "INTERNAL", "message": f"{type(exc).__name__}: {exc}"}
                    log.exception("transfer %s crashed", t.id)
            except BaseException as exc:
                if not _only_cancelled(exc):
                    raise
                # The node is stopping: the intent stays, so the restart resumes it.
                t.status = "queued"
                self._publish_progress(t)
                raise
            t.finished_ms = int(time.time() * 1000)
            self._drop_intent(t)
            self._publish_progress(t)

    # -- progress in the catalog -----------------------------------------------------------

    async def _progress(self, t: Transfer) -> None:
        """Every second while the transfer runs: its rate, and the news in the catalog."""
        prev, prev_t = t.bytes_done, trio.current_time()
        while True:
            await trio.sleep(PROGRESS_INTERVAL_S)
            now = trio.current_time()
            t.rate_bps = max(t.bytes_done - prev, 0) / max(now - prev_t, 1e-6)
            prev, prev_t = t.bytes_done, now
            self._publish_progress(t)

    def _publish_progress(self, t: Transfer) -> None:
        g = self.node.gossip
        if g is None:
            return
        value = {
            "model": t.model,
            "kind": t.kind,
            "manifest_hash": t.manifest_hash,
            "status": t.status,
            "bytes_done": t.bytes_done,
            "bytes_total": t.bytes_total,
            "rate_bps": round(t.rate_bps),
            "sources": t.sources[:16],
            "error": t.error,
            "started_ms": t.started_ms,
            "finished_ms": t.finished_ms,
            "note": t.note,
            "files_done": t.files_done,
            "files_total": t.files_total,
            "source_id": t.source_id,
            "claim": t.claim,
        }
        now = trio.current_time()
        g.set(xfer_key(t.id), value, now)
        if t.status in ("done", "failed"):
            # Keep the news of the last FINISHED_KEPT finished transfers only.
            finished = sorted(
                (e.value.get("finished_ms", 0), k)
                for k, e in g.catalog.own.keys.items()
                if k.startswith(XFER_PREFIX) and not e.tombstone and isinstance(e.value, dict)
                and e.value.get("status") in ("done", "failed")
            )
            for _, k in finished[:-FINISHED_KEPT]:
                g.delete(k, now)

    # -- sources ---------------------------------------------------------------------------------

    def holders(self, manifest_hash: str) -> dict[str, str]:
        """node id -> data-plane address of the live nodes that can serve this
        manifest: complete copies (any model name: the hash is the identity)
        and transfers in progress."""
        return self.holders_and_complete(manifest_hash)[0]

    def holders_and_complete(self, manifest_hash: str) -> tuple[dict[str, str], set[str]]:
        """``holders()``, and which of them hold the copy complete (one catalog pass each)."""
        g = self.node.gossip
        assert g is not None
        out: dict[str, str] = {}
        complete: set[str] = set()
        me = self.node.cfg.node_id
        for prefix, want_running in ((COPY_PREFIX, False), (XFER_PREFIX, True)):
            for nid, _key, value in g.catalog.items(prefix):
                if nid == me or nid in out or not isinstance(value, dict):
                    continue
                if value.get("manifest_hash") != manifest_hash:
                    continue
                if want_running and value.get("status") != "running":
                    continue
                addr = self.data_address(nid)
                if addr is not None:
                    out[nid] = addr
                    if not want_running:
                        complete.add(nid)
        return out, complete

    def data_address(self, node_id: str) -> str | None:
        g = self.node.gossip
        assert g is not None
        m = g.members.get(node_id)
        if m is None or not m.state.reachable:
            return None  # the plan copes with a suspect that does not answer
        info = g.catalog.get(node_id, "node")
        port = info.get("data_port") if isinstance(info, dict) else None
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            return None
        host = m.record.address.rsplit(":", 1)[0]
        return f"{host}:{port}"

    def source_manifest_hash(self, model: str, source: str | None) -> str | None:
        """The manifest hash of the copy to fetch: the named device's, or any holder's."""
        g = self.node.gossip
        assert g is not None
        votes: dict[str, tuple[int, int]] = {}  # hash -> (live holders, newest published_ms)
        for nid, key, value in g.catalog.items(COPY_PREFIX):
            if not isinstance(value, dict):
                continue
            name, _, kind = key[len(COPY_PREFIX):].rpartition("@")
            h = value.get("manifest_hash")
            if name != model or not isinstance(h, str):
                continue
            if source is not None:
                if f"{nid}:{kind}" == source:
                    return h
                continue
            m = g.members.get(nid)
            if nid == self.node.cfg.node_id or (m is not None and m.state.reachable):
                n, newest = votes.get(h, (0, 0))
                published = value.get("published_ms")
                votes[h] = (n + 1, max(newest, published if isinstance(published, int) else 0))
        # The copy most live nodes hold; among equals the newest.
        return max(votes, key=lambda h: votes[h]) if votes else None

    # -- the transfer itself ------------------------------------------------------------------

    async def _fetch_manifest(self, manifest_hash: str, holders: dict[str, str]) -> Manifest:
        g = self.node.gossip
        assert g is not None
        errors = []
        for nid in holders:
            m = g.members.get(nid)
            if m is None:
                continue
            url = f"{self.node.cfg.scheme}://{m.record.address}/mesh/v1/manifests/{manifest_hash}"
            assert self.node.peer_client is not None
            try:
                r = await self.node.peer_client.get(url)
                if r.status_code != 200:
                    errors.append(f"{nid}: HTTP {r.status_code}")
                    continue
                return Manifest.decode(r.content, expected_hash=manifest_hash)
            except (httpx.HTTPError, httpx.InvalidURL, OSError, RemoteProtocolError) as e:
                errors.append(f"{nid}: {type(e).__name__}: {e}"[:300])
        raise TransferError("NO_SOURCE", f"no live peer could send the manifest {manifest_hash[:12]}: {'; '.join(errors) or 'no holders'}")

    async def _transfer(self, t: Transfer) -> None:
        node = self.node
        store = node.store
        if t.source is not None and t.source.startswith("file://"):
            await self._ingest(t, t.source[len("file://"):])
            return
        if t.source is not None and t.source.startswith(("http://", "https://", "hf://")):
            from .ingest import ingest_web

            fetched = await ingest_web(self, t, t.source, t.options)
            if fetched is not None:
                await self._register_source(t, fetched)
                await self._after_publish(t, fetched)
                return
            self._save_intent(t)  # another node fetched it: pull its copy from the mesh
        if t.manifest_hash is None:
            t.manifest_hash = self.source_manifest_hash(t.model, t.source)
            if t.manifest_hash is None:
                where = t.source or "any live node"
                raise TransferError("NO_SOURCE", f"{where} holds no copy of {t.model!r}")
            self._save_intent(t)
        existing = store.get(t.model, t.kind)
        if existing is not None and existing.manifest_hash == t.manifest_hash:
            t.note = "already present"
            t.bytes_total = t.bytes_done = existing.manifest.total_bytes
            await self._after_publish(t, existing)
            return
        local = store.find(t.manifest_hash)
        if local is not None:
            copy = await self._copy_local(t, local)
        else:
            copy = await self._pull(t)
        await self._after_publish(t, copy)

    async def _ingest(self, t: Transfer, path: str) -> None:
        """A local file or directory becomes a copy: hashed once, then the mesh moves it."""
        node = self.node
        # Checked again here: a resumed ingest runs under today's roots.
        real = await trio.to_thread.run_sync(confine_path, path, node.cfg.ingest_roots)
        copy = await trio.to_thread.run_sync(node.store.ingest_path, t.kind, t.model, real)
        t.manifest_hash = copy.manifest_hash
        t.bytes_total = t.bytes_done = copy.manifest.total_bytes
        t.chunks_total = t.chunks_fetched = copy.manifest.n_chunks
        # The registry records what it is: where it came from and its files (the
        # copy's own key gives its size and hash).
        await self._register_source(t, copy)
        await self._after_publish(t, copy)

    async def _register_source(self, t: Transfer, copy: Copy) -> None:
        svc = self.node.service
        assert svc is not None
        if svc.index.get(t.model) is not None:
            return
        meta = t.fetched or {}
        body: dict[str, Any] = {"source_url": t.source}
        if isinstance(meta.get("model_type"), str):
            body["model_type"] = meta["model_type"][:64]
        files = [f.path for f in copy.manifest.files]
        metadata: dict[str, Any] = {"files": files[:METADATA_FILES_MAX], "file_count": len(files)}
        if isinstance(meta.get("revision"), str):
            metadata["revision"] = meta["revision"][:64]
            metadata["description"] = f"{t.source} at {meta['revision']}"
        body["metadata"] = metadata
        await self.node.commit(svc.register(t.model, body, self.node.clock()))

    async def _after_publish(self, t: Transfer, copy: Copy) -> None:
        self.node.publish_copy(copy)
        await self.node.persist_now()
        if not t.keep_source and t.source is not None:
            try:
                await self.node.delete_copy_anywhere(t.model, t.source)
            except MeshError as e:  # the copy is here and published: the move did its part
                t.note = f"copied, but the source {t.source} was not deleted: {e.message}"
                log.warning("transfer %s: %s", t.id, t.note)

    async def _copy_local(self, t: Transfer, src: Copy) -> Copy:
        """Between tiers of this node: copy the bytes, verify every chunk, publish."""
        m = src.manifest
        t.bytes_total, t.chunks_total = m.total_bytes, m.n_chunks
        t.sources = [f"{self.node.cfg.node_id}:{src.kind}"]

        def work() -> Copy:
            p = self.node.store.partial(t.kind, t.model, m)
            with p.discarded_on_error():
                have = _resumed_chunks(p)
                t.chunks_resumed = len(have)

                def done(length: int) -> None:
                    t.chunks_fetched += 1
                    t.bytes_done += length

                try:
                    p.fill_from({f.path: src.path / f.path for f in m.files}, have, done)
                except StoreError as e:
                    if e.code != "SOURCE_CHANGED":
                        raise
                    raise TransferError("SOURCE_CORRUPT", f"the local copy on {src.kind}: {e.message}") from None
                return p.publish()

        return await trio.to_thread.run_sync(work)

    async def _pull(self, t: Transfer) -> Copy:
        node = self.node
        assert t.manifest_hash is not None
        holders = self.holders(t.manifest_hash)
        # The node that took the request may have seen the copy before gossip told us.
        with trio.move_on_after(NO_SOURCE_GRACE_S):
            while not holders:
                await trio.sleep(0.1)
                holders = self.holders(t.manifest_hash)
        if not holders:
            raise TransferError("NO_SOURCE", self._no_source_message(t))
        manifest = await self._fetch_manifest(t.manifest_hash, holders)
        t.bytes_total, t.chunks_total = manifest.total_bytes, manifest.n_chunks
        partial = await trio.to_thread.run_sync(node.store.partial, t.kind, t.model, manifest)
        try:
            have = await trio.to_thread.run_sync(_resumed_chunks, partial)
            t.chunks_resumed = len(have)
            t.bytes_done = sum(manifest.chunk(i).length for i in have)
            plan = ChunkPlan(manifest.n_chunks, have, per_peer_inflight=PER_PEER_INFLIGHT, stall_timeout_s=node.cfg.chunk_stall_s)
            self._partials[t.manifest_hash] = (partial, plan)
            await self._pull_chunks(t, manifest, partial, plan)
            self._partials.pop(t.manifest_hash, None)
            return await trio.to_thread.run_sync(partial.publish)
        except BaseException as e:
            self._partials.pop(t.manifest_hash, None)
            if _only_cancelled(e):
                # The node is stopping: keep the verified chunks for the resume.
                partial.close()
            else:
                # A failed transfer leaves nothing behind and publishes nothing.
                await trio.to_thread.run_sync(partial.discard)
            raise

    def _no_source_message(self, t: Transfer) -> str:
        g = self.node.gossip
        assert g is not None
        holders = []
        for nid, _key, value in g.catalog.items(COPY_PREFIX):
            if isinstance(value, dict) and value.get("manifest_hash") == t.manifest_hash:
                m = g.members.get(nid)
                holders.append(f"{nid} ({m.state.label if m else 'unknown'})")
        if holders:
            return f"no live node can serve {t.model!r}: its holder(s) {', '.join(sorted(set(holders)))} cannot be reached"
        return f"no node holds a copy of {t.model!r} any more"

    async def _pull_chunks(self, t: Transfer, manifest: Manifest, partial: Partial, plan: ChunkPlan) -> None:
        node = self.node
        assert t.manifest_hash is not None
        mhash = t.manifest_hash
        client = node.data_client
        assert client is not None
        wake = trio.Event()
        fatal: list[BaseException] = []
        scopes: dict[tuple[str, int], trio.CancelScope] = {}
        addrs: dict[str, str] = {}
        last_source_seen = trio.current_time()
        buffers: list[bytearray] = []
        writing: set[int] = set()
        by_source: dict[str, int] = {}  # chunks each peer delivered, for the log

        def poke() -> None:
            nonlocal wake
            wake.set()

        async def fetch(peer: str, index: int, scope: trio.CancelScope) -> None:
            ref = manifest.chunk(index)
            buf = buffers.pop() if buffers else bytearray(manifest.chunk_bytes)
            try:
                with scope:
                    try:
                        data = await client.fetch_chunk(addrs[peer], mhash, index, ref.length, ref.digest, buf)
                    except ChunkMismatch:
                        t.bad_chunks += 1
                        banned = plan.on_bad(peer, index, trio.current_time())
                        log.warning("peer %s served a bad chunk %d of %s%s", peer, index, t.model,
                                    "; banned for this transfer" if banned else "")
                        if banned:
                            t.banned.append(peer)
                        return
                    except (NotFound, PeerBusy, DataPlaneError, KeyError) as e:
                        log.debug("chunk %d from %s failed: %s", index, peer, e)
                        plan.on_failed(peer, index, trio.current_time())
                        return
                    if index in writing or plan.chunk_state(index) is ChunkState.VERIFIED:
                        return  # an endgame twin got here first
                    writing.add(index)
                    try:
                        await trio.to_thread.run_sync(partial.write_chunk, index, data)
                    except StoreError as e:
                        fatal.append(e)
                        return
                    finally:
                        writing.discard(index)
                    redundant = plan.on_verified(peer, index, trio.current_time())
                    by_source[peer] = by_source.get(peer, 0) + 1
                    t.chunks_fetched += 1
                    t.bytes_done += ref.length
                    for key in redundant:
                        s = scopes.get(key)
                        if s is not None:
                            s.cancel()
                if scope.cancelled_caught and plan.chunk_state(index) is not ChunkState.VERIFIED:
                    plan.on_failed(peer, index, trio.current_time())
            finally:
                scopes.pop((peer, index), None)
                buffers.append(buf)
                poke()

        async def have(nid: str, addr: str, cap: int | None) -> None:
            try:
                with trio.fail_after(2):
                    bits = await client.have(addr, mhash)
                plan.set_source(nid, _bits(bits, manifest.n_chunks), inflight=cap)
            except (DataPlaneError, NotFound, PeerBusy, trio.TooSlowError):
                plan.remove_source(nid)

        me = node.cfg.node_id
        share: list[str] = [me]
        rng = node.rng

        async def refresh_sources() -> None:
            nonlocal last_source_seen, share
            while True:
                found, complete = self.holders_and_complete(mhash)
                useless = [nid for nid in plan.sources if nid not in complete and not plan.useful(nid)]
                chosen = choose_sources(found, complete, plan.sources, useless, MAX_SOURCES, rng)
                for nid in list(plan.sources):
                    if nid not in chosen:
                        for key in plan.remove_source(nid):  # its chunks go back to the pool
                            s = scopes.get(key)
                            if s is not None:
                                s.cancel()
                        addrs.pop(nid, None)
                pulling = sorted({me, *found} - complete)
                swarm = len(pulling) > 1
                async with trio.open_nursery() as asking:
                    for nid in chosen:
                        addr = found[nid]
                        addrs[nid] = addr
                        if nid in complete:
                            # One request at a time to a full holder until it has
                            # delivered a chunk (by then gossip tells whether other
                            # receivers share it), and while others do.
                            shared = swarm or not by_source.get(nid)
                            plan.set_source(nid, None, inflight=SWARM_INFLIGHT if shared else None)
                        else:
                            asking.start_soon(have, nid, addr, SWARM_INFLIGHT if swarm else None)
                # The nodes pulling this copy now each prefer their own share of
                # the chunks, so that a full holder they all ask uploads each
                # rare chunk about once, not once per receiver.
                if pulling != share:
                    share = pulling
                    plan.prefer(None if len(pulling) == 1 else _my_share(me, pulling, manifest.n_chunks))
                if found:
                    last_source_seen = trio.current_time()
                t.sources = sorted(chosen)
                poke()
                await trio.sleep(SOURCE_REFRESH_S)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(refresh_sources)
            while not plan.complete:
                if fatal:
                    raise fatal[0]
                now = trio.current_time()
                for peer, index in plan.expire(now):
                    s = scopes.get((peer, index))
                    if s is not None:
                        s.cancel()
                    log.info("chunk %d from %s stalled; asking another peer", index, peer)
                for peer, index in plan.next_requests(now, rng):
                    if peer not in addrs:
                        plan.on_failed(peer, index, now)
                        continue
                    scope = trio.CancelScope()
                    scopes[(peer, index)] = scope
                    nursery.start_soon(fetch, peer, index, scope)
                if not scopes and plan.stuck(now) and now - last_source_seen > NO_SOURCE_GRACE_S:
                    raise TransferError("NO_SOURCE", self._no_source_message(t))
                wake = trio.Event()
                deadline = plan.next_deadline()
                with trio.move_on_at(min(deadline if deadline is not None else math.inf, now + 0.5)):
                    await wake.wait()
            nursery.cancel_scope.cancel()
        t.rate_bps = 0.0
        log.info("transfer %s: chunks by source %s; plan %s", t.id, dict(sorted(by_source.items())), plan.statistics())


def _resumed_chunks(p: Partial) -> set[int]:
    """The verified chunks a partial left by an earlier run holds; a new one
    holds nothing (hashing its preallocated zeros costs a core-second per
    256 MiB)."""
    return p.verified_chunks() if p.resumed else set()


def _my_share(me: str, nodes: list[str], n_chunks: int) -> range:
    """The chunks ``me`` prefers when the nodes ``nodes`` (sorted) pull the
    same copy: every k-th, so the shares are disjoint and even."""
    return range(nodes.index(me), n_chunks, len(nodes))


def full_bitfield(n: int) -> bytes:
    """Every one of ``n`` chunks present; bit i is byte i // 8, mask 0x80 >> i % 8 (the data plane's order)."""
    bits = bytearray(b"\xff" * ((n + 7) // 8))
    if n % 8:
        bits[-1] = (0xFF << (8 - n % 8)) & 0xFF
    return bytes(bits)


def _bits(bitfield: bytes, n: int) -> set[int]:
    return {i for i in range(min(n, len(bitfield) * 8)) if bitfield[i // 8] & (0x80 >> (i % 8))}


def _only_cancelled(e: BaseException) -> bool:
    if isinstance(e, trio.Cancelled):
        return True
    if isinstance(e, BaseExceptionGroup):
        return all(_only_cancelled(x) for x in e.exceptions)
    return False
