"""Bundles, import: a bundle read into a tier (its reader: ``protocol.bundle``).

Import (``POST /bundles?to=NODE:TIER``) feeds the request's body, as it
arrives, to the bundle's parser.  Before a byte is written it refuses
what must be refused: a model whose registration or copies in the mesh say
other bytes (``CONTENT_CONFLICT``), a tier without room (``NO_SPACE``,
after eviction), a copy another import or a transfer is writing
(``IN_PROGRESS``).  Every chunk is checked against its manifest before it
is written, every file against its sha256 once its bytes are in; a
mismatch, or bytes that are not a bundle, fail ``BAD_CONTENT`` and nothing
is kept.  Each model is built in the tier's ``.partial`` like a transfer's
copy and published (one rename) only when the whole bundle verified; then
it is registered (when it was not) and its copy record gossiped, and the
mesh moves it from there like any copy.  A bundle that stops early
(``INCOMPLETE``) or a client that goes away keeps the verified chunks: the
same bundle imported again skips writing them (``chunks_resumed``).

Everything that blocks (files, hashing) runs in worker threads.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Container
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from protocol.bundle import (
    BadBundle,
    BundleHeader,
    BundleModel,
    BundleParser,
    BundleTruncated,
    Chunk,
    End,
    Event,
    Header,
    Sums,
)
from protocol.digest import is_digest, tree_digest
from protocol.manifest import chunk_digest

from ..copies.catalog import CopyCatalog, one_content
from ..copies.puller import MakeRoom, no_eviction, resumed_chunks
from ..copies.store import Copy, Partial, Store
from ..errors import MeshError, first_of, only
from ..mesh import Mesh
from ..registry import Registry
from ..saver import Saver

__all__ = ["IMPORTS_MAX", "ClientGone", "Imports"]

log = logging.getLogger("meshnode.bundles")

IMPORTS_MAX = 4  # imports running at once on a node
# Written bytes whose writeback starts while the import goes on: the fsync at publish then waits
# for little more than the last of them, not for the whole copy.
WRITEBACK_BYTES = 64 * 1024 * 1024
IMPORT_QUEUE_BYTES = 16 * 1024 * 1024
BATCH_BYTES = 8 * 1024 * 1024  # chunks verified and written in one worker thread's call  # chunks received ahead of the one being verified and written (at least one)


class ClientGone(Exception):
    """The client went away before its request's body was all sent."""


@dataclass
class _Incoming:
    """One model of a bundle being imported."""

    model: BundleModel
    present: Copy | None  # the same copy is on the tier already: verified, not written
    already: bool = False
    partial: Partial | None = None
    have: set[int] = field(default_factory=set)
    hashers: dict[str, Any] = field(default_factory=dict)
    sums: dict[str, str] | None = None
    chunks_written: int = 0


@dataclass(eq=False)
class _Import:
    kind: str
    models: list[_Incoming] = field(default_factory=list)
    bytes_in: int = 0
    keep: bool = False  # it stopped early: its verified chunks stay for the next try
    unflushed: int = 0  # bytes written since the last early writeback was asked
    flush: trio.MemorySendChannel[Path] | None = None
    claimed: set[str] = field(default_factory=set)  # the manifests it writes (their .partial entries)

    def partial_names(self) -> set[str]:
        return self.claimed



