"""The model registry on this node: reads from the model index, writes by
the rules of ``protocol.registry``, saved before they are seen (``Saver.commit``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from protocol import HLC, InvalidName, parse_device, validate_model_name
from protocol.registry import (
    InvalidInput,
    Write,
    changed_fields,
    location_write,
    parse_policy,
    parse_registration,
    pin_write,
    register_write,
    unregister_writes,
)
from protocol.view import ModelIndex, ModelView

from .errors import MeshError
from .mesh import Mesh, wall_ms
from .saver import Saver

__all__ = ["Registry", "model_name"]

log = logging.getLogger("meshnode.registry")


def model_name(name: Any) -> str:
    """``name`` if it is a valid model name, else ``MeshError(INVALID_MODEL_NAME)``."""
    try:
        return validate_model_name(name)
    except InvalidName as e:
        raise MeshError("INVALID_MODEL_NAME", str(e)) from None


class Registry:
    def __init__(self, mesh: Mesh, hlc: HLC, index: ModelIndex, saver: Saver, *, models_max: int = 100_000) -> None:
        self.mesh = mesh
        self.hlc = hlc
        self.index = index  # subscribed to the mesh's catalog
        self.saver = saver
        self.models_max = models_max  # registered models in the mesh (--max-models)
        self.clock_ms: Callable[[], int] = wall_ms  # the wall clock writes are stamped with

    # -- reads ---------------------------------------------------------------------

    def models(self) -> dict[str, ModelView]:
        """Every registered model (a live mapping: do not change it)."""
        return self.index.all()

    def find(self, name: str) -> ModelView | None:
        return self.index.get(name)

    def model(self, name: str) -> ModelView:
        name = model_name(name)
        mv = self.index.get(name)
        if mv is None:
            raise MeshError("MODEL_NOT_FOUND", f"model {name!r} is not registered")
        return mv

    # -- writes ----------------------------------------------------------------------

    def check_room(self, name: str) -> None:
        """``MeshError(TOO_MANY_MODELS)`` when registering ``name`` would add a
        model past ``models_max`` (one already registered adds none)."""
        if self.index.get(model_name(name)) is not None:
            return
        count = len(self.index.all())
        if count >= self.models_max:
            raise MeshError("TOO_MANY_MODELS", f"the mesh holds {count} registered models, the most --max-models "
                                               f"allows ({self.models_max}): unregister some, or raise --max-models")

    async def _commit(self, writes: list[Write], warning: str | None) -> None:
        if warning:
            log.warning("%s", warning)
        await self.saver.commit(writes)

    async def register(self, name: str, body: Any) -> tuple[ModelView, list[str] | None]:
        """Register ``name``; its view, and what it changed of a registration it
        replaced (None: there was none)."""
        name = model_name(name)
        try:
            reg = parse_registration(body)
        except InvalidInput as e:
            raise MeshError(e.code, e.message) from None
        self.check_room(name)
        existing = self.index.get(name)
        writes, warning = register_write(name, reg, existing, self.hlc, self.clock_ms())
        await self._commit(writes, warning)
        changed = changed_fields(existing, reg)
        if existing is None:
            log.info("model %s registered (type %r)", name, reg.model_type)
        elif changed:
            log.info("model %s registered again; changed: %s", name, ", ".join(changed))
        return self.model(name), changed

    async def pin(self, name: str, raw: Any | None) -> ModelView:
        """Keep ``raw``'s replica policy for ``name`` (None: unpin it); its view."""
        mv = self.model(name)
        try:
            policy = None if raw is None else parse_policy(raw)
        except InvalidInput as e:
            raise MeshError(e.code, e.message) from None
        write, warning = pin_write(mv, policy, self.hlc, self.clock_ms())
        await self._commit([write], warning)
        log.info("model %s %s", mv.name, "unpinned" if policy is None else
                 f"pinned: {policy.min} to {policy.max} copies on {policy.tier}")
        return self.model(name)

    async def unregister(self, name: str, *, purge: bool = False) -> list[str]:
        """Unregister; with ``purge`` also drop every recorded location.  The dropped devices."""
        dropped, writes, warning = unregister_writes(self.model(name), self.hlc, wall_ms(), purge=purge)
        await self._commit(writes, warning)
        log.info("model %s unregistered%s", name,
                 f" and purged (copies to delete: {', '.join(dropped) or 'none'})" if purge else "")
        return dropped

    async def set_location(self, name: str, device: str, present: bool) -> str:
        """Record (or drop) a location by hand; the device, as written."""
        mv = self.model(name)
        try:
            d = parse_device(device)
        except InvalidName as e:
            raise MeshError("INVALID_DEVICE", str(e)) from None
        if d.is_web:
            raise MeshError("INVALID_DEVICE", "'web' is a source, not a place a copy can live")
        assert d.node_id is not None
        if self.mesh.member(d.node_id) is None:
            raise MeshError("NODE_NOT_FOUND", f"no node {d.node_id!r} is known to the mesh")
        dev = str(d)
        if not present and dev not in mv.locations:
            raise MeshError("LOCATION_NOT_FOUND", f"model {mv.name!r} has no copy recorded on {dev}")
        write, warning = location_write(mv, dev, present, self.hlc, self.clock_ms())
        await self._commit([write], warning)
        return dev
