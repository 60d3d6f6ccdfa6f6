"""Which HTTP requests a node takes at all: the ``Host`` it was addressed
by, the ``Origin`` of a write, and the type of a write's body.  Pure: the
daemon gives the request's headers and this node's policy, and acts on
the ``Refusal`` it gets back.

Theory of operation
-------------------
A node without API tokens (a home setup on loopback) trusts whoever can
reach it.  A web page in the user's browser can reach it too, in two ways:

* **cross-site requests** (CSRF): any page may POST to
  ``http://127.0.0.1:7420`` with a form or ``fetch``.  It cannot read the
  answer, but the write is done.  Every browser that has ``fetch`` sends an
  ``Origin`` header with a cross-site write, so a write whose ``Origin`` is
  not this node's own is refused (403 ``CROSS_ORIGIN``).  A form posted by
  a browser too old to send ``Origin`` can only carry one of the three body
  types a page may send without asking first (``text/plain``,
  ``application/x-www-form-urlencoded``, ``multipart/form-data``): a write
  whose ``Content-Type`` is not one its route takes is refused (415
  ``UNSUPPORTED_MEDIA_TYPE``).  The routes take JSON; ``/jobs/from-yaml``
  also takes YAML and a multipart form, and is covered by ``Origin`` alone.
  A write with no ``Content-Type`` (an empty ``DELETE``, a ``POST
  .../cancel``, a script's raw body) passes: no page can send a body
  without one, and a cross-site ``fetch`` carries ``Origin``.
* **DNS rebinding**: a page at ``http://attacker.example:7420`` makes its
  name resolve to 127.0.0.1; the page is then same-origin with the node
  and can read its answers.  The browser still sends ``Host:
  attacker.example``, so a node answers only names it knows: ``localhost``,
  the host it binds and the one it advertises, and those the operator lists
  (``--http-hosts``).  Any IP literal passes: a page addressed by an IP
  address has that address as its origin, so it is this node's own page,
  not a rebinding.  Refused: 421 ``HOST_NOT_ALLOWED``.

With API tokens a rebinding page has no token, so the ``Host`` rule is not
needed there: it applies only when ``HostPolicy.enforce`` says so (the
daemon sets it without tokens, or when ``--http-hosts`` is given).  The
``Origin`` and body-type rules always apply; they cost a client nothing.
``/health`` and ``/ready`` answer any ``Host`` (a kubelet's probe names
the pod's address), and the peer routes (``/mesh/``) have their own
signature and none of these rules.

``WriteLimiter`` bounds how fast one client writes: a token bucket per key
(a hash of the API token, or the client's address on a node without
tokens; ``limit_key``), at most ``keys_max`` keys, the idle ones evicted
first.  ``take(key, now)`` says how long to wait (0: go ahead).
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
from collections import OrderedDict
from dataclasses import dataclass

__all__ = [
    "OPEN_HOST_PATHS",
    "PEER_PREFIX",
    "SAFE_METHODS",
    "HostPolicy",
    "Refusal",
    "WriteLimiter",
    "body_types_for",
    "check_request",
    "content_type_allowed",
    "host_allowed",
    "is_write",
    "limit_key",
    "origin_allowed",
    "split_host",
]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
PEER_PREFIX = "/mesh/"
OPEN_HOST_PATHS = frozenset({"/health", "/ready"})  # probes name the pod's address
LOOPBACK_NAMES = frozenset({"localhost"})
JSON_TYPES = frozenset({"application/json"})
YAML_PATH = "/jobs/from-yaml"
YAML_TYPES = JSON_TYPES | {"application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml", "multipart/form-data"}
BUNDLE_PATH = "/bundles"  # an import: a tar stream (a type no page can send without asking first)
BUNDLE_TYPES = frozenset({"application/x-tar", "application/octet-stream"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
HEADER_CHARS_MAX = 1024  # a Host or Origin longer than this is refused unread
_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")  # a DNS name or an IPv4 address


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is refused: an error code (``meshnode.errors.STATUS``) and a message."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class HostPolicy:
    """The ``Host`` names a node answers besides loopback and IP literals
    (lowercase, no port), and whether the rule applies at all."""

    names: frozenset[str] = frozenset()
    enforce: bool = True

    @classmethod
    def of(cls, names: list[str] | tuple[str, ...], *, enforce: bool = True) -> HostPolicy:
        """From names as an operator writes them (``Mesh.Example.``, ``node1:7420``, ``[::1]``)."""
        out = set()
        for n in names:
            hp = split_host(n)
            if hp is not None:
                out.add(hp[0])
        return cls(frozenset(out), enforce)


def split_host(value: str) -> tuple[str, int | None] | None:
    """A ``Host`` header (``name``, ``name:port``, ``[v6]``, ``[v6]:port``) as
    its lowercase name without a trailing dot and its port; None when it is
    not one."""
    if not value or len(value) > HEADER_CHARS_MAX or not value.isascii():
        return None
    text = value.strip().lower()
    port_text = ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        name, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                return None
            port_text = rest[1:]
        try:
            if ipaddress.ip_address(name).version != 6:
                return None
        except ValueError:
            return None
    else:
        name, sep, port_text = text.partition(":")
        if sep and not port_text:
            return None
        if ":" in port_text:  # an IPv6 address without brackets is not a Host
            return None
    if name.endswith(".") and not text.startswith("["):
        name = name[:-1]  # the root's dot: "localhost." is "localhost"
    if not name or (not text.startswith("[") and _NAME.fullmatch(name) is None):
        return None
    port: int | None = None
    if port_text:
        if not port_text.isdigit() or len(port_text) > 5 or not 0 < int(port_text) < 65536:
            return None
        port = int(port_text)
    return name, port


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_allowed(host: str | None, policy: HostPolicy) -> bool:
    """Whether a request addressed to ``host`` (its ``Host`` header; None:
    it sent none, so it is no browser's) is answered."""
    if host is None or not policy.enforce:
        return True
    hp = split_host(host)
    if hp is None:
        return False
    name = hp[0]
    return name in LOOPBACK_NAMES or name in policy.names or _is_ip(name)


def origin_allowed(origin: str, host: str | None, scheme: str) -> bool:
    """Whether ``origin`` is the origin a request to ``scheme://host`` has:
    the same scheme, name and port (a port left out is the scheme's default).
    ``null`` (a sandboxed frame, a file) is nobody's origin."""
    if host is None or len(origin) > HEADER_CHARS_MAX:
        return False
    o_scheme, sep, rest = origin.strip().lower().partition("://")
    if not sep or o_scheme != scheme.lower() or o_scheme not in _DEFAULT_PORTS:
        return False
    o = split_host(rest)
    h = split_host(host)
    if o is None or h is None:
        return False
    default = _DEFAULT_PORTS[o_scheme]
    return o[0] == h[0] and (o[1] or default) == (h[1] or default)


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def content_type_allowed(content_type: str | None, allowed: frozenset[str]) -> bool:
    """Whether a write's ``Content-Type`` is one its route takes (none at all is fine)."""
    if content_type is None or not content_type.strip():
        return True
    return _media_type(content_type) in allowed


def body_types_for(path: str) -> frozenset[str]:
    """The body types a write to ``path`` takes."""
    p = path.rstrip("/")
    return YAML_TYPES if p == YAML_PATH else BUNDLE_TYPES if p == BUNDLE_PATH else JSON_TYPES


def is_write(method: str, path: str) -> bool:
    """Whether a request is a write to a public route (what the rules and the rate limit are about)."""
    return method.upper() not in SAFE_METHODS and not path.startswith(PEER_PREFIX)


def check_request(
    method: str,
    path: str,
    *,
    host: str | None,
    origin: str | None,
    content_type: str | None,
    scheme: str,
    policy: HostPolicy,
) -> Refusal | None:
    """The refusal a public request gets from the rules above, or None."""
    if path.startswith(PEER_PREFIX):
        return None
    if path not in OPEN_HOST_PATHS and not host_allowed(host, policy):
        return Refusal("HOST_NOT_ALLOWED",
                       f"this node does not answer the name {(host or '')[:100]!r}: use localhost or its address, "
                       "or list the name with --http-hosts")
    if method.upper() in SAFE_METHODS:
        return None
    if origin is not None and not (origin_allowed(origin, host, scheme) and host_allowed(host, policy)):
        return Refusal("CROSS_ORIGIN",
                       f"a write from the web page at {origin[:100]!r} is refused: only this node's own origin "
                       "may write (the CLI and scripts send no Origin)")
    allowed = body_types_for(path)
    if not content_type_allowed(content_type, allowed):
        return Refusal("UNSUPPORTED_MEDIA_TYPE",
                       f"a body of type {_media_type(content_type or '')[:80]!r} is not taken here: send "
                       f"{' or '.join(sorted(allowed))} (Content-Type)")
    return None


def limit_key(token: str | None, remote: str) -> str:
    """The rate limit's key for a client: a hash of its API token (never the
    token itself), or its address when the node has no tokens."""
    if token:
        return "token:" + hashlib.sha256(token.encode()).hexdigest()[:32]
    return "addr:" + remote[:100]


class WriteLimiter:
    """A token bucket per key: ``rate_per_s`` writes a second, ``burst``
    at once.  At most ``keys_max`` keys are kept: a full bucket is
    forgotten first (it is the same as a new one), else the least recently
    used."""

    def __init__(self, rate_per_s: float, burst: float, keys_max: int = 10_000) -> None:
        if not (rate_per_s > 0 and math.isfinite(rate_per_s)):
            raise ValueError("rate_per_s must be a positive number")
        if not burst >= 1:
            raise ValueError("burst must be at least 1")
        if keys_max < 1:
            raise ValueError("keys_max must be at least 1")
        self.rate_per_s = rate_per_s
        self.burst = float(burst)
        self.keys_max = keys_max
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)
        self.refused = 0

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(self, key: str, now: float) -> float:
        found = self._buckets.get(key)
        if found is None:
            return self.burst
        tokens, at = found
        return min(self.burst, tokens + max(0.0, now - at) * self.rate_per_s)

    def take(self, key: str, now: float) -> float:
        """Take one write for ``key`` at ``now`` (seconds, any monotonic
        clock): 0.0 when it may go ahead, else the seconds until it may."""
        tokens = self._tokens(key, now)
        wait_s = 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate_per_s
        if wait_s:
            self.refused += 1
        self._buckets[key] = (tokens - 1.0 if not wait_s else tokens, now)
        self._buckets.move_to_end(key)
        if len(self._buckets) > self.keys_max:
            self._evict(now)
        return wait_s

    def _evict(self, now: float) -> None:
        """Forget every full bucket (the same as none), then the least recently used."""
        for k in [k for k in self._buckets if self._tokens(k, now) >= self.burst]:
            del self._buckets[k]
        while len(self._buckets) > self.keys_max:
            self._buckets.popitem(last=False)