class Imports:
    """The imports of one node: at most ``IMPORTS_MAX`` at once; ``make_room``
    is the evictor's once the node has one."""

    def __init__(self, mesh: Mesh, store: Store, registry: Registry, copies: CopyCatalog, saver: Saver, *,
                 busy: Callable[[], Container[str]], counts: Counter[str], make_room: MakeRoom = no_eviction) -> None:
        self.mesh = mesh
        self.store = store
        self.registry = registry
        self.copies = copies
        self.saver = saver
        self.busy = busy  # the .partial entries that transfers write into
        self.counts = counts
        self.make_room = make_room  # the evictor's: an import makes room as a transfer does
        self._imports: set[_Import] = set()

    def active_partials(self) -> set[str]:
        """The ``.partial`` entries imports running now write into (the sweep leaves them)."""
        out: set[str] = set()
        for imp in self._imports:
            out |= imp.partial_names()
        return out

    async def import_bundle(self, kind: str, body: AsyncIterator[bytes], *, check: bool = False) -> dict[str, Any]:
        """Read a bundle from ``body`` into ``kind`` on this node; what it imported.

        ``check``: the body is the bundle's first entry (its header) alone: answer
        what an import would refuse of it, write nothing (a client asks first,
        so that a refusal does not wait for gigabytes to be sent)."""
        self.store.tier_root(kind)  # an unknown tier: INVALID_DEVICE
        if len(self._imports) >= IMPORTS_MAX:
            raise MeshError("IN_PROGRESS", f"{IMPORTS_MAX} imports run on {self.mesh.id} already: try again when "
                                           "one has ended")
        imp = _Import(kind)
        self._imports.add(imp)
        started = time.monotonic()
        try:
            try:
                if check:
                    return await self._check(imp, body)
                await self._read(imp, body)
            except BundleTruncated as e:
                imp.keep = True
                raise MeshError("INCOMPLETE", f"{e}: the chunks it held are verified and kept here; import the whole "
                                              "bundle again to go on from there", status=422) from None
            except BadBundle as e:
                raise MeshError("BAD_CONTENT", f"this is not a bundle this node takes: {e}; nothing was kept",
                                status=422) from None
        except BaseException as e:
            if imp.keep or only(e, (trio.Cancelled, ClientGone)):  # cut short: a resume goes on from here
                await self._keep(imp)
            else:
                await self._discard(imp)
            raise
        finally:
            self._imports.discard(imp)
        self.counts["bundles_imported"] += 1
        out = self._result(imp)
        log.info("imported %s into %s from a bundle: %d bytes in %.1f s", ", ".join(m["model_name"] for m in
                 out["models"]), kind, imp.bytes_in, time.monotonic() - started)
        return out

    async def _check(self, imp: _Import, body: AsyncIterator[bytes]) -> dict[str, Any]:
        parser = BundleParser()
        async for piece in body:
            for ev in parser.feed(piece):
                if isinstance(ev, Header):
                    await self._header(imp, ev.header, check=True)
                    return self._result(imp, check=True)
        raise BadBundle(f"it ends after {parser.bytes_in} bytes, before its header does")

    async def _read(self, imp: _Import, body: AsyncIterator[bytes]) -> None:
        """Parse the body as it comes; once the header is taken, the chunks go to
        ``_apply`` (verified, hashed, written in worker threads) through a bounded
        queue, so that receiving the next chunks goes on meanwhile."""
        parser = BundleParser()
        it = aiter(body)
        pending: list[Event] = []
        while not pending:  # up to the header, in this task
            try:
                piece = await anext(it)
            except StopAsyncIteration:
                raise BadBundle(f"it ends after {parser.bytes_in} bytes, before its header does") from None
            imp.bytes_in += len(piece)
            pending = parser.feed(piece)
        first = pending.pop(0)
        assert isinstance(first, Header)
        await self._header(imp, first.header)
        queue_len = max(1, IMPORT_QUEUE_BYTES // max(m.manifest.chunk_bytes for m in first.header.models))
        send, recv = trio.open_memory_channel[Event](queue_len)
        cut: BundleTruncated | ClientGone | None = None  # raised once the chunks before the cut are written
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._apply, imp, recv)
                imp.flush, flush_recv = trio.open_memory_channel[Path](1)
                nursery.start_soon(_writeback, flush_recv)
                async with send:
                    for ev in pending:
                        await send.send(ev)
                    try:
                        async for piece in it:
                            imp.bytes_in += len(piece)
                            for ev in parser.feed(piece):
                                await send.send(ev)
                        for ev in parser.close():
                            await send.send(ev)
                    except (BundleTruncated, ClientGone) as e:
                        cut = e
        except BaseExceptionGroup as g:  # one failure inside: that one, as it was raised
            cause = first_of(g, lambda e: not isinstance(e, trio.Cancelled))
            if cause is not None and not isinstance(cause, BaseExceptionGroup):
                raise cause from None
            raise
        if cut is not None:
            raise cut

    async def _apply(self, imp: _Import, recv: trio.MemoryReceiveChannel[Event]) -> None:
        """The events in order; the chunks waiting in the queue together, in one
        worker thread's call (``BATCH_BYTES`` at most)."""
        held: Event | None = None
        try:
            async with recv:
                while True:
                    if held is None:
                        try:
                            held = await recv.receive()
                        except trio.EndOfChannel:
                            return
                    ev, held = held, None
                    if not isinstance(ev, Chunk):
                        await self._on(imp, ev)
                        continue
                    batch, size = [ev], len(ev.data)
                    while size < BATCH_BYTES:
                        try:
                            nxt = recv.receive_nowait()
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                        if not isinstance(nxt, Chunk):
                            held = nxt
                            break
                        batch.append(nxt)
                        size += len(nxt.data)
                    await self._chunks(imp, batch)
        finally:
            if imp.flush is not None:
                imp.flush.close()

    async def _keep(self, imp: _Import) -> None:
        for m in imp.models:
            if m.partial is not None:
                m.partial.close()

    async def _discard(self, imp: _Import) -> None:
        with trio.CancelScope(shield=True):
            for m in imp.models:
                if m.partial is not None:
                    await trio.to_thread.run_sync(m.partial.discard)

    async def _on(self, imp: _Import, ev: Event) -> None:
        if isinstance(ev, Chunk):
            await self._chunks(imp, [ev])
        elif isinstance(ev, Header):
            await self._header(imp, ev.header)
        elif isinstance(ev, Sums):
            self._sums(imp.models[ev.model], ev.sums)
        elif isinstance(ev, End):
            await self._publish(imp)

    async def _header(self, imp: _Import, header: BundleHeader, *, check: bool = False) -> None:
        """Every refusal before a byte is written; then room, and a partial per model."""
        kind = imp.kind
        for m in header.models:
            existing = self.store.get(m.name, kind)
            present = existing if existing is not None and existing.manifest_hash == m.manifest_hash else None
            imp.models.append(_Incoming(m, present, already=present is not None))
            if present is not None:
                continue
            one_content(self.mesh, m.name)(m.manifest_hash)  # CONTENT_CONFLICT
            if self.registry.find(m.name) is None:
                self.registry.check_room(m.name)
            others = [i for i in self._imports if i is not imp and i.kind == kind]
            if m.manifest_hash in self.busy() or any(m.manifest_hash in i.partial_names() for i in others):
                raise MeshError("IN_PROGRESS", f"a copy of {m.name} is being written into {self.mesh.id}:{kind} "
                                               "already (a transfer or another import): try again when it ended")
            if not check:
                imp.claimed.add(m.manifest_hash)
        if check:
            return
        for inc in imp.models:
            if inc.present is not None:
                continue
            await self.make_room(kind, inc.model.name, inc.model.manifest.total_bytes)
            inc.partial = await trio.to_thread.run_sync(self.store.partial, kind, inc.model.name, inc.model.manifest)
            inc.have = await trio.to_thread.run_sync(resumed_chunks, inc.partial)
            if inc.have:
                log.info("import of %s: %d of %d chunks verified by an earlier try are kept", inc.model.name,
                         len(inc.have), inc.model.manifest.n_chunks)

    async def _chunks(self, imp: _Import, batch: list[Chunk]) -> None:
        """Verify, hash and write ``batch`` in one worker thread's call."""
        jobs = []
        for ev in batch:
            inc = imp.models[ev.model]
            ref = inc.model.manifest.chunk(ev.index)
            hasher = inc.hashers.get(ref.path)
            if hasher is None:
                hasher = inc.hashers[ref.path] = hashlib.sha256()
            write = inc.partial is not None and ev.index not in inc.have
            jobs.append((ev, inc, ref, hasher, inc.partial if write else None))

        def work() -> int | None:
            for n, (ev, _inc, ref, hasher, partial) in enumerate(jobs):
                data = ev.data
                if len(data) != ref.length or chunk_digest(data) != ref.digest:
                    return n
                hasher.update(data)
                if partial is not None:
                    partial.write_chunk(ev.index, memoryview(data))
            return None

        bad = await trio.to_thread.run_sync(work)
        for _ev, inc, ref, _hasher, partial in jobs[:len(jobs) if bad is None else bad]:
            inc.chunks_written += partial is not None
            imp.unflushed += ref.length if partial is not None else 0
            if imp.unflushed >= WRITEBACK_BYTES and imp.flush is not None and partial is not None:
                try:  # one at a time; while one runs, the next is asked later
                    imp.flush.send_nowait(partial.path / ref.path)
                    imp.unflushed = 0
                except trio.WouldBlock:
                    pass
        if bad is not None:
            ev, inc, ref, _hasher, _partial = jobs[bad]
            raise MeshError("BAD_CONTENT", f"chunk {ev.index} of {inc.model.name} ({ref.path[:100]!r} at byte "
                                           f"{ref.offset}) does not match its manifest: the bundle is damaged or was "
                                           "changed; nothing was kept", status=422)

    def _sums(self, inc: _Incoming, sums: dict[str, str]) -> None:
        for f in inc.model.manifest.files:
            got = inc.hashers.pop(f.path, None) or hashlib.sha256()
            if got.hexdigest() != sums[f.path]:
                raise MeshError("BAD_CONTENT", f"{f.path[:100]!r} of {inc.model.name} does not match the sha256 the "
                                               "bundle gives for it: nothing was kept", status=422)
        inc.sums = sums
        self._check_digest(inc.model.name, tree_digest(sums), inc.model.registration)

    def _check_digest(self, model: str, digest: str | None, registration: Any) -> None:
        """The digest a registration names (llama-orch's catalog), here or in the bundle, is the copy's."""
        mv = self.registry.find(model)
        said = mv.metadata.get("digest") if mv is not None else None
        if digest is None:
            return
        if isinstance(said, str) and is_digest(said) and said != digest:
            raise MeshError("CONTENT_CONFLICT", f"{model!r} is registered with digest {said}; the bundle's copy has "
                                                f"{digest}: nothing was kept")
        own = ((registration or {}).get("metadata") or {}).get("digest")
        if mv is None and isinstance(own, str) and is_digest(own) and own != digest:
            raise MeshError("BAD_CONTENT", f"the bundle's registration of {model!r} names digest {own}, its files "
                                           f"have {digest}: nothing was kept", status=422)

    async def _publish(self, imp: _Import) -> None:
        for inc in imp.models:
            if inc.present is None:
                one_content(self.mesh, inc.model.name)(inc.model.manifest_hash)  # gossip may have moved meanwhile
        for inc in imp.models:
            name = inc.model.name
            if inc.partial is not None:
                copy = await trio.to_thread.run_sync(inc.partial.publish)
                inc.partial = None
            else:
                assert inc.present is not None
                copy = inc.present
            if self.registry.find(name) is None:
                await self.registry.register(name, dict(inc.model.registration or {}))
            self.copies.publish(copy)
            inc.present = copy
        await self.saver.persist_now()

    def _result(self, imp: _Import, *, check: bool = False) -> dict[str, Any]:
        me = self.mesh.id
        models = []
        for inc in imp.models:
            m = inc.model
            c = inc.present
            models.append({
                "model_name": m.name, "device": f"{me}:{imp.kind}", "manifest_hash": m.manifest_hash,
                "size": m.manifest.total_bytes, "files": len(m.manifest.files), "chunks": m.manifest.n_chunks,
                "chunks_resumed": len(inc.have), "chunks_written": inc.chunks_written,
                "status": "already present" if inc.already else "would import" if check else "imported",
                "path": str(c.path) if c is not None else None,
                "digest": tree_digest(inc.sums) if inc.sums is not None else None,
            })
        return {"node_id": me, "device": f"{me}:{imp.kind}", "bytes": imp.bytes_in, "models": models}


async def _writeback(paths: trio.MemoryReceiveChannel[Path]) -> None:
    """Flush each file asked to disk (``fdatasync``) beside the import, one at a time."""

    def flush(path: Path) -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return
        try:
            os.fdatasync(fd)
        except OSError:
            pass  # the publish's own fsync says what is wrong
        finally:
            os.close(fd)

    async with paths:
        async for path in paths:
            await trio.to_thread.run_sync(flush, path)
