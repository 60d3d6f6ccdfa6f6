"""Bundles on a node: a model's copy exported as one tar stream, and a
bundle imported into a tier (the format and its reader: ``protocol.bundle``).

Export (``exporting``): ``GET /bundles?model=M`` streams this node's copy,
or the nearest holder's, as one tar stream of known length.  Import
(``importing``): ``POST /bundles?to=NODE:TIER`` verifies every chunk and
file of the body as it arrives and publishes each model only when the whole
bundle verified.  ``Bundles`` is the node's one face for both.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable, Container
from typing import Any

import trio

from protocol.bundle import BundleHeader

from ..copies.catalog import CopyCatalog
from ..copies.puller import MakeRoom, Puller, no_eviction
from ..copies.store import Store
from ..mesh import Mesh
from ..registry import Registry
from ..saver import Saver
from .exporting import ExportCut, Exports
from .importing import ClientGone, Imports

__all__ = ["Bundles", "ClientGone", "ExportCut"]


class Bundles:
    def __init__(self, mesh: Mesh, store: Store, registry: Registry, copies: CopyCatalog, saver: Saver,
                 puller: Puller, *, busy: Callable[[], Container[str]] = frozenset,
                 make_room: MakeRoom = no_eviction) -> None:
        self.mesh = mesh
        self.store = store
        self.registry = registry
        self.copies = copies
        self.saver = saver
        self.puller = puller  # the holders of a copy, the peer and data clients
        self.busy = busy  # the .partial entries that transfers write into
        self.counts: Counter[str] = Counter()
        self.exports = Exports(mesh, store, registry, puller, self.counts)
        self.imports = Imports(mesh, store, registry, copies, saver, busy=busy, counts=self.counts,
                               make_room=make_room)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.exports.nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def active_partials(self) -> set[str]:
        """The ``.partial`` entries imports running now write into (the sweep leaves them)."""
        return self.imports.active_partials()

    async def export(self, names: list[str]) -> tuple[BundleHeader, int, AsyncIterator[bytes]]:
        """The bundle of ``names``: its header, its length in bytes, and its bytes as they are read."""
        return await self.exports.export(names)

    async def import_bundle(self, kind: str, body: AsyncIterator[bytes], *, check: bool = False) -> dict[str, Any]:
        """Read a bundle from ``body`` into ``kind`` on this node; what it imported (``Imports.import_bundle``)."""
        return await self.imports.import_bundle(kind, body, check=check)
