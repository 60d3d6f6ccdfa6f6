"""Bundles, export: a model's copy read as one tar stream (the format:
``protocol.bundle``).

Export (``GET /bundles?model=M``) reads this node's copy, or, when it has
none, the nearest holder's through the mesh (its manifest over the peer
route, its chunks over the data plane, verified as they arrive), and
streams the header, every file and each model's sha256 sums.  Its length
is known before a byte is read (``Content-Length``), so a reader knows a
stream that was cut.  The reading runs in this object's nursery and hands
the response at most ``EXPORT_QUEUE`` pieces ahead (backpressure: a slow
reader slows the reads; one that stops reading for ``SEND_TIMEOUT_S`` ends
the export).

Everything that blocks (files, hashing) runs in worker threads.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from protocol.bundle import (
    END_OF_ARCHIVE,
    MODELS_MAX,
    BundleHeader,
    BundleModel,
    bundle_bytes,
    export_sources,
    file_header,
    header_entry,
    padding,
    sums_entry,
)
from protocol.errors import RemoteProtocolError
from protocol.keys import COPY_PREFIX, NODE_KEY, NodeInfo, RecordError
from protocol.manifest import Manifest, chunk_digest
from protocol.peerauth import Recipient
from protocol.transfer.sources import source_manifest_hash

from ..copies.dataplane import DataPlaneError
from ..copies.puller import Puller
from ..copies.store import TIERS, Copy, Store
from ..errors import MeshError, first_mesh_error, first_of
from ..mesh import Mesh, wall_ms
from ..registry import Registry, model_name

__all__ = ["EXPORTS_MAX", "ExportCut", "Exports"]

log = logging.getLogger("meshnode.bundles")

EXPORT_QUEUE = 4  # pieces read ahead of the response
PIECE_MAX = 8 * 1024 * 1024  # a piece handed to the response: a chunk, or this much of one
PREFETCH_BYTES = 32 * 1024 * 1024  # chunks fetched at once from a holder (at least one)
SEND_TIMEOUT_S = 300.0  # a response whose reader takes nothing for this long ends the export
EXPORTS_MAX = 8  # exports running at once on a node (each holds at most EXPORT_QUEUE pieces and a chunk)
SOURCE_TRIES = 3  # holders tried for one chunk before an export gives up


class ExportCut(Exception):
    """An export's reading failed after its answer began (logged where it did)."""


def _registration(mv: Any) -> dict[str, Any] | None:
    if mv is None:
        return None
    out: dict[str, Any] = {"metadata": dict(mv.metadata)}
    if mv.model_type is not None:
        out["model_type"] = mv.model_type
    if mv.source_url is not None:
        out["source_url"] = mv.source_url
    return out


@dataclass
class _Export:
    header: BundleHeader
    sources: list[_LocalSource | _MeshSource]
    mtime_s: int
    done: bool = False
    sent: int = 0


class _LocalSource:
    """A copy in this node's store: a file's chunks read in runs of up to
    ``PIECE_MAX`` bytes (one read and one worker thread's call per run), each
    chunk checked and the run hashed in that thread."""

    batch_bytes = PIECE_MAX

    def __init__(self, store: Store, copy: Copy) -> None:
        self.store = store
        self.copy = copy
        self.manifest = copy.manifest

    def start(self, nursery: trio.Nursery) -> None:
        self.store.touch(self.copy.model, self.copy.kind)  # read: used

    async def chunks(self, indices: range, hasher: Any) -> bytes:
        """Chunks ``indices`` (consecutive, of one file), checked against the manifest and
        fed to ``hasher``: their bytes."""
        refs = [self.manifest.chunk(i) for i in indices]
        path = self.copy.path / refs[0].path
        start = refs[0].offset
        length = sum(ref.length for ref in refs)

        def read() -> bytes:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                data = os.pread(fd, length, start)
            finally:
                os.close(fd)
            view = memoryview(data)
            for ref in refs:
                at = ref.offset - start
                piece = view[at:at + ref.length]
                if len(piece) != ref.length or chunk_digest(piece) != ref.digest:
                    raise MeshError("SOURCE_CORRUPT", f"chunk {ref.index} of the copy of {self.copy.model} on "
                                                      f"{self.copy.kind} does not match its manifest")
            hasher.update(data)
            return data

        try:
            return await trio.to_thread.run_sync(read)
        except OSError as e:
            raise MeshError("IO_ERROR", f"reading the copy of {self.copy.model}: {e.strerror or e}") from None


