"""Where a pipeline's ``health_check`` may look, and which URL it fetches.

Theory of operation
-------------------
A ``health_check`` names a ``target_url``; the node that runs it fetches
that URL from where it stands in the network.  An API token must not turn
this into a scanner of that network (cloud metadata at 169.254.169.254, an
admin port on loopback), so what is fetched is decided here, purely, from
the URL and the mesh as the catalog shows it (``health_target``):

* the URL is read once, strictly: ``http`` or ``https``; no user info
  (``user:pass@``); a host that is a name (letters, digits, ``.``, ``_``,
  ``-``) or an IP literal without a zone; a port 1-65535; printable ASCII
  only.  Anything else is ``TargetRefused``;
* a host that is a member's node id (``http://gpu2:8080/health``, how gswarm
  pipelines are written) is that member: the host is replaced by the one the
  member advertises, port, path and query kept;
* a host that a member advertises (the host of any member's ``HOST:PORT``),
  or the host and port of a service the mesh runs, is the mesh's own:
  ``in_mesh``, fetched wherever it is;
* any other host is outside: the executor resolves it once, refuses it
  unless every address is public (or the operator allows private ones, as
  for sources: ``--allow-private-sources``), and connects to the very
  address it checked, so a DNS answer that changes in between (rebinding)
  cannot move the connection.

The URL fetched (``HealthTarget.url``) is rebuilt from the parts read here,
so no second URL parser ever reads the caller's text.  Every way a target
fails (refused here, a private address, no DNS answer, a refused
connection, a timeout, a broken answer) ends the check with one message
(``unreachable_message``): no status code, no exception class, nothing that
tells one cause from another.  A target that answers still reports its
HTTP status: that is what a health check is for.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = [
    "UNREACHABLE",
    "URL_MAX",
    "HealthTarget",
    "TargetRefused",
    "health_target",
    "parse_target",
    "shown_url",
    "unreachable_message",
]

URL_MAX = 2048
UNREACHABLE = "target not reachable or not allowed"
_SCHEMES = {"http": 80, "https": 443}
_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})\Z")
_BAD_CHARS = frozenset('\\"<>^`{|}')
_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})  # where this node's own engines answer
_UNSPECIFIED = (ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::"))


class TargetRefused(ValueError):
    """A ``target_url`` a health check does not fetch; the message says why
    (for validation at submission; a running check shows ``UNREACHABLE``)."""


@dataclass(frozen=True, slots=True)
class HealthTarget:
    """What a health check fetches.  ``host`` is lower case, IPv6 without
    brackets; ``path`` starts with ``/`` and carries the query, if any."""

    scheme: str
    host: str
    port: int
    path: str
    in_mesh: bool = False  # a member's host or a service: fetched without the address rule
    node_id: str | None = None  # the member the URL named by its node id

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _SCHEMES[self.scheme] else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The URL to fetch."""
        return f"{self.scheme}://{self.netloc}{self.path}"

    @property
    def shown(self) -> str:
        """The URL fit for a step's note or error: no query (a signed URL carries a secret there)."""
        return f"{self.scheme}://{self.netloc}{self.path.split('?', 1)[0]}"


def _canonical_host(host: str) -> str:
    """``host`` as compared: lower case, no brackets, an IP literal in its one spelling."""
    h = host.strip("[]").lower()
    try:
        return str(ipaddress.ip_address(h))
    except ValueError:
        return h


def _advertised_host(address: str) -> str | None:
    """The host of a member's ``HOST:PORT`` (None when it names no usable host)."""
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else ""
    if not host or "%" in host:
        return None
    canon = _canonical_host(host)
    try:
        if ipaddress.ip_address(canon) in _UNSPECIFIED:
            return None  # "every address" is no one's address
    except ValueError:
        pass
    return canon


