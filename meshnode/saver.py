"""The saver: this node's own keys on disk, before or soon after they change.

Two paths, one lock:

* ``commit(writes)`` for registry writes a client waits on: the writes go to
  the state log and are fsynced first, then into the catalog.  A write that
  cannot be saved (a full disk: 507 ``NO_SPACE``) is seen by no one, and one
  that was acknowledged survives a crash.
* ``persist_now()`` for everything else (copies, transfers, storage): the
  keys that changed since the last save (``OwnKeysJournal``) are appended;
  ``run`` does it every ``interval_s``, and folds the log into a new snapshot
  when it has grown (and every five minutes, for the remembered peers).
"""

from __future__ import annotations

import errno
import logging
from typing import Any

import trio

from protocol import HLC, MemberState

from .errors import MeshError
from .mesh import Mesh
from .persist import OwnKeysJournal, SavedState, StateFile

__all__ = ["SNAPSHOT_INTERVAL_S", "Saver"]

log = logging.getLogger("meshnode.saver")

SNAPSHOT_INTERVAL_S = 300.0  # a fresh snapshot at least this often (the peers it remembers)
PEERS_KEPT = 1000


class Saver:
    def __init__(self, mesh: Mesh, hlc: HLC, state_file: StateFile, journal: OwnKeysJournal) -> None:
        self.mesh = mesh
        self.hlc = hlc
        self.state_file = state_file
        self.journal = journal  # subscribed to the catalog, after its restore
        self._lock = trio.Lock()
        self._persisted_meta: tuple[int, int] | None = None
        self._snapshot_at = 0.0

    def _meta(self) -> tuple[int, int]:
        return self.mesh.generation, self.hlc.high_water_ms

    async def persist_now(self) -> None:
        """Write our own keys that changed since the last time to the state
        log; returns once they are on disk.  Raises OSError (ENOSPC: full)."""
        async with self._lock:
            keys = self.journal.drain()
            meta = self._meta()
            if not keys and meta == self._persisted_meta:
                return
            records = []
            for k in keys:
                e = self.mesh.entry(self.mesh.id, k)
                records.append((k, None, True) if e is None else (k, e.value, e.tombstone))
            try:
                await trio.to_thread.run_sync(self.state_file.append, records, *meta)
            except BaseException:
                self.journal.put_back(keys)
                raise
            self._persisted_meta = meta
            if self.state_file.needs_compaction():
                await self._save_snapshot_locked()

    async def save_snapshot(self) -> None:
        """Fold the log into a new snapshot (at start, at stop, and when the log outgrew the last one)."""
        async with self._lock:
            await self._save_snapshot_locked()

    async def _save_snapshot_locked(self) -> None:
        mesh = self.mesh
        self.journal.drain()  # the snapshot holds every own key as it is now
        generation, hlc_wall_ms = self._meta()
        state = SavedState(
            node_id=mesh.id,
            generation=generation,
            hlc_wall_ms=hlc_wall_ms,
            catalog=mesh.gossip.catalog.snapshot([mesh.id]),
            peers=sorted(
                m.record.address for m in mesh.members() if m.record.node_id != mesh.id and m.state is not MemberState.LEFT
            )[:PEERS_KEPT],
        )
        try:
            await trio.to_thread.run_sync(self.state_file.save, state)
        except BaseException:
            self.journal.put_back([k for k, _ in mesh.own_keys()])
            raise
        self._persisted_meta = (generation, hlc_wall_ms)
        self._snapshot_at = trio.current_time()

    async def commit(self, writes: list[tuple[str, Any]]) -> None:
        """Registry writes: on disk first, then in the catalog.  A value of
        None deletes the key.  Raises ``MeshError`` (``NO_SPACE``,
        ``IO_ERROR``) with nothing written, or ``LocalProtocolError`` for a
        value the catalog would refuse."""
        for key, value in writes:
            if value is not None:
                self.mesh.check(key, value)
        async with self._lock:
            records = [(k, v, v is None) for k, v in writes]
            meta = self._meta()
            try:
                await trio.to_thread.run_sync(self.state_file.append, records, *meta)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise MeshError("NO_SPACE", f"the data dir {self.state_file.dir} is full: nothing was written") from None
                raise MeshError("IO_ERROR", f"cannot write to the data dir: {e.strerror or e}") from None
            self._persisted_meta = meta
            for key, value in writes:
                if value is None:
                    self.mesh.delete(key)
                else:
                    self.mesh.set(key, value)
            self.journal.discard([k for k, _ in writes])  # on disk already, as they are now

    async def run(self, interval_s: float, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(interval_s)
            try:
                await self.persist_now()
                if trio.current_time() - self._snapshot_at > SNAPSHOT_INTERVAL_S:
                    await self.save_snapshot()  # keeps the remembered peers fresh
            except OSError as e:
                log.error("cannot save state to %s: %s", self.state_file.dir, e)
