"""Copy, move, download and delete: validated on the node that takes the
request, run on the node that must do the work (the target of a copy, the
holder of a copy to delete), handed over through the peer route
``POST /mesh/v1/actions``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import httpx
import trio

from protocol import parse_device, validate_model_name
from protocol.names import Device

from .errors import MeshError
from .ingest import hf_repo
from .sources.guard import confine_path, resolve_public
from .store import TIERS
from .transfer import XFER_PREFIX

if TYPE_CHECKING:
    from .node import MeshNode

__all__ = ["handle_action", "request_copy", "request_delete_copy", "request_download", "transfers_json"]


def _device(text: Any, what: str) -> Device:
    try:
        d = parse_device(text)
    except ValueError as e:
        raise MeshError("INVALID_DEVICE", f"{what}: {e}") from None
    return d


def _store_device(node: MeshNode, d: Device, what: str) -> None:
    if d.is_web or d.kind not in TIERS:
        raise MeshError("INVALID_DEVICE", f"{what} must be node:disk or node:dram, not {d}")
    g = node.gossip
    assert g is not None and d.node_id is not None
    m = g.members.get(d.node_id)
    if m is None:
        raise MeshError("NODE_NOT_FOUND", f"{what} names node {d.node_id!r}, which the mesh does not know")
    if not m.state.reachable:
        raise MeshError("NODE_UNAVAILABLE", f"{what} names node {d.node_id!r}, which is {m.state.label}")


def _body(body: Any, allowed: set[str]) -> dict[str, Any]:
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise MeshError("INVALID_REQUEST", "request body must be a JSON object")
    unknown = set(body) - allowed
    if unknown:
        raise MeshError("INVALID_REQUEST", f"unknown fields: {', '.join(sorted(unknown))[:200]}")
    return body


def _copy_on(node: MeshNode, model: str, device: Device) -> str | None:
    """The manifest hash of ``model``'s copy on ``device``, from the catalog."""
    g = node.gossip
    assert g is not None and device.node_id is not None
    v = g.catalog.get(device.node_id, f"copy/{model}@{device.kind}")
    if isinstance(v, dict) and isinstance(v.get("manifest_hash"), str):
        return str(v["manifest_hash"])
    return None


async def _run_on(node: MeshNode, node_id: str, action: dict[str, Any]) -> dict[str, Any]:
    if node_id == node.cfg.node_id:
        return await handle_action(node, action)
    return await node.forward_action(node_id, action)


async def request_copy(node: MeshNode, name: str, raw: Any, *, move: bool) -> dict[str, Any]:
    svc = node.service
    assert svc is not None
    mv = svc.model(name)
    body = _body(raw, {"from_device", "to_device", "keep_source", "priority"})
    if "to_device" not in body:
        raise MeshError("INVALID_REQUEST", "to_device is required")
    to = _device(body["to_device"], "to_device")
    _store_device(node, to, "to_device")
    keep = body.get("keep_source", not move)
    if not isinstance(keep, bool):
        raise MeshError("INVALID_REQUEST", "keep_source must be true or false")
    if move:
        keep = False
    src: Device | None = None
    manifest_hash = None
    if body.get("from_device") is not None:
        src = _device(body["from_device"], "from_device")
        if src.is_web:
            raise MeshError("INVALID_DEVICE", "from_device 'web' is a download: use POST /models/{name}/download")
        if str(src) == str(to):
            raise MeshError("SAME_DEVICE", f"{to} is both source and target: nothing to {'move' if move else 'copy'}")
        manifest_hash = _copy_on(node, mv.name, src)
        if manifest_hash is None:
            raise MeshError("COPY_NOT_FOUND", f"{src} holds no copy of {mv.name!r}")
        _store_device(node, src, "from_device")
    elif move:
        raise MeshError("INVALID_REQUEST", "a move needs from_device")
    elif not mv.copies:
        raise MeshError("COPY_NOT_FOUND", f"no node holds a copy of {mv.name!r}")
    assert to.node_id is not None
    return await _run_on(node, to.node_id, {
        "op": "transfer", "model": mv.name, "kind": to.kind,
        "source": str(src) if src else None, "manifest_hash": manifest_hash, "keep_source": keep,
    })