def parse_target(url: object) -> HealthTarget:
    """``url`` read strictly (see the module's theory); ``TargetRefused`` when it may not be fetched.
    The host keeps its case here (a node id is matched as written)."""
    if not isinstance(url, str) or not url:
        raise TargetRefused("must be an http(s) URL")
    if len(url) > URL_MAX:
        raise TargetRefused(f"longer than {URL_MAX} characters")
    if any(ord(c) <= 0x20 or ord(c) >= 0x7F or c in _BAD_CHARS for c in url):
        raise TargetRefused("may hold only printable ASCII, without spaces, quotes or backslashes")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise TargetRefused("is not a URL") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES or not url[len(scheme):].startswith("://"):
        raise TargetRefused("must be an http(s) URL")
    netloc = parts.netloc
    if "@" in netloc:
        raise TargetRefused("must not carry user info (user:password@)")
    if netloc.startswith("["):
        end = netloc.find("]")
        if end < 0:
            raise TargetRefused("has an unclosed [ in its host")
        raw_host, rest = netloc[1:end], netloc[end + 1:]
        try:
            if "%" in raw_host:
                raise ValueError("a zone")  # fe80::1%eth0 names an interface of the node
            ipaddress.IPv6Address(raw_host)
        except ValueError:
            raise TargetRefused("has a bracketed host that is not an IPv6 address (without a zone)") from None
        host = raw_host.lower()
    else:
        raw_host, sep, port_text = netloc.partition(":")
        rest = sep + port_text
        if not _NAME.match(raw_host) or ".." in raw_host:
            raise TargetRefused("needs a host: a name, or an IP address")
        host = raw_host
    if rest:
        digits = rest[1:]
        if not rest.startswith(":") or not digits.isdigit() or len(digits) > 5 or not 0 < int(digits) < 65536:
            raise TargetRefused("has a bad port: 1 to 65535")
        port = int(digits)
    else:
        port = _SCHEMES[scheme]
    path = parts.path or "/"
    if not path.startswith("/"):
        raise TargetRefused("has a bad path")
    if parts.query:
        path = f"{path}?{parts.query}"
    return HealthTarget(scheme, host, port, path)


def health_target(url: object, members: Mapping[str, str],
                  services: Iterable[tuple[str, int]] = (), here: str | None = None) -> HealthTarget:
    """What a health check of ``url`` run on node ``here`` fetches, given
    ``members`` (node id -> advertised ``HOST:PORT``) and ``services`` (node
    id and port of each service the mesh runs: it answers on its node's
    advertised host, and on loopback of its own node, where engines listen).
    ``TargetRefused`` when ``url`` may not be fetched at all; an outside host
    (``in_mesh`` False) still has its addresses checked by the executor."""
    t = parse_target(url)
    named = members.get(t.host)
    if named is not None:  # gswarm's form: http://<node id>:<port>/<path>
        host = _advertised_host(named)
        if host is None:
            raise TargetRefused(f"node {t.host!r} advertises no host")
        return HealthTarget(t.scheme, host, t.port, t.path, in_mesh=True, node_id=t.host)
    host = _canonical_host(t.host)
    hosts = {h for h in map(_advertised_host, members.values()) if h is not None}
    if host in hosts:
        return HealthTarget(t.scheme, host, t.port, t.path, in_mesh=True)
    for node, port in services:
        if port != t.port:
            continue
        address = members.get(node)
        if (address is not None and _advertised_host(address) == host) or (node == here and host in _LOOPBACK):
            return HealthTarget(t.scheme, host, t.port, t.path, in_mesh=True)
    return HealthTarget(t.scheme, host, t.port, t.path)


def shown_url(url: object) -> str:
    """``url`` fit for a message even when it cannot be read: no user info, no query."""
    try:
        return parse_target(url).shown
    except TargetRefused:
        pass
    if not isinstance(url, str):
        return "<not a URL>"
    try:
        p = urlsplit(url[:URL_MAX])
        host = p.hostname or ""
        port = p.port
    except ValueError:
        return "<invalid URL>"
    netloc = f"{host}:{port}" if port is not None else host
    shown = f"{p.scheme}://{netloc}{p.path}"
    return "".join(c if 0x20 < ord(c) < 0x7F else "?" for c in shown)[:200]


def unreachable_message(url_shown: str, node_id: str) -> str:
    """The one message of a health check whose target cannot be reached or may not be."""
    return f"health check of {url_shown} from {node_id}: {UNREACHABLE}"
