"""What the API is given: ``ApiParts``, and once the node has joined the
mesh, its ``Running`` parts.  The app is given its parts, not the node."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..actions import Router
from ..bundles import Bundles
from ..copies.catalog import CopyCatalog
from ..copies.store import Store
from ..copies.transfers import Transfers
from ..errors import MeshError
from ..gpus import GpuMonitor
from ..jobs import Jobs
from ..keeper import Keeper
from ..leases import Leases
from ..mesh import Mesh
from ..metrics import RouteLatency
from ..proxy import InferenceProxy
from ..registry import Registry
from ..serving import Services
from ..views import Views
from .auth import PeerGate, Refusals
from .guard import ApiGuard

__all__ = ["ApiParts", "Running"]


@dataclass
class Running:
    """The parts that exist once the node has joined the mesh."""

    mesh: Mesh
    registry: Registry
    views: Views
    router: Router
    transfers: Transfers
    copies: CopyCatalog
    jobs: Jobs
    gpus: GpuMonitor
    services: Services
    proxy: InferenceProxy
    keeper: Keeper
    bundles: Bundles | None = None  # export and import (meshnode/bundles.py)
    leases: Leases | None = None  # ensure, and its leases (meshnode/leases.py)


@dataclass
class ApiParts:
    """What the API uses.  ``running`` is set once the node has started (until
    then the routes answer 503 ``STARTING``, ``/health`` excepted)."""

    node_id: str
    api_tokens: tuple[str, ...]
    scheme: str
    store: Store
    peer_gate: PeerGate
    refusals: Refusals
    generation: Callable[[], int]
    metrics: Callable[[], tuple[bytes, str]]
    not_ready: Callable[[], str | None] = lambda: None  # why the node is not ready; None when it is
    latency: RouteLatency = field(default_factory=RouteLatency)
    guard: ApiGuard = field(default_factory=ApiGuard)  # Host, Origin, body types, write rate
    running: Running | None = None
    takes_datagrams: bool = False  # its UDP port is bound: peer route 204s say so (``protocol.peerdgram``)

    def live(self) -> Running:
        """The running parts, or 503 ``STARTING`` while the node starts."""
        if self.running is None:
            raise MeshError("STARTING", "the node is still starting")
        return self.running

    def optional(self, name: str) -> Any:
        """A running part the node may run without (``bundles``, ``leases``): 501 ``NOT_SUPPORTED`` when absent."""
        part = getattr(self.live(), name)
        if part is None:
            raise MeshError("NOT_SUPPORTED", f"this node runs no {name}")
        return part
