"""Transfers: building a copy on this node, whatever its source.

A transfer (``Transfer``) starts from a ``StartTransfer`` action, runs here
(this node is always the receiving end) and moves through its states
(``protocol.transfer.states``): queued until one of ``ACTIVE_MAX`` slots is
free, running, then done or failed; a stop puts a running one back to queued
and its intent (``Intents``) resumes it after the restart.  By its source:

* ``CopyOf``: another copy in the mesh, pulled chunk by chunk from every
  holder (``Puller``), or copied between this node's tiers;
* ``LocalPath``: a file or directory inside the ingest roots, hashed once;
* ``Web``: the hub or a URL, fetched once per mesh (``WebIngest``), or
  pulled from the node that fetched it.

Its progress is in the catalog (its ``xfer/<id>`` record) every second; the
copy is published (``copy/`` record) when complete, the registry learns
where an ingested model came from, and a move then deletes its source.
Whoever started one here waits for its end with ``wait``; the evictor asks
what the running ones write (``written``, ``active_partials``), and each makes
room on its tier first through the evictor's ``make_room``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from protocol import HLC
from protocol.actions import CopyOf, LocalPath, StartTransfer, Web, source_text
from protocol.keys import COPY_PREFIX, XFER_PREFIX, ErrorRecord, RecordError, XferRecord, xfer_key
from protocol.registry import METADATA_FILES_MAX, fit_metadata
from protocol.transfer import TransferStatus
from protocol.transfer.sources import source_manifest_hash

from ..errors import MeshError, first_mesh_error, only
from ..mesh import Mesh, wall_ms
from ..registry import Registry
from ..saver import Saver
from .catalog import CopyCatalog, one_content
from .ingest import WebIngest
from .intents import Intents
from .puller import (
    NO_SOURCE_GRACE_S,
    MakeRoom,
    Puller,
    TransferError,
    named_source,
    no_eviction,
    resumed_chunks,
)
from .sources.common import safe_url
from .sources.guard import confine_path
from .store import Copy, Store, StoreError, tree_bytes
from .transfer import Transfer

__all__ = ["ACTIVE_MAX", "TransferSettings", "Transfers"]

log = logging.getLogger("meshnode.transfers")

ACTIVE_MAX = 4
CANCEL_WAIT_S = 10.0  # DELETE /transfers/{id} waits this long for the transfer to stop and its partial to go
PROGRESS_INTERVAL_S = 1.0
FINISHED_KEPT = 50  # finished transfers whose records stay in the catalog
HISTORY_MAX = 1000  # transfers this node remembers, finished ones dropped first


@dataclass(frozen=True)
class TransferSettings:
    intents_dir: Path
    chunk_stall_s: float
    ingest_roots: tuple[Path, ...]
    allow_private_sources: bool
    settle_s: float  # how long a claim waits for concurrent claims (a few gossip rounds)
    s3_endpoint: str | None = None  # --s3-endpoint-url: an s3:// source's endpoint unless its URL names one


DeleteSource = Callable[[str, str], Awaitable[object]]  # (model, "node:kind"): a move's last step


class Transfers:
    """The transfers this node runs."""

    def __init__(
        self,
        mesh: Mesh,
        store: Store,
        puller: Puller,
        copies: CopyCatalog,
        saver: Saver,
        registry: Registry,
        hlc: HLC,
        settings: TransferSettings,
        delete_source: DeleteSource,
        make_room: MakeRoom = no_eviction,
    ) -> None:
        self.mesh = mesh
        self.store = store
        self.puller = puller
        self.copies = copies
        self.saver = saver
        self.registry = registry
        self.settings = settings
        self.delete_source = delete_source
        self.intents = Intents(settings.intents_dir)
        self.make_room = make_room  # room on a tier before a transfer writes into it (the evictor's)
        self.web = WebIngest(mesh, hlc, store, puller, self.publish, settle_s=settings.settle_s,
                             allow_private=settings.allow_private_sources, s3_endpoint=settings.s3_endpoint)
        self.web.make_room = make_room
        self.by_id: dict[str, Transfer] = {}
        self._limiter = trio.CapacityLimiter(ACTIVE_MAX)
        self._nursery: trio.Nursery | None = None
        self._scopes: dict[str, trio.CancelScope] = {}  # transfer id -> its task's scope, while it runs
        self._ended: dict[str, trio.Event] = {}  # transfer id -> set when its task ends (asked for by ``stop`` only)
        # transfer id -> set when it reaches a final state (asked for by ``wait`` only, for an active
        # transfer; dropped when set): at most one a transfer in ``by_id``.
        self._finished: dict[str, trio.Event] = {}

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        resumed = await trio.to_thread.run_sync(self.intents.load)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._forget_unfinished({t.id for t in resumed})
            for t in resumed:
                log.info("resuming transfer %s of %s to %s", t.id, t.model, t.kind)
                self._launch(t)
            task_status.started()
            await trio.sleep_forever()

    def _forget_unfinished(self, resumed: set[str]) -> None:
        """Our ``xfer/`` records saved as queued or running whose intent is gone
        (or unreadable) end as failed, so peers neither wait on their claim
        nor ask this node for chunks of a transfer that no longer runs."""
        for key, e in self.mesh.own_keys(XFER_PREFIX):
            if e.tombstone or key[len(XFER_PREFIX):] in resumed:
                continue
            try:
                rec = XferRecord.from_value(e.value)
            except RecordError:
                continue
            if rec.status.active:
                error = ErrorRecord("INTERRUPTED", "the node restarted with no record of this transfer to resume")
                failed = dataclasses.replace(rec, status=TransferStatus.FAILED, error=error, finished_ms=wall_ms())
                self.mesh.set(key, failed.to_value())

    def start(self, action: StartTransfer) -> Transfer:
        """Start (or join) a transfer of ``action.model`` into ``action.kind`` on this node."""
        self.store.tier_root(action.kind)  # raises for an unknown tier
        for t in self.by_id.values():
            if t.model == action.model and t.kind == action.kind and t.status.active:
                return t  # one transfer per target at a time: asking again joins it
        t = Transfer(action.model, action.kind, action.source, action.manifest_hash, action.keep_source)
        self.intents.save(t)
        self._launch(t)
        return t

    def _launch(self, t: Transfer) -> None:
        assert self._nursery is not None
        self.by_id[t.id] = t
        if len(self.by_id) > HISTORY_MAX:
            for old in [x for x in self.by_id.values() if x.status.finished][: HISTORY_MAX // 10]:
                del self.by_id[old.id]
        self._nursery.start_soon(self._run_one, t)

    def cancel(self, tid: str, why: str) -> bool:
        """Stop a transfer of this node: it fails with ``CANCELLED`` and its
        partial copy is removed.  False when there is no such active transfer."""
        t = self.by_id.get(tid)
        if t is None or not t.status.active:
            return False
        t.cancelled = why
        scope = self._scopes.get(tid)
        if scope is not None:
            scope.cancel()
        elif t.status is TransferStatus.QUEUED:  # waiting for a slot: it never starts
            t.fail("CANCELLED", why)
            t.finished_ms = wall_ms()
            self.intents.drop(t)
            self.publish(t)
        return True

    async def stop(self, tid: str, why: str) -> tuple[dict[str, Any], bool]:
        """``DELETE /transfers/{id}``: cancel a transfer this node runs
        (``cancel``) and wait, at most ``CANCEL_WAIT_S``, until it has stopped
        and its partial files are gone.  Its state, and whether it has ended.
        Asking again once it was cancelled answers the same; a transfer that
        ended otherwise is ``TRANSFER_FINISHED``, one another node runs
        ``WRONG_NODE`` (naming that node), an unknown id ``TRANSFER_NOT_FOUND``."""
        t = self.by_id.get(tid)
        if t is None:
            return self._stop_elsewhere(tid)
        if t.status.finished:
            if t.error is not None and t.error.code == "CANCELLED":
                return t.public(self.mesh.id), True
            raise MeshError("TRANSFER_FINISHED", f"transfer {tid} is already {t.status.value}: there is nothing to cancel")
        ended = self._ended.setdefault(tid, trio.Event())
        self.cancel(tid, why)
        if not t.status.finished:
            with trio.move_on_after(CANCEL_WAIT_S):
                await ended.wait()
        return t.public(self.mesh.id), t.status.finished

    async def wait(self, tid: str, timeout_s: float | None = None) -> Transfer:
        """Transfer ``tid`` of this node once it is done or failed (its ``error``
        says why).  ``TRANSFER_NOT_FOUND`` when this node runs no such transfer;
        ``trio.TooSlowError`` when ``timeout_s`` passes first."""
        t = self.by_id.get(tid)
        if t is None:
            raise MeshError("TRANSFER_NOT_FOUND", f"this node runs no transfer {tid[:40]!r}")
        if t.status.finished:
            await trio.lowlevel.checkpoint()
            return t
        with trio.fail_after(float("inf") if timeout_s is None else timeout_s):
            await self._finished.setdefault(tid, trio.Event()).wait()
        return t

    def written(self, model: str, kind: str) -> tuple[str, list[Path]] | None:
        """The active transfer of ``model`` to ``kind`` and the ``.partial``
        entries it writes into (what it has on the tier); None when none runs."""
        for t in self.by_id.values():
            if t.model == model and t.kind == kind and t.status.active:
                return t.id, [self.store.staging_dir(kind, n) for n in _partials(t)]
        return None

    def active_partials(self) -> set[str]:
        """The ``.partial`` entries of the transfers that are queued or running."""
        return {n for t in self.by_id.values() if t.status.active for n in _partials(t)}

    def runner_of(self, tid: str) -> str:
        """The node that runs transfer ``tid`` (this one, or as the catalog says)."""
        if tid in self.by_id:
            return self.mesh.id
        found = self.transfer_json(tid)
        if found is None:
            raise MeshError("TRANSFER_NOT_FOUND", f"no transfer {tid[:40]!r} is known")
        return str(found.get("node_id"))

    def _stop_elsewhere(self, tid: str) -> tuple[dict[str, Any], bool]:
        found = self.transfer_json(tid)
        if found is None:
            raise MeshError("TRANSFER_NOT_FOUND", f"no transfer {tid[:40]!r} is known")
        error = found.get("error")
        if found.get("status") in ("done", "failed"):
            if isinstance(error, dict) and error.get("code") == "CANCELLED":
                return found, True
            raise MeshError("TRANSFER_FINISHED", f"transfer {tid} is already {found.get('status')}: there is nothing to cancel")
        node = str(found.get("node_id"))
        m = self.mesh.member(node)
        where = f" --peer {m.record.address}" if m is not None and node != self.mesh.id else ""
        raise MeshError("WRONG_NODE", f"transfer {tid} runs on node {node}: only that node can cancel it "
                                      f"(meshnode transfer {tid} --cancel{where})")

    async def _run_one(self, t: Transfer) -> None:
        scope = trio.CancelScope()
        self._scopes[t.id] = scope
        try:
            with scope:
                await self._run_one_in(t)
        finally:
            self._scopes.pop(t.id, None)
        if t.cancelled and not t.status.finished:
            t.fail("CANCELLED", t.cancelled)
            log.info("transfer %s of %s cancelled: %s", t.id, t.model, t.cancelled)
            if t.manifest_hash is not None:
                await trio.to_thread.run_sync(self.store.discard_partial, t.kind, t.manifest_hash)
            # A web fetch's staging directory too (kept on a stop, for the resume).
            await trio.to_thread.run_sync(shutil.rmtree, self.store.staging_dir(t.kind, f"ingest-{t.id}"), True)
            t.finished_ms = wall_ms()
            self.intents.drop(t)
            self.publish(t)
        ended = self._ended.pop(t.id, None)  # ``stop`` waits for this (bounded: a stopping node never sets it)
        if ended is not None:
            ended.set()

    async def _run_one_in(self, t: Transfer) -> None:
        async with self._limiter:
            if t.cancelled:
                return
            t.move(TransferStatus.RUNNING)
            self.publish(t)
            src = source_text(t.source)
            log.info("transfer %s started: %s to %s:%s from %s", t.id, t.model, self.mesh.id, t.kind,
                     "any holder in the mesh" if src is None else safe_url(src) if "://" in src else src)
            begun = trio.current_time()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._progress, t)
                    await self._transfer(t)
                    nursery.cancel_scope.cancel()
                t.move(TransferStatus.DONE)
                took = max(trio.current_time() - begun, 1e-3)
                log.info("transfer %s done: %s on %s:%s, %.1f MB in %.1f s (%.1f MB/s; %d chunks fetched, %d resumed%s)",
                         t.id, t.model, self.mesh.id, t.kind, t.bytes_total / 1e6, took, t.bytes_total / 1e6 / took,
                         t.chunks_fetched, t.chunks_resumed, f"; from {', '.join(t.sources)}" if t.sources else "")
            except Exception as exc:
                e = first_mesh_error(exc)
                if e is not None:
                    t.fail(e.code, e.message)
                    log.error("transfer %s of %s failed: %s", t.id, t.model, e.message)
                else:  # a bug must not take the node down
                    t.fail("INTERNAL", f"{type(exc).__name__}: {exc}")
                    log.exception("transfer %s crashed", t.id)
            except BaseException as exc:
                if not only(exc, trio.Cancelled):
                    raise
                if not t.cancelled:
                    # The node is stopping: the intent stays, so the restart resumes it.
                    t.move(TransferStatus.QUEUED)
                    self.publish(t)
                raise
            t.finished_ms = wall_ms()
            self.intents.drop(t)
            self.publish(t)

    # -- progress in the catalog -------------------------------------------------------

    async def _progress(self, t: Transfer) -> None:
        """Every second while the transfer runs: its rate, and the news in the catalog."""
        prev, prev_t = t.bytes_done, trio.current_time()
        while True:
            await trio.sleep(max(PROGRESS_INTERVAL_S, t.progress_every_s))  # stretched in a large swarm
            now = trio.current_time()
            t.rate_bps = max(t.bytes_done - prev, 0) / max(now - prev_t, 1e-6)
            prev, prev_t = t.bytes_done, now
            self.publish(t)

    def publish(self, t: Transfer) -> None:
        self.mesh.set(xfer_key(t.id), t.record().to_value())
        if t.status.finished:
            ended = self._finished.pop(t.id, None)  # ``wait`` waits for this
            if ended is not None:
                ended.set()
            # Keep the news of the last FINISHED_KEPT finished transfers only.
            finished = []
            for k, e in self.mesh.own_keys(XFER_PREFIX):
                if e.tombstone:
                    continue
                try:
                    rec = XferRecord.from_value(e.value)
                except RecordError:
                    continue
                if rec.status.finished:
                    finished.append((rec.finished_ms, k))
            for _, k in sorted(finished)[:-FINISHED_KEPT]:
                self.mesh.delete(k)

    # -- the transfer itself -----------------------------------------------------------

    async def _transfer(self, t: Transfer) -> None:
        src = t.source
        if isinstance(src, LocalPath):
            await self._ingest_local(t, src.path)
            return
        if isinstance(src, Web):
            fetched = await self.web.ingest(t, src)
            if fetched is not None:
                await self._register_source(t, fetched)
                await self._after_publish(t, fetched)
                return
            self.intents.save(t)  # another node fetched it: pull its copy from the mesh
        if t.manifest_hash is None:
            device = src.device if isinstance(src, CopyOf) else None

            def lookup() -> str | None:
                return source_manifest_hash(self.mesh.items(COPY_PREFIX), t.model, device, self.mesh.id,
                                            self.mesh.reachable)

            t.manifest_hash = lookup()
            # The node that took the request may know of the copy before gossip told us.
            with trio.move_on_after(NO_SOURCE_GRACE_S):
                while t.manifest_hash is None:
                    await trio.sleep(0.1)
                    t.manifest_hash = lookup()
            if t.manifest_hash is None:
                raise TransferError("NO_SOURCE", f"{device or 'any live node'} holds no copy of {t.model!r}")
            self.intents.save(t)
        existing = self.store.get(t.model, t.kind)
        if existing is not None and existing.manifest_hash == t.manifest_hash:
            t.note = "already present"
            t.bytes_total = t.bytes_done = existing.manifest.total_bytes
            await self._after_publish(t, existing)
            return
        local = self.store.find(t.manifest_hash)
        named = named_source(t)
        if named is not None and named != self.mesh.id:
            local = None  # the source was named: it is used, not a copy of the same bytes here
        copy = await (self._copy_local(t, local) if local is not None else self.puller.pull(t))
        await self._after_publish(t, copy)

    async def _ingest_local(self, t: Transfer, path: str) -> None:
        """A local file or directory becomes a copy: hashed once, then the mesh moves it."""
        # Checked again here: a resumed ingest runs under today's roots.
        real = await trio.to_thread.run_sync(confine_path, path, self.settings.ingest_roots)
        before = self.store.get(t.model, t.kind)
        if before is None:  # room under the tier's high watermark first (the same files again need none)
            await self.make_room(t.kind, t.model, await trio.to_thread.run_sync(tree_bytes, real))

        check = one_content(self.mesh, t.model)

        def accept(manifest_hash: str) -> None:
            check(manifest_hash)
            t.manifest_hash = manifest_hash  # its partial: what the evictor measures as written

        def written(length: int) -> None:
            t.bytes_done += length

        copy = await trio.to_thread.run_sync(functools.partial(
            self.store.ingest_path, t.kind, t.model, real, accept=accept, on_chunk=written))
        t.manifest_hash = copy.manifest_hash
        t.bytes_total = t.bytes_done = copy.manifest.total_bytes
        t.chunks_total = t.chunks_fetched = copy.manifest.n_chunks
        if before is not None and before.manifest_hash == copy.manifest_hash:
            t.note, t.chunks_fetched = "already present: the files hold the same bytes", 0
        # The registry records what it is: where it came from and its files (the
        # copy's own record gives its size and hash).
        await self._register_source(t, copy)
        await self._after_publish(t, copy)

    async def _register_source(self, t: Transfer, copy: Copy) -> None:
        if self.registry.find(t.model) is not None:
            return
        meta = t.fetched or {}
        body: dict[str, Any] = {"source_url": source_text(t.source)}
        if isinstance(meta.get("model_type"), str):
            body["model_type"] = meta["model_type"][:64]
        files = [f.path for f in copy.manifest.files]
        metadata: dict[str, Any] = {"files": files[:METADATA_FILES_MAX], "file_count": len(files)}
        if isinstance(meta.get("revision"), str):
            metadata["revision"] = meta["revision"][:64]
            metadata["description"] = f"{source_text(t.source)} at {meta['revision']}"
        body["metadata"] = fit_metadata(metadata)  # within the size a registration may have
        await self.registry.register(t.model, body)  # only when unregistered: nothing replaced

    async def _after_publish(self, t: Transfer, copy: Copy) -> None:
        self.copies.publish(copy)
        await self.saver.persist_now()
        src = t.source
        if not t.keep_source and isinstance(src, CopyOf) and src.device is not None:
            try:
                await self.delete_source(t.model, src.device)
            except MeshError as e:  # the copy is here and published: the move did its part
                t.note = f"copied, but the source {src.device} was not deleted: {e.message}"
                log.warning("transfer %s: %s", t.id, t.note)

    async def _copy_local(self, t: Transfer, src: Copy) -> Copy:
        """Between tiers of this node: copy the bytes, verify every chunk, publish."""
        m = src.manifest
        t.bytes_total, t.chunks_total = m.total_bytes, m.n_chunks
        t.sources = [f"{self.mesh.id}:{src.kind}"]
        await self.make_room(t.kind, t.model, m.total_bytes)
        self.store.touch(src.model, src.kind)  # read: used

        def work() -> Copy:
            p = self.store.partial(t.kind, t.model, m)
            with p.discarded_on_error():
                have = resumed_chunks(p)
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

    # -- what the API shows ----------------------------------------------------------------

    def transfers_json(self) -> list[dict[str, Any]]:
        """Every transfer the catalog knows of; this node's from its live state."""
        out: dict[str, dict[str, Any]] = {}
        for nid, key, value in self.mesh.items(XFER_PREFIX):
            t = _from_catalog(nid, key, value)
            if t is not None:
                out[t["transfer_id"]] = t
        for local in self.by_id.values():
            out[local.id] = local.public(self.mesh.id)
        return sorted(out.values(), key=lambda x: (x.get("started_ms") or 0, x["transfer_id"]))

    def transfer_json(self, tid: str) -> dict[str, Any] | None:
        """One transfer: this node's from its live state, else the first
        catalog record with that key (ids are random: one node has it)."""
        local = self.by_id.get(tid)
        if local is not None:
            return local.public(self.mesh.id)
        for nid in self.mesh.origins():
            e = self.mesh.entry(nid, xfer_key(tid))
            if e is not None and not e.tombstone:
                found = _from_catalog(nid, xfer_key(tid), e.value)
                if found is not None:
                    return found
        return None


def _partials(t: Transfer) -> list[str]:
    """The ``.partial`` entries a transfer writes into: a web fetch's staging, then the copy's."""
    return [f"ingest-{t.id}"] + ([t.manifest_hash] if t.manifest_hash else [])


def _from_catalog(nid: str, key: str, value: Any) -> dict[str, Any] | None:
    try:
        rec = XferRecord.from_value(value)
    except RecordError:
        return None
    return {"transfer_id": key[len(XFER_PREFIX):], "node_id": nid, "target_device": f"{nid}:{rec.kind}",
            "model_name": rec.model, **rec.to_value()}