async def request_download(node: MeshNode, name: str, raw: Any) -> dict[str, Any]:
    body = _body(raw, {"source", "source_url", "target_device", "priority", "revision", "allow_patterns", "ignore_patterns"})
    source = body.get("source", "web")
    if "target_device" not in body:
        raise MeshError("INVALID_REQUEST", "target_device is required")
    if source != "web":
        return await request_copy(node, name, {"from_device": source, "to_device": body["target_device"]}, move=False)
    name = _name(name)
    url = body.get("source_url")
    if not isinstance(url, str) or not url:
        svc = node.service
        assert svc is not None
        mv = svc.index.get(name)
        url = mv.source_url if mv is not None else None
    if not isinstance(url, str) or not url:
        if "/" not in name:
            raise MeshError("INVALID_REQUEST", "source_url is required (or register the model with one)")
        url = f"hf://{name}"  # an owner/name model with no URL is a Hugging Face repo id
    to = _device(body["target_device"], "target_device")
    _store_device(node, to, "target_device")
    parsed = urlparse(url)
    if parsed.scheme == "file" or (parsed.scheme == "" and url.startswith("/")):
        path = unquote(parsed.path) if parsed.scheme == "file" else url
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise MeshError("INVALID_REQUEST", "file:// URLs name a path on the target node: file:///path")
        assert to.node_id is not None
        return await _run_on(node, to.node_id, {"op": "ingest", "model": name, "kind": to.kind, "path": path, "source_url": url})
    if parsed.scheme in ("http", "https", "hf"):
        options: dict[str, Any] = {}
        rev = body.get("revision")
        if rev is not None:
            if not isinstance(rev, str) or not 0 < len(rev) <= 256:
                raise MeshError("INVALID_REQUEST", "revision must be a branch, tag or commit")
            options["revision"] = rev
        for k in ("allow_patterns", "ignore_patterns"):
            v = body.get(k)
            if v is not None:
                if isinstance(v, str):
                    v = [v]
                if not isinstance(v, list) or len(v) > 64 or not all(isinstance(x, str) and 0 < len(x) <= 256 for x in v):
                    raise MeshError("INVALID_REQUEST", f"{k} must be a list of glob patterns")
                options[k] = v
        if len(url) > 2048:
            raise MeshError("INVALID_REQUEST", "source_url is too long")
        assert to.node_id is not None
        return await _run_on(node, to.node_id, {"op": "fetch", "model": name, "kind": to.kind, "source_url": url, "options": options})
    raise MeshError("INVALID_REQUEST", f"cannot download from {parsed.scheme or 'this'} URLs: use hf://, https://, file:// or a node:device source")


def _name(name: Any) -> str:
    try:
        return validate_model_name(name)
    except ValueError as e:
        raise MeshError("INVALID_MODEL_NAME", str(e)) from None


async def request_delete_copy(node: MeshNode, name: str, device: str) -> dict[str, Any] | None:
    """Delete a real copy on ``device`` (wherever it is); None when there is none."""
    d = _device(device, "device")
    if d.is_web or d.kind not in TIERS:
        return None
    if _copy_on(node, _name(name), d) is None:
        return None
    assert d.node_id is not None
    return await _run_on(node, d.node_id, {"op": "delete_copy", "model": _name(name), "kind": d.kind})


