"""Names: models, nodes and devices.

Model names follow Hugging Face repo ids: ``name`` or ``owner/name``, at most
one ``/``, no path tricks (``..``, a leading ``/``), no control characters,
at most ``MODEL_NAME_MAX`` characters.  Devices are ``node:disk``,
``node:dram``, ``node:gpuN`` or ``web`` (an outside source), the gswarm
convention.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

from .errors import InvalidName

__all__ = [
    "ADDRESS_MAX",
    "DEVICE_KIND_PATTERN",
    "GPU_KIND_PATTERN",
    "MODEL_NAME_MAX",
    "NODE_ID_MAX",
    "NODE_ID_PATTERN",
    "RESERVED_SEGMENTS",
    "SEGMENT_PATTERN",
    "Device",
    "parse_device",
    "split_address",
    "validate_address",
    "validate_model_name",
    "validate_node_id",
]

MODEL_NAME_MAX = 200
NODE_ID_MAX = 64
ADDRESS_MAX = 261  # a 253-character host name, ':' and a 5-digit port, or [IPv6]:port

# The rules as regular expressions, unanchored, in the syntax both Python and
# JSON Schema (ECMA-262) read alike: /openapi.json builds its patterns from them.
SEGMENT_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"  # one segment of a model name (and no '..')
NODE_ID_PATTERN = rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{NODE_ID_MAX - 1}}}"  # a node id (and no '..')
GPU_KIND_PATTERN = r"gpu(0|[1-9][0-9]{0,2})"  # a GPU's kind
DEVICE_KIND_PATTERN = rf"(disk|dram|{GPU_KIND_PATTERN})"  # what follows node: in a device

_SEGMENT = re.compile(SEGMENT_PATTERN + r"\Z")
_NODE_ID = re.compile(NODE_ID_PATTERN + r"\Z")
_DEVICE_KIND = re.compile(DEVICE_KIND_PATTERN + r"\Z")
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_PORT = re.compile(r"[1-9][0-9]{0,4}\Z")
_IPV4ISH = re.compile(r"[0-9.]+\Z")


# The API's sub-resources of a model (``/models/<name>/<sub>``): the second
# segment of an owner/name model may not be one, or ``/models/acme/copy``
# would mean both the model ``acme/copy`` and copying ``acme``.
RESERVED_SEGMENTS = frozenset({"copy", "download", "locations", "move", "pin", "register", "serve", "services"})


def validate_model_name(name: object) -> str:
    """Return ``name`` if it is a valid model name, else raise ``InvalidName``."""
    if not isinstance(name, str):
        raise InvalidName("model name must be a string")
    if not name:
        raise InvalidName("model name is empty")
    if len(name) > MODEL_NAME_MAX:
        raise InvalidName(f"model name is longer than {MODEL_NAME_MAX} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise InvalidName("model name contains control characters")
    if name.startswith("/"):
        raise InvalidName("model name must not start with '/'")
    parts = name.split("/")
    if len(parts) > 2:
        raise InvalidName("model name may contain at most one '/' (owner/name)")
    for part in parts:
        if part in ("", ".", ".."):
            raise InvalidName(f"model name has an empty or relative segment: {part!r}")
        if ".." in part:
            raise InvalidName("model name must not contain '..'")
        if not _SEGMENT.match(part):
            raise InvalidName(
                "model name segments use letters, digits, '.', '_' and '-' and start "
                "with a letter or digit"
            )
    if len(parts) == 2 and parts[1] in RESERVED_SEGMENTS:
        raise InvalidName(
            f"model name {name!r} ends in {parts[1]!r}, which the API reserves for a model's "
            f"sub-resources ({', '.join(sorted(RESERVED_SEGMENTS))})"
        )
    return name


def validate_node_id(node_id: object) -> str:
    """Return ``node_id`` if valid (1-64 of letters, digits, '.', '_', '-')."""
    if not isinstance(node_id, str) or not node_id:
        raise InvalidName("node id must be a non-empty string")
    if len(node_id) > NODE_ID_MAX:
        raise InvalidName(f"node id is longer than {NODE_ID_MAX} characters")
    if not _NODE_ID.match(node_id) or ".." in node_id:
        raise InvalidName(
            "node id uses letters, digits, '.', '_' and '-' and starts with a letter or digit"
        )
    return node_id


@dataclass(frozen=True, slots=True)
class Device:
    """A place a model copy can live: ``node:kind`` or the outside ``web``."""

    node_id: str | None  # None for "web"
    kind: str  # "disk", "dram", "gpuN" or "web"

    @property
    def is_web(self) -> bool:
        return self.node_id is None

    @property
    def gpu_index(self) -> int | None:
        if self.kind.startswith("gpu"):
            return int(self.kind[3:])
        return None

    def __str__(self) -> str:
        return "web" if self.node_id is None else f"{self.node_id}:{self.kind}"


def parse_device(text: object) -> Device:
    """Parse ``node:disk``, ``node:dram``, ``node:gpuN`` or ``web``."""
    if not isinstance(text, str):
        raise InvalidName("device must be a string")
    if text == "web":
        return Device(None, "web")
    node, sep, kind = text.rpartition(":")
    if not sep:
        raise InvalidName(
            f"bad device name {text[:80]!r}: expected node:disk, node:dram, node:gpuN or web"
        )
    validate_node_id(node)
    if not _DEVICE_KIND.match(kind):
        raise InvalidName(
            f"bad device kind {kind[:20]!r} in {text[:80]!r}: expected disk, dram or gpuN"
        )
    return Device(node, kind)


def split_address(text: object) -> tuple[str, int]:
    """``(host, port)`` of a peer address, else ``InvalidName``.

    An address is ``HOST:PORT``: HOST is a DNS name (RFC 1123 labels of
    letters, digits and inner hyphens, at most 253 characters, a last label
    that is not all digits), a dotted IPv4 address, or an IPv6 address in
    brackets (``[::1]:7420``, no zone); PORT is 1 to 65535 with no leading
    zero.  The host is returned without brackets.  Everything a peer or a flag
    gives as an address passes here before any socket or URL is built from it,
    so that a forged ``999.1.1.1:80`` or ``host:abc`` is refused where it
    enters, not where an HTTP client chokes on it.
    """
    if not isinstance(text, str):
        raise InvalidName("address must be a string")
    return _split_address(text)


@functools.lru_cache(maxsize=8192)
def _split_address(text: str) -> tuple[str, int]:
    # Cached: every member record of every peer message carries an address, and
    # a mesh has as many distinct ones as members (errors are raised, not cached).
    if not text or len(text) > ADDRESS_MAX:
        raise InvalidName(f"address must be 1 to {ADDRESS_MAX} characters")
    shown = repr(text[:80])
    host, sep, port = text.rpartition(":")
    if not sep or not _PORT.match(port) or int(port) > 65535:
        raise InvalidName(f"bad address {shown}: expected HOST:PORT with a port from 1 to 65535")
    if host.startswith("["):
        if not host.endswith("]") or "%" in host:
            raise InvalidName(f"bad address {shown}: an IPv6 host is written [addr]:port, without a zone")
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise InvalidName(f"bad address {shown}: {host} is not an IPv6 address") from None
        return host[1:-1], int(port)
    if _IPV4ISH.match(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise InvalidName(f"bad address {shown}: {host[:40]!r} is not an IPv4 address") from None
        return host, int(port)
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL.match(label) for label in labels) or labels[-1].isdigit():
        raise InvalidName(
            f"bad address {shown}: the host must be a DNS name (letters, digits, inner '-', "
            "dot-separated), an IPv4 address or [IPv6]"
        )
    return host, int(port)


def validate_address(text: object) -> str:
    """Return ``text`` if it is a valid ``HOST:PORT`` peer address (see ``split_address``)."""
    split_address(text)
    assert isinstance(text, str)
    return text
