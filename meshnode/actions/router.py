"""The router: takes copy, move, download and delete requests on any node,
checks them, and runs each on the node that must do the work (a copy on its
target, a delete on the node that holds the copy): here through the
executors, elsewhere through the peer route (``POST /mesh/v1/actions``).
A copy or download comes typed (``requests.py``: ``start_copy``,
``start_download``); the router checks what needs the mesh, and builds the
action.

An action handed over names the node it is for (``"node": <id>`` beside the
action's fields), and is signed for that node's id and generation
(``protocol.peerauth``); a node refuses an action naming another node
(421 ``WRONG_NODE``), so that neither the body nor its signature can be
spent elsewhere.

A puller that banned a holder for a bad chunk tells it
(``report_bad_chunk``: a ``verify_copy`` action, sent in the background,
at most ``REPORTS_MAX`` waiting, each once), so that the holder reads its
copy again at once instead of serving bad bytes until its next re-verify."""

from __future__ import annotations

import logging
from typing import Any

import trio

from protocol.actions import (
    TIERS,
    CopyOf,
    DeleteCopy,
    LocalPath,
    PeerAction,
    StartTransfer,
    VerifyCopy,
    Web,
    decode_action,
    encode_action,
)
from protocol.keys import CopyRecord, RecordError, copy_key
from protocol.names import Device
from protocol.peerauth import Recipient
from protocol.registry import InvalidInput
from protocol.sources import InvalidSource, classify

from ..errors import MeshError
from ..mesh import Mesh
from ..peers import PeerClient
from ..registry import Registry, model_name
from .executors import Executors
from .requests import CopyRequest, DownloadRequest, as_device

__all__ = ["Router"]

log = logging.getLogger("meshnode.actions")

REPORTS_MAX = 64  # bad-chunk reports waiting to be sent; more are dropped (the holder's re-verify finds it in time)
REPORT_TIMEOUT_S = 10.0
PURGE_TIMEOUT_S = 10.0  # per holder asked to delete its copy at once
PURGE_DEVICES_MAX = 256  # asked at once; the rest delete theirs when the purge reaches them