class _MeshSource:
    """The nearest holder's copy, read through the mesh: a few chunks in flight
    (``PREFETCH_BYTES``), each verified as it arrives, the next holder asked
    when one fails."""

    def __init__(self, model: str, manifest: Manifest, holders: list[tuple[str, str]], puller: Puller) -> None:
        self.model = model
        self.manifest = manifest
        self.holders = holders  # (node id, data address), nearest first
        self.puller = puller
        self._results: dict[int, bytes | MeshError] = {}
        self._ready: dict[int, trio.Event] = {}
        self._slots = trio.Semaphore(max(1, PREFETCH_BYTES // manifest.chunk_bytes))

    def start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._fetch_all, nursery)

    async def _fetch_all(self, nursery: trio.Nursery) -> None:
        for ref in self.manifest.chunks():
            await self._slots.acquire()
            self._event(ref.index)
            nursery.start_soon(self._fetch, ref.index)

    def _event(self, index: int) -> trio.Event:
        ev = self._ready.get(index)
        if ev is None:
            ev = self._ready[index] = trio.Event()
        return ev

    async def _fetch(self, index: int) -> None:
        ref = self.manifest.chunk(index)
        errors = []
        buf = bytearray(ref.length)
        for nid, addr in self.holders[:SOURCE_TRIES]:
            try:
                view = await self.puller.data.fetch_chunk(addr, self.manifest.hash, index, ref.length, ref.digest, buf)
                self._results[index] = bytes(view)
                break
            except DataPlaneError as e:  # NotFound, PeerBusy, ChunkMismatch: the next holder
                errors.append(f"{nid}: {type(e).__name__}")
        else:
            self._results[index] = MeshError("NO_SOURCE", f"no holder served chunk {index} of {self.model}: "
                                                          f"{'; '.join(errors)[:300]}")
        self._event(index).set()

    batch_bytes = 0  # one chunk at a time, as each arrives

    async def chunks(self, indices: range, hasher: Any) -> bytes:
        assert len(indices) == 1
        index = indices[0]
        await self._event(index).wait()
        got = self._results.pop(index)
        del self._ready[index]
        self._slots.release()
        if isinstance(got, MeshError):
            raise got
        await trio.to_thread.run_sync(hasher.update, got)
        return got


class _Relay:
    """The response's side of an export: the pieces as they are read; at the end
    ``ExportCut`` when the reading failed (the stream stops short of its length)."""

    def __init__(self, x: _Export, recv: trio.MemoryReceiveChannel[bytes]) -> None:
        self.x = x
        self.recv = recv

    def __aiter__(self) -> _Relay:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self.recv.receive()
        except trio.EndOfChannel:
            self.recv.close()
            if not self.x.done:
                raise ExportCut("the export was cut short") from None
            raise StopAsyncIteration from None

    async def aclose(self) -> None:  # the response ended early: the reading stops at its next piece
        self.recv.close()


class Exports:
    """The exports of one node: at most ``EXPORTS_MAX`` at once, each read in
    ``nursery`` (set once the node runs) and handed to its response."""

    def __init__(self, mesh: Mesh, store: Store, registry: Registry, puller: Puller, counts: Counter[str]) -> None:
        self.mesh = mesh
        self.store = store
        self.registry = registry
        self.puller = puller  # the holders of a copy, the peer and data clients
        self.counts = counts
        self.nursery: trio.Nursery | None = None
        self._exports = 0

    async def export(self, names: list[str]) -> tuple[BundleHeader, int, AsyncIterator[bytes]]:
        """The bundle of ``names``: its header, its length in bytes, and its bytes as they are read."""
        if not 1 <= len(names) <= MODELS_MAX:
            raise MeshError("INVALID_REQUEST", f"a bundle holds 1 to {MODELS_MAX} models: ?model=NAME, repeated")
        if self._exports >= EXPORTS_MAX:
            raise MeshError("IN_PROGRESS", f"{EXPORTS_MAX} exports run on {self.mesh.id} already: try again when one "
                                           "has ended")
        sources: list[_LocalSource | _MeshSource] = []
        models = []
        for name in dict.fromkeys(model_name(n) for n in names):
            src = await self._source(name)
            sources.append(src)
            models.append(BundleModel(name, src.manifest, _registration(self.registry.find(name))))
        now_ms = wall_ms()
        x = _Export(BundleHeader(tuple(models), self.mesh.id, now_ms), sources, now_ms // 1000)
        size = bundle_bytes(x.header, x.mtime_s)
        send, recv = trio.open_memory_channel[bytes](EXPORT_QUEUE)
        if self.nursery is None:
            raise MeshError("STARTING", "the node is still starting")
        self._exports += 1
        self.nursery.start_soon(self._produce, x, send)
        return x.header, size, self._relay(x, recv)

    async def _source(self, model: str) -> _LocalSource | _MeshSource:
        """This node's copy of ``model``, or the nearest holder's."""
        for kind in TIERS:
            c = self.store.get(model, kind)
            if c is not None and not self.store.suspect(model, kind):
                return _LocalSource(self.store, c)
        me = self.mesh.id
        mhash = source_manifest_hash(self.mesh.items(COPY_PREFIX), model, None, me, self.mesh.reachable)
        if mhash is None:
            if self.registry.find(model) is None:
                raise MeshError("MODEL_NOT_FOUND", f"model {model!r} is not registered and no node holds a copy")
            raise MeshError("COPY_NOT_FOUND", f"no node that can be reached holds a copy of {model!r}")
        local = self.store.find(mhash)  # the same bytes under another name here
        if local is not None:
            return _LocalSource(self.store, local)
        found, complete = self.puller.holders(mhash)
        labels = {}
        for nid in found:
            try:
                labels[nid] = NodeInfo.from_value(self.mesh.get(nid, NODE_KEY)).labels
            except RecordError:
                labels[nid] = {}
        try:
            mine = NodeInfo.from_value(self.mesh.get(me, NODE_KEY)).labels
        except RecordError:
            mine = {}
        order = export_sources({nid: nid in complete for nid in found}, labels, mine)
        errors = []
        for nid in order[:SOURCE_TRIES]:
            m = self.mesh.member(nid)
            if m is None:
                continue
            try:
                data = await self.puller.peers.get_manifest(m.record.address, mhash,
                                                            to=Recipient(nid, m.record.generation))
                manifest = Manifest.decode(data, expected_hash=mhash)
            except (MeshError, RemoteProtocolError) as e:
                errors.append(f"{nid}: {e}"[:200])
                continue
            log.info("exporting %s from %s's copy (this node has none)", model, nid)
            return _MeshSource(model, manifest, [(n, found[n]) for n in order], self.puller)
        raise MeshError("NO_SOURCE", f"no holder of {model!r} sent its manifest: {'; '.join(errors) or 'none found'}")

    def _relay(self, x: _Export, recv: trio.MemoryReceiveChannel[bytes]) -> AsyncIterator[bytes]:
        return _Relay(x, recv)

    async def _produce(self, x: _Export, send: trio.MemorySendChannel[bytes]) -> None:
        try:
            await self._produce_all(x, send)
        finally:
            self._exports -= 1

    async def _produce_all(self, x: _Export, send: trio.MemorySendChannel[bytes]) -> None:
        started = time.monotonic()

        async def put(data: bytes) -> None:
            for at in range(0, len(data), PIECE_MAX):
                piece = data[at:at + PIECE_MAX] if len(data) > PIECE_MAX else data
                with trio.fail_after(SEND_TIMEOUT_S):
                    await send.send(piece)
                x.sent += len(piece)

        names = ", ".join(m.name for m in x.header.models)
        try:
            async with send:
                await put(header_entry(x.header, x.mtime_s))
                for m, src in zip(x.header.models, x.sources, strict=True):
                    await self._produce_model(m, src, x.mtime_s, put)
                await put(END_OF_ARCHIVE)
                x.done = True
        except Exception as e:  # an export that fails is a log line and a stream cut short, never the node's end
            if first_of(e, (trio.BrokenResourceError, trio.ClosedResourceError)) is not None:
                log.info("the export of %s stopped: its reader went away after %d bytes", names, x.sent)
            elif first_of(e, trio.TooSlowError) is not None:
                log.warning("the export of %s stopped: its reader took nothing for %.0f s", names, SEND_TIMEOUT_S)
            elif (err := first_mesh_error(e)) is not None:
                log.warning("the export of %s was cut short after %d bytes: %s: %s", names, x.sent, err.code,
                            err.message)
            else:
                log.exception("the export of %s failed after %d bytes", names, x.sent)
            return
        self.counts["bundles_exported"] += 1
        log.info("exported %s: %d bytes in %.1f s", names, x.sent, time.monotonic() - started)

    async def _produce_model(self, m: BundleModel, src: _LocalSource | _MeshSource, mtime_s: int,
                             put: Callable[[bytes], Awaitable[None]]) -> None:
        manifest = m.manifest
        sums: dict[str, str] = {}
        async with trio.open_nursery() as nursery:
            src.start(nursery)
            for f in manifest.files:
                await put(file_header(m.name, manifest.hash, f.path, f.size, mtime_s))
                hasher = hashlib.sha256()
                for run in _runs(manifest, manifest.file_chunks(f.path), src.batch_bytes):
                    await put(await src.chunks(run, hasher))
                await put(padding(f.size))
                sums[f.path] = hasher.hexdigest()
            nursery.cancel_scope.cancel()
        await put(sums_entry(m.name, manifest, sums, mtime_s))


def _runs(manifest: Manifest, indices: range, limit_bytes: int) -> list[range]:
    """``indices`` cut into runs of consecutive chunks of at most ``limit_bytes``
    together (each at least one chunk)."""
    out = []
    start = at = indices.start
    size = 0
    for i in indices:
        n = manifest.chunk(i).length
        if i > start and size + n > limit_bytes:
            out.append(range(start, i))
            start, size = i, 0
        size += n
        at = i + 1
    if at > start:
        out.append(range(start, at))
    return out
