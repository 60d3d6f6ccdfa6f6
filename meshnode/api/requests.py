"""Request bodies parsed into typed requests, once, at the API's edge.

By the time a handler reads a body, the body was checked against its
route's JSON schema (``middleware.py``, ``validate.py``): the schema is the
one check of its shape, so these parsers only turn the JSON into the types
the router and the executors take.  What the schema cannot say (a serve's
GPUs share one node) is checked here; what needs the mesh (a node that is
up, a copy that exists) is checked by the router.  A body left out (None)
is not checked by the schema: each parser says what it lacks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocol.errors import InvalidName
from protocol.names import Device, parse_device
from protocol.pipeline import parse_step_device

from ..actions.requests import CopyRequest, DownloadRequest
from ..errors import MeshError

__all__ = [
    "CatalogEntry", "ServeRequest", "catalog_entry", "copy_request", "download_request", "gpu_devices",
    "gswarm_serve_request", "serve_request",
]

GPUS_MAX = 64
GSWARM_ENGINES = {"llamacpp": "llama.cpp", "llama_cpp": "llama.cpp"}  # gswarm's framework names


def _device(text: Any, what: str) -> Device:
    try:
        return parse_device(text)
    except InvalidName as e:
        raise MeshError("INVALID_DEVICE", f"{what}: {e}") from None


# -- copies --------------------------------------------------------------------------------------


def copy_request(body: Any) -> CopyRequest:
    """POST /models/{name}/copy and /move (``COPY_BODY``, ``MOVE_BODY``)."""
    if body is None:
        raise MeshError("INVALID_REQUEST", "to_device is required")
    src = body.get("from_device")
    return CopyRequest(_device(body["to_device"], "to_device"),
                       None if src is None else _device(src, "from_device"), body.get("keep_source"))


def download_request(body: Any) -> DownloadRequest | CopyRequest:
    """POST /models/{name}/download (``DOWNLOAD_BODY``): from the web (the
    default), or, when ``source`` names another node's copy (or null: any
    holder's), a copy."""
    if body is None:
        raise MeshError("INVALID_REQUEST", "target_device is required")
    source = body.get("source", "web")
    if source != "web":
        return CopyRequest(_device(body["target_device"], "to_device"),
                           None if source is None else _device(source, "from_device"))
    url = body.get("source_url")  # not a string, or empty: the registration's
    return DownloadRequest(_device(body["target_device"], "target_device"),
                           url if isinstance(url, str) and url else None, body.get("revision"),
                           _globs(body.get("allow_patterns")), _globs(body.get("ignore_patterns")))


def _globs(value: str | list[str] | None) -> tuple[str, ...] | None:
    """One glob pattern, or a list of them."""
    if value is None:
        return None
    return (value,) if isinstance(value, str) else tuple(value)


# -- services ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServeRequest:
    """Serve a model: on ``gpus`` of ``node``, or (gswarm's form) on each of
    ``target_nodes``, each on its freest GPU that fits."""

    config: dict[str, Any]
    port: int | None = None
    node: str | None = None
    gpus: tuple[int, ...] = ()
    target_nodes: tuple[str, ...] = ()  # each once, in the order given


def gpu_devices(raw: Any) -> tuple[str, tuple[int, ...]]:
    """A serve's devices: GPUs of one named node (``node:gpu`` is ``node:gpu0``)."""
    if not isinstance(raw, list) or not 0 < len(raw) <= GPUS_MAX:
        raise MeshError("INVALID_DEVICE", "device (or devices): node:gpuN, the GPUs of one node")
    nodes, gpus = set(), set()
    for text in raw:
        try:
            d = parse_step_device(text)
        except InvalidName as e:
            raise MeshError("INVALID_DEVICE", str(e)) from None
        if d.node is None or d.tier != "gpu" or not d.kind[3:].isdigit():
            raise MeshError("INVALID_DEVICE", f"{str(text)[:80]!r}: a serve runs on node:gpuN")
        nodes.add(d.node)
        gpus.add(int(d.kind[3:]))
    if len(nodes) != 1:
        raise MeshError("INVALID_DEVICE", "one service runs on one node: its GPUs share a node")
    return nodes.pop(), tuple(sorted(gpus))


def _serve_config(body: dict[str, Any]) -> dict[str, Any]:
    """The engine's config: gswarm's ``framework`` read as ``engine``, and an
    ``engine`` given beside the config put in it."""
    config: dict[str, Any] = body.get("config") or {}  # a value read as false is no config
    if "framework" in config:  # gswarm's name for the engine
        fw = config["framework"]
        config = {k: v for k, v in config.items() if k != "framework"}
        config["engine"] = GSWARM_ENGINES.get(fw, fw)
    if "engine" in body:
        config = {**config, "engine": body["engine"]}
    return config


def serve_request(body: Any) -> ServeRequest:
    """POST /models/{name}/services (``SERVE_BODY``)."""
    if body is None:
        raise MeshError("INVALID_REQUEST", "the body is a JSON object")
    config, port = _serve_config(body), body.get("port")
    if "target_nodes" in body:  # gswarm's form: the nodes; each its freest GPU that fits
        return ServeRequest(config, port, target_nodes=tuple(dict.fromkeys(body["target_nodes"])))
    node, gpus = gpu_devices(body["devices"] if "devices" in body else [body.get("device")])
    return ServeRequest(config, port, node, gpus)


def gswarm_serve_request(body: Any, node_id: str) -> ServeRequest:
    """POST /models/{name}/serve, gswarm's (``GSWARM_SERVE_BODY``): ``device``
    is ``gpuN`` of the node asked (``node_id``), or ``node:gpuN``."""
    if body is None:
        raise MeshError("INVALID_REQUEST", "the body is a JSON object")
    device = body.get("device")
    if isinstance(device, str) and ":" not in device:
        device = f"{node_id}:{device}"
    node, gpus = gpu_devices([device])
    return ServeRequest(_serve_config(body), body.get("port"), node, gpus)


# -- the v2 catalog ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """llama-orch's "add to the catalog": a model, the digest its copies must have, its source."""

    id: str
    digest: str | None = None
    source_url: str | None = None


def catalog_entry(body: Any) -> CatalogEntry:
    """POST /v2/catalog/models (``CATALOG_BODY``)."""
    if body is None:
        raise MeshError("INVALID_REQUEST", "body: {\"id\": model name, \"digest\": \"sha256:<hex>\", "
                                           "\"source_url\"}")
    return CatalogEntry(body["id"], body.get("digest"), body.get("source_url"))
