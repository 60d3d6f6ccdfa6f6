"""A bundle's header and names: what it holds (``BundleHeader``, one
``BundleModel`` a model), the entry names its files and sums go under, and
the sums' text (``sha256sum`` format).  The stream around them: ``tar``,
``writer``, ``parser``; the theory of operation: ``protocol.bundle``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidName, LocalProtocolError, RemoteProtocolError
from ..manifest import MANIFEST_MAX_BYTES, Manifest
from ..names import validate_model_name
from ..registry import InvalidInput, parse_registration

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_VERSION",
    "HEADER_MAX_BYTES",
    "HEADER_NAME",
    "MODELS_MAX",
    "MODELS_PREFIX",
    "REGISTRATION_KEYS",
    "BadBundle",
    "BundleHeader",
    "BundleModel",
    "BundleTruncated",
    "file_entry_name",
    "parse_sums",
    "sums_bytes",
    "sums_entry_name",
    "sums_text",
]

BUNDLE_FORMAT = "meshnode-bundle"
BUNDLE_VERSION = 1
HEADER_NAME = "meshnode-bundle.json"
MODELS_PREFIX = "models/"
MODELS_MAX = 64  # models in one bundle
# The header holds each model's manifest (at most MANIFEST_MAX_BYTES, base64: 4/3 of it).
HEADER_MAX_BYTES = 64 * 1024 * 1024
REGISTRATION_KEYS = frozenset({"model_type", "source_url", "metadata"})
_SUM_LINE = re.compile(rb"([0-9a-f]{64})  (.+)\n")


class BadBundle(RemoteProtocolError):
    """The bytes are not a bundle this reader takes, or not the bundle they say they are."""


class BundleTruncated(BadBundle):
    """The stream stopped before the bundle's end."""


# -- the header ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BundleModel:
    """One model of a bundle: its name, its manifest, and the registration it had
    (``model_type``, ``source_url``, ``metadata``; None when it had none)."""

    name: str
    manifest: Manifest
    registration: Mapping[str, Any] | None = None

    @property
    def manifest_hash(self) -> str:
        return self.manifest.hash

    def to_value(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "manifest_hash": self.manifest.hash,
            "manifest": base64.b64encode(self.manifest.encode()).decode("ascii"),
            "total_bytes": self.manifest.total_bytes,
            "files": len(self.manifest.files),
            "registration": None if self.registration is None else dict(self.registration),
        }


@dataclass(frozen=True, slots=True)
class BundleHeader:
    """What a bundle holds, in the order its entries come."""

    models: tuple[BundleModel, ...]
    created_by: str = ""
    created_ms: int = 0

    def __post_init__(self) -> None:
        if not 1 <= len(self.models) <= MODELS_MAX:
            raise LocalProtocolError(f"a bundle holds 1 to {MODELS_MAX} models, not {len(self.models)}")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise LocalProtocolError("a bundle names each model once")

    @property
    def total_bytes(self) -> int:
        return sum(m.manifest.total_bytes for m in self.models)

    def encode(self) -> bytes:
        return json.dumps({"format": BUNDLE_FORMAT, "v": BUNDLE_VERSION, "created_by": self.created_by,
                           "created_ms": self.created_ms, "models": [m.to_value() for m in self.models]},
                          separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    @classmethod
    def decode(cls, data: bytes) -> BundleHeader:
        """The header a bundle's first entry holds; ``BadBundle`` for anything else."""
        try:
            raw = json.loads(data)
        except (ValueError, RecursionError):
            raise BadBundle(f"{HEADER_NAME} is not JSON") from None
        if not isinstance(raw, dict) or raw.get("format") != BUNDLE_FORMAT:
            raise BadBundle(f"{HEADER_NAME} does not describe a {BUNDLE_FORMAT}")
        if raw.get("v") != BUNDLE_VERSION:
            raise BadBundle(f"bundle version {str(raw.get('v'))[:20]} is not one this node reads ({BUNDLE_VERSION})")
        models_raw = raw.get("models")
        if not isinstance(models_raw, list) or not 1 <= len(models_raw) <= MODELS_MAX:
            raise BadBundle(f"a bundle lists 1 to {MODELS_MAX} models")
        created_by, created_ms = raw.get("created_by", ""), raw.get("created_ms", 0)
        if not isinstance(created_by, str) or len(created_by) > 200:
            raise BadBundle("created_by is a short string")
        if type(created_ms) is not int or not 0 <= created_ms < 2**63:
            raise BadBundle("created_ms is a time in milliseconds")
        models = tuple(_model_of(m) for m in models_raw)
        try:
            return cls(models, created_by, created_ms)
        except LocalProtocolError as e:
            raise BadBundle(str(e)) from None


def _model_of(raw: Any) -> BundleModel:
    if not isinstance(raw, dict):
        raise BadBundle("each model of a bundle is an object")
    try:
        name = validate_model_name(raw.get("name"))
    except InvalidName as e:
        raise BadBundle(f"a model of the bundle: {e}") from None
    mhash, text = raw.get("manifest_hash"), raw.get("manifest")
    if not isinstance(mhash, str) or not isinstance(text, str) or len(text) > 2 * MANIFEST_MAX_BYTES:
        raise BadBundle(f"{name}: manifest_hash and manifest (base64) are strings")
    try:
        encoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadBundle(f"{name}: its manifest is not base64") from None
    try:
        manifest = Manifest.decode(encoded, expected_hash=mhash)
    except RemoteProtocolError as e:
        raise BadBundle(f"{name}: {e}") from None
    reg = raw.get("registration")
    if reg is not None:
        if not isinstance(reg, dict) or set(reg) - REGISTRATION_KEYS:
            raise BadBundle(f"{name}: a registration holds only {', '.join(sorted(REGISTRATION_KEYS))}")
        try:
            parse_registration(reg)
        except InvalidInput as e:
            raise BadBundle(f"{name}: its registration: {e.message}") from None
    return BundleModel(name, manifest, reg)


# -- entry names and sums ------------------------------------------------------------------


def file_entry_name(model: str, manifest_hash: str, path: str) -> str:
    return f"{MODELS_PREFIX}{model}/@{manifest_hash}/{path}"


def sums_entry_name(model: str, manifest_hash: str) -> str:
    return f"{MODELS_PREFIX}{model}/@{manifest_hash}.sha256"


def sums_text(manifest: Manifest, sums: Mapping[str, str]) -> bytes:
    """The sums entry's content: ``<sha256>  <path>`` a line, in manifest order."""
    return b"".join(f"{sums[f.path]}  {f.path}\n".encode() for f in manifest.files)


def sums_bytes(manifest: Manifest) -> int:
    """The exact size of a model's sums entry (known before any sha256 is)."""
    return sum(64 + 2 + len(f.path.encode("utf-8")) + 1 for f in manifest.files)


def parse_sums(manifest: Manifest, data: bytes) -> dict[str, str]:
    """A sums entry's lines, checked against the manifest: one a file, in its order."""
    out: dict[str, str] = {}
    pos = 0
    for f in manifest.files:
        end = data.find(b"\n", pos)
        m = _SUM_LINE.fullmatch(data, pos, end + 1) if end >= 0 else None
        if m is None or m.group(2) != f.path.encode("utf-8"):
            raise BadBundle(f"the sums do not list {f.path[:100]!r} where its manifest puts it")
        out[f.path] = m.group(1).decode("ascii")
        pos = end + 1
    if pos != len(data):
        raise BadBundle("the sums list more files than the manifest")
    return out