async def handle_action(node: MeshNode, action: Any) -> dict[str, Any]:
    """Run an action handed to this node (by ourselves or a peer); peers' input is checked."""
    if not isinstance(action, dict):
        raise MeshError("INVALID_REQUEST", "an action is a JSON object")
    op = action.get("op")
    model = _name(action.get("model"))
    kind = action.get("kind")
    if kind not in TIERS:
        raise MeshError("INVALID_DEVICE", f"this node has no device {str(kind)[:20]!r}")
    try:
        if op == "transfer":
            source = action.get("source")
            mh = action.get("manifest_hash")
            keep = action.get("keep_source", True)
            if source is not None:
                _device(source, "source")
            if mh is not None and (not isinstance(mh, str) or len(mh) != 32):
                raise MeshError("INVALID_REQUEST", "bad manifest_hash")
            t = node.transfers.start(model, kind, source, mh, bool(keep))
            return t.public(node.cfg.node_id)
        if op == "ingest":
            path = action.get("path")
            if not isinstance(path, str) or not path.startswith("/") or len(path) > 4096 or "\x00" in path:
                raise MeshError("INVALID_REQUEST", "ingest needs an absolute path")
            # Confined first: a path outside the roots is refused whether or not it exists.
            real = await trio.to_thread.run_sync(confine_path, path, node.cfg.ingest_roots)
            if not await trio.to_thread.run_sync(real.exists):
                raise MeshError("SOURCE_NOT_FOUND", f"{path} does not exist on {node.cfg.node_id}")
            t = node.transfers.start(model, kind, "file://" + path, None, True)
            return t.public(node.cfg.node_id)
        if op == "fetch":
            url = action.get("source_url")
            options = action.get("options") or {}
            if not isinstance(url, str) or not url.startswith(("http://", "https://", "hf://")) or not isinstance(options, dict):
                raise MeshError("INVALID_REQUEST", "fetch needs an http(s) or hf:// source_url")
            if not node.cfg.allow_private_sources and hf_repo(url) is None:
                u = httpx.URL(url)
                # A clear refusal now; the download checks every hop again.
                await resolve_public(u.host, u.port or (443 if u.scheme == "https" else 80))
            t = node.transfers.start(model, kind, url, None, True, options)
            return t.public(node.cfg.node_id)
        if op == "delete_copy":
            deleted = await node.delete_copy_local(model, kind)
            if not deleted:
                raise MeshError("COPY_NOT_FOUND", f"{node.cfg.node_id}:{kind} holds no copy of {model!r}")
            return {"model_name": model, "device": f"{node.cfg.node_id}:{kind}", "deleted": True}
    except httpx.InvalidURL as e:
        raise MeshError("INVALID_REQUEST", f"bad source_url: {e}") from None
    raise MeshError("INVALID_REQUEST", f"unknown action {str(op)[:40]!r}")


def _from_catalog(nid: str, key: str, value: dict[str, Any]) -> dict[str, Any]:
    tid = key[len(XFER_PREFIX):]
    return {"transfer_id": tid, "node_id": nid, "target_device": f"{nid}:{value.get('kind')}", **value}


def transfers_json(node: MeshNode) -> list[dict[str, Any]]:
    """Every transfer the catalog knows of, this node's from its live state."""
    g = node.gossip
    assert g is not None
    out: dict[str, dict[str, Any]] = {}
    for nid, key, value in g.catalog.items(XFER_PREFIX):
        if isinstance(value, dict):
            t = _from_catalog(nid, key, value)
            out[t["transfer_id"]] = t
    for local in node.transfers.by_id.values():
        out[local.id] = local.public(node.cfg.node_id)
    return sorted(out.values(), key=lambda x: (x.get("started_ms") or 0, x["transfer_id"]))


def transfer_json(node: MeshNode, tid: str) -> dict[str, Any] | None:
    """One transfer: this node's from its live state, else the first catalog
    entry with that key (ids are random: one node has it)."""
    local = node.transfers.by_id.get(tid)
    if local is not None:
        return local.public(node.cfg.node_id)
    g = node.gossip
    assert g is not None
    for nid, st in g.catalog.nodes.items():
        e = st.keys.get(XFER_PREFIX + tid)
        if e is not None and not e.tombstone and isinstance(e.value, dict):
            return _from_catalog(nid, XFER_PREFIX + tid, e.value)
    return None