class Router:
    def __init__(self, mesh: Mesh, registry: Registry, executors: Executors, peers: PeerClient) -> None:
        self.mesh = mesh
        self.registry = registry
        self.executors = executors
        self.peers = peers
        self._reports_in, self._reports_out = trio.open_memory_channel[tuple[str, VerifyCopy]](REPORTS_MAX)
        self._reporting: set[tuple[str, str, str]] = set()  # (node, model, manifest hash) queued or being sent

    # -- where an action runs ----------------------------------------------------------

    async def run_on(self, node_id: str, action: PeerAction) -> dict[str, Any]:
        """Run ``action`` on ``node_id``: here, or handed over; its answer, or a ``MeshError``."""
        if node_id == self.mesh.id:
            return await self.executors.run(action)
        m = self.mesh.member(node_id)
        if m is None:
            raise MeshError("NODE_NOT_FOUND", f"no node {node_id!r} is known to the mesh")
        if not m.state.reachable:
            raise MeshError("NODE_UNAVAILABLE", f"node {node_id!r} is {m.state.label}")
        body = {**encode_action(action), "node": node_id}
        return await self.peers.post_action(Recipient(node_id, m.record.generation), m.record.address, body)

    async def handle_peer(self, raw: Any) -> dict[str, Any]:
        """An action a peer handed us: decoded and checked once, run only
        when it names this node."""
        node = None
        if isinstance(raw, dict):
            raw = dict(raw)
            node = raw.pop("node", None)
        try:
            action = decode_action(raw)
        except InvalidInput as e:
            raise MeshError(e.code, e.message) from None
        if not isinstance(node, str):
            raise MeshError("INVALID_REQUEST", 'an action names the node it is for: "node": "<node id>"')
        if node != self.mesh.id:
            raise MeshError("WRONG_NODE", f"this action is for node {node[:80]!r}; this is node {self.mesh.id!r}")
        return await self.executors.run(action)

    # -- bad chunks: the holder hears of them ----------------------------------------------

    def report_bad_chunk(self, node_id: str, model: str, manifest_hash: str, chunk: int) -> None:
        """Tell ``node_id`` (in the background) that chunk ``chunk`` of its copy
        of ``model`` did not match and it was banned for it.  Never blocks."""
        key = (node_id, model, manifest_hash)
        if node_id == self.mesh.id or key in self._reporting:
            return
        try:
            self._reports_in.send_nowait((node_id, VerifyCopy(model, manifest_hash, chunk)))
        except trio.WouldBlock:
            log.info("not telling %s of its bad chunk of %s: too many reports waiting", node_id, model)
            return
        self._reporting.add(key)

    async def run_reports(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for node_id, action in self._reports_out:
            try:
                with trio.fail_after(REPORT_TIMEOUT_S):
                    out = await self.run_on(node_id, action)
                log.info("told %s that chunk %d of its copy of %s is bad; it reads again: %.200s", node_id,
                         action.chunk, action.model, out.get("verifying"))
            except (MeshError, trio.TooSlowError) as e:
                log.info("could not tell %s that chunk %d of its copy of %s is bad: %s", node_id, action.chunk,
                         action.model, e if isinstance(e, MeshError) else "no answer in time")
            finally:
                self._reporting.discard((node_id, action.model, action.manifest_hash))

    # -- requests ----------------------------------------------------------------------

    def _store_device(self, d: Device, what: str) -> None:
        if d.is_web or d.kind not in TIERS:
            raise MeshError("INVALID_DEVICE", f"{what} must be node:disk or node:dram, not {d}")
        assert d.node_id is not None
        m = self.mesh.member(d.node_id)
        if m is None:
            raise MeshError("NODE_NOT_FOUND", f"{what} names node {d.node_id!r}, which the mesh does not know")
        if not m.state.reachable:
            raise MeshError("NODE_UNAVAILABLE", f"{what} names node {d.node_id!r}, which is {m.state.label}")

    def _copy_on(self, model: str, device: Device) -> str | None:
        """The manifest hash of ``model``'s copy on ``device``, from the catalog."""
        assert device.node_id is not None
        try:
            return CopyRecord.from_value(self.mesh.get(device.node_id, copy_key(model, device.kind))).manifest_hash
        except RecordError:
            return None

    async def start_copy(self, name: str, req: CopyRequest, *, move: bool) -> dict[str, Any]:
        """Copy (``move``: move) ``name`` as ``req`` says, on the target's node: the transfer's answer."""
        mv = self.registry.model(name)
        to = req.to_device
        self._store_device(to, "to_device")
        keep = (not move) if req.keep_source is None else req.keep_source
        # A move that keeps its source is a copy (gswarm's pipelines write it so): it
        # says so in its answer, never a silent delete.
        kept_by_move = move and keep
        src = req.from_device
        manifest_hash = None
        if src is not None:
            if src.is_web:
                raise MeshError("INVALID_DEVICE", "from_device 'web' is a download: use POST /models/{name}/download")
            if str(src) == str(to):
                raise MeshError("SAME_DEVICE", f"{to} is both source and target: nothing to {'move' if move else 'copy'}")
            manifest_hash = self._copy_on(mv.name, src)
            if manifest_hash is None:
                raise MeshError("COPY_NOT_FOUND", f"{src} holds no copy of {mv.name!r}")
            self._store_device(src, "from_device")
        elif move:
            raise MeshError("INVALID_REQUEST", "a move needs from_device")
        elif not mv.copies:
            raise MeshError("COPY_NOT_FOUND", f"no node holds a copy of {mv.name!r}")
        assert to.node_id is not None
        action = StartTransfer(mv.name, to.kind, CopyOf(str(src) if src else None), manifest_hash, keep)
        out = await self.run_on(to.node_id, action)
        if kept_by_move:
            out["note"] = "keep_source: true makes this move a copy: the source stays"
        return out

    async def start_download(self, name: str, req: DownloadRequest) -> dict[str, Any]:
        """Fetch ``name`` from outside the mesh (or files on the target node) as
        ``req`` says, on the target's node: the transfer's answer."""
        name = model_name(name)
        url = req.source_url
        if not url:
            mv = self.registry.find(name)
            url = mv.source_url if mv is not None else None
        if not isinstance(url, str) or not url:
            if "/" not in name:
                raise MeshError("INVALID_REQUEST", "source_url is required (or register the model with one)")
            url = f"hf://{name}"  # an owner/name model with no URL is a Hugging Face repo id
        to = req.target_device
        self._store_device(to, "target_device")
        assert to.node_id is not None
        try:
            src = classify(url)
        except InvalidSource as e:
            raise MeshError("INVALID_REQUEST", str(e)) from None
        if src.path is not None:  # files on the target node
            return await self.run_on(to.node_id, StartTransfer(name, to.kind, LocalPath(src.path)))
        web = Web(url, req.revision, req.allow_patterns, req.ignore_patterns)  # outside: classify said so
        return await self.run_on(to.node_id, StartTransfer(name, to.kind, web))

    async def delete_copy(self, name: str, device: str) -> dict[str, Any] | None:
        """Delete a real copy on ``device`` (wherever it is); None when there is none."""
        d = as_device(device, "device")
        if d.is_web or d.kind not in TIERS:
            return None
        model = model_name(name)
        if self._copy_on(model, d) is None:
            return None
        assert d.node_id is not None
        return await self.run_on(d.node_id, DeleteCopy(model, d.kind))

    async def purge_copies(self, model: str, devices: list[str]) -> tuple[list[str], list[dict[str, str]]]:
        """Ask each holder to delete its copy of ``model`` now: the devices
        freed, and those not yet (with why; each deletes its copy when the
        purge reaches it)."""
        deleted: list[str] = []
        pending: list[dict[str, str]] = []

        async def one(device: str) -> None:
            try:
                with trio.fail_after(PURGE_TIMEOUT_S):
                    await self.delete_copy(model, device)  # None: gone already (its node's sweep was first)
                deleted.append(device)
            except MeshError as e:
                if e.code == "COPY_NOT_FOUND":  # its node's own sweep deleted it first
                    deleted.append(device)
                    return
                pending.append({"device": device, "reason": f"{e.message}; it deletes its copy when the purge reaches it"})
            except trio.TooSlowError:
                pending.append({"device": device, "reason": "no answer in time; it deletes its copy when the purge reaches it"})

        async with trio.open_nursery() as nursery:
            for device in devices[:PURGE_DEVICES_MAX]:
                nursery.start_soon(one, device)
        for device in devices[PURGE_DEVICES_MAX:]:
            pending.append({"device": device, "reason": "deleted by its node when the purge reaches it"})
        return sorted(deleted), sorted(pending, key=lambda p: p["device"])

    async def delete_source(self, model: str, device: str) -> object:
        """A move's last step: delete the copy it moved from (``node:kind``)."""
        node_id, _, kind = device.partition(":")
        return await self.run_on(node_id, DeleteCopy(model, kind))
