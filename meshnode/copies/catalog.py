"""What this node says in the catalog about its copies and its storage: a
``copy/<model>@<kind>`` record per copy in the store, and its ``storage``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from protocol.eviction import Watermarks
from protocol.keys import (
    COPY_PREFIX,
    REG_PREFIX,
    STORAGE_KEY,
    CopyRecord,
    RecordError,
    Storage,
    TierUsage,
    copy_key,
    parse_copy_key,
)
from protocol.registry import purged_models
from protocol.transfer.sources import content_conflict

from ..errors import MeshError
from ..mesh import Mesh, wall_ms
from ..saver import Saver
from .store import TIERS, Copy, Store, StoreError

__all__ = ["CopyCatalog", "conflict_error", "one_content"]

log = logging.getLogger("meshnode.copies")

MIB = 1024 * 1024


def one_content(mesh: Mesh, model: str) -> Callable[[str], None]:
    """For ``Store.ingest_path``: refuse new bytes for a model whose copies in
    the mesh hold other bytes (``transfer.sources.content_conflict``).  The
    copies are read now, in the event loop; the check runs in the worker."""
    items = list(mesh.items(COPY_PREFIX))

    def accept(manifest_hash: str) -> None:
        other = content_conflict(items, model, manifest_hash)
        if other is not None:
            raise conflict_error(model, other)

    return accept


def conflict_error(model: str, other: str) -> StoreError:
    return StoreError(
        "CONTENT_CONFLICT",
        f"{model!r} already has other content (the copy on {other}); one model has one content: "
        "delete or purge its copies first, or give this content another model name",
    )


class CopyCatalog:
    def __init__(self, mesh: Mesh, store: Store, saver: Saver) -> None:
        self.mesh = mesh
        self.store = store
        self.saver = saver
        self._purge_asked = trio.Event()
        self.watermarks: dict[str, Watermarks] = {}  # per tier (``--disk-watermarks``); none: 100%
        self._told: Storage | None = None  # the storage the mesh was last told

    # -- catalog listener: a purge anywhere wakes the sweep at once ------------------------

    def key_changed(self, node_id: str, key: str, value: Any | None) -> None:
        if key.startswith(REG_PREFIX) and isinstance(value, dict) and value.get("purged") is True:
            self._purge_asked.set()

    def node_cleared(self, node_id: str) -> None:
        pass

    async def load(self) -> None:
        """Publish the copies on disk; withdraw copy records whose copy is gone."""
        copies = await trio.to_thread.run_sync(self.store.scan)
        present = {copy_key(c.model, c.kind) for c in copies}
        for key, e in self.mesh.own_keys(COPY_PREFIX):
            if not e.tombstone and key not in present:
                self.mesh.delete(key)
        for c in copies:
            self.publish(c)
        if copies:
            log.info("holding %d copies: %s", len(copies), ", ".join(f"{c.model}@{c.kind}" for c in copies[:10]))

    def publish(self, c: Copy) -> None:
        key = copy_key(c.model, c.kind)
        try:
            prev: CopyRecord | None = CopyRecord.from_value(self.mesh.get(self.mesh.id, key))
        except RecordError:
            prev = None
        published = prev.published_ms if prev is not None and prev.manifest_hash == c.manifest_hash else 0
        rec = CopyRecord(c.manifest_hash, c.manifest.total_bytes, len(c.manifest.files), c.manifest.chunk_bytes,
                         published or wall_ms(), self.store.digest(c.model, c.kind))
        self.mesh.set(key, rec.to_value())
        self.sample_storage()

    async def delete_local(self, model: str, kind: str) -> bool:
        """Delete our copy of ``model`` on ``kind``; False when there was none."""
        c = await trio.to_thread.run_sync(self.store.delete, model, kind)
        self.mesh.delete(copy_key(model, kind))
        self.sample_storage()
        await self.saver.persist_now()
        return c is not None

    def withdraw(self, model: str, kind: str) -> None:
        """Drop the record of a copy the store no longer holds (a newer copy there keeps its record)."""
        if self.store.get(model, kind) is None:
            self.mesh.delete(copy_key(model, kind))

    def storage(self) -> dict[str, dict[str, int]]:
        out = {}
        for kind in TIERS:
            try:
                out[kind] = self.store.usage(kind)
            except OSError:
                continue
        return out

    def sample_storage(self, *, drift: bool = False) -> None:
        """Tell the mesh this node's storage: at once after a copy came or
        went, and on ``drift`` (the periodic sample) only when it moved
        enough to matter (``Storage.moved``), so that an idle mesh on busy
        disks stays quiet."""
        # Rounded to MiB, so that a few bytes written do not cause gossip.
        tiers = {k: TierUsage(u["total"] // MIB * MIB, u["used"] // MIB * MIB, u["free"] // MIB * MIB,
                              round(100 * self.watermarks[k].high) if k in self.watermarks else 100)
                 for k, u in self.storage().items()}
        now = Storage(tiers)
        if drift and not now.moved(self._told):
            return
        self._told = now
        self.mesh.set(STORAGE_KEY, now.to_value())

    async def purge(self) -> list[str]:
        """Delete our copies of the models a purge unregistered (``purged_models``);
        the devices freed.  Also how a node that was down when the purge was
        asked does its part once it is back."""
        purged = purged_models(self.mesh.items(REG_PREFIX))
        if not purged:
            return []
        freed = []
        for key, e in list(self.mesh.own_keys(COPY_PREFIX)):
            held = parse_copy_key(key)
            if e.tombstone or held is None or held[0] not in purged:
                continue
            model, kind = held
            try:
                await self.delete_local(model, kind)
            except (MeshError, OSError) as e:  # tried again at the next sweep
                log.warning("could not delete the purged copy of %s on %s: %s", model, kind, e)
                continue
            freed.append(f"{self.mesh.id}:{kind}")
            log.info("deleted the copy of %s on %s: the model was unregistered with purge", model, kind)
        return freed

    async def run(self, interval_s: float, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Every ``interval_s``, and at once when a purge arrives: sample the
        storage, delete what a purge asks of this node."""
        task_status.started()
        while True:
            await self.purge()
            with trio.move_on_after(interval_s):
                await self._purge_asked.wait()
            self._purge_asked = trio.Event()
            self.sample_storage(drift=True)
