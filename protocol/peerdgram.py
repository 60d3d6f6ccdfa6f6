"""Peer messages as datagrams: the packet and the choice of path.

Theory of operation
-------------------
Every peer message used to be an HTTP request.  The protocol is one-way
(the receiver answers 204 and replies, if at all, with a message of its own),
so the request, its response, the connection pool and the HTTP parser on each
side were ~2 ms of CPU for a few hundred bytes; at ~5 messages a second that is
a fixed 1% of a core per daemon, and a starting mesh of 50 on a small host
saturates it.  So, as memberlist and chitchat do, the small messages (probes,
acks, rumours, digests) go as UDP datagrams to the peer's HTTP port; the large
ones (sync deltas) stay on HTTP.

The packet::

    b"MNd1" | u16 big-endian length of the credential | credential (ascii) | envelope

The credential is ``protocol.peerauth``'s header value, signed with method
``DGRAM`` and the peer route as target: the same HMAC over the same fields
(sender, time, nonce, sha256 of the envelope), so a datagram cannot be
replayed, nor passed off as an HTTP request or one as a datagram.  Datagrams
are unbound (``to=*``), as gossip over HTTP is.  Without a cluster secret the
credential is empty, as the HTTP header is absent.

Which path (``DatagramPaths``, one per node): a datagram goes to a peer only
after the peer said it takes them (its 204 to an HTTP message carries
``DGRAM_HEADER``), so an older node, a node whose UDP port could not be bound,
or one behind TLS, keeps getting HTTP.  A path that loses datagrams (a
firewall that passes TCP only) must not make a live peer look dead: until
the first ack from a peer proves that our datagrams reach it, a ping (which
any live peer answers) sent as a datagram starts a clock, an ack stops it
(the peer's other messages prove only the way back), and past ``confirm_s`` without a word the peer is
sent HTTP again for ``retry_after_s``.  Once proven, a path stays: a late
ack is a slow peer, which Lifeguard and the suspicion timeouts are for, and
moving a starved mesh to HTTP would only starve it more.  Every table is
bounded.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Final

from .errors import RemoteProtocolError
from .wire import MsgType

__all__ = ["ANSWERED", "DGRAM_HEADER", "DGRAM_METHOD", "DGRAM_PAYLOAD_MAX", "DatagramPaths", "pack", "unpack"]

MAGIC: Final = b"MNd1"
DGRAM_METHOD: Final = "DGRAM"
DGRAM_HEADER: Final = "x-mesh-dgram"  # on a peer route's 204: "1", this node takes datagrams at its HTTP port
CREDENTIAL_MAX: Final = 512  # the peerauth header is about 200 characters
DGRAM_PAYLOAD_MAX: Final = 65_507 - 6 - CREDENTIAL_MAX  # what an IPv4 UDP datagram can carry, less ours
_LEN = struct.Struct(">H")
# Messages any live peer answers (a ping-req is answered only when its target
# lives): the ones whose answer proves a path (``DatagramPaths.use``'s ``expects_reply``).
ANSWERED: Final = frozenset({MsgType.PING})
CONFIRM_PROBES: Final = 1.5  # probe intervals an unproven path's ping may go unanswered


def pack(credential: str, body: bytes) -> bytes:
    """One datagram carrying ``body`` (an encoded envelope) under ``credential``."""
    cred = credential.encode("ascii")
    if len(cred) > CREDENTIAL_MAX:
        raise ValueError(f"credential over {CREDENTIAL_MAX} bytes")
    if len(body) > DGRAM_PAYLOAD_MAX:
        raise ValueError(f"message of {len(body)} bytes does not fit a datagram")
    return MAGIC + _LEN.pack(len(cred)) + cred + body


def unpack(packet: bytes) -> tuple[str, bytes]:
    """The credential and the envelope of a datagram; ``RemoteProtocolError`` for
    anything that is not one of ours (the caller counts and logs it)."""
    if len(packet) < len(MAGIC) + _LEN.size or not packet.startswith(MAGIC):
        raise RemoteProtocolError("not a meshnode datagram")
    (n,) = _LEN.unpack_from(packet, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    if n > CREDENTIAL_MAX or start + n > len(packet):
        raise RemoteProtocolError("datagram credential length out of bounds")
    try:
        cred = packet[start:start + n].decode("ascii")
    except UnicodeDecodeError:
        raise RemoteProtocolError("datagram credential is not ascii") from None
    return cred, packet[start + n:]


@dataclass(slots=True)
class _Path:
    unanswered_since: float | None = None  # the first ping sent as a datagram, while none was acked
    http_until: float = 0.0  # datagrams lost: HTTP only until then
    proven: bool = False  # an ack came since the peer offered datagrams: they reach it


@dataclass
class DatagramPaths:
    """Which peers (by address) are sent datagrams.  Pure: the caller passes
    the clock.  ``max_bytes``: the largest message sent as a datagram (larger
    ones go by HTTP); ``confirm_s``: how long a ping may go unanswered before
    the peer gets HTTP again, for ``retry_after_s``."""

    max_bytes: int = 1400
    confirm_s: float = 5.0
    retry_after_s: float = 60.0
    peers_max: int = 100_000
    _paths: OrderedDict[str, _Path] = field(default_factory=OrderedDict)
    fallbacks: int = 0  # peers put back on HTTP because their datagrams went unanswered

    def __post_init__(self) -> None:
        if not 0 < self.max_bytes <= DGRAM_PAYLOAD_MAX:
            raise ValueError(f"max_bytes must be in 1..{DGRAM_PAYLOAD_MAX}")
        if self.confirm_s <= 0 or self.retry_after_s < 0 or self.peers_max < 1:
            raise ValueError("confirm_s and peers_max must be positive, retry_after_s not negative")

    @classmethod
    def for_probes(cls, max_bytes: int, probe_interval_s: float) -> DatagramPaths:
        """The table for a node that probes every ``probe_interval_s``."""
        return cls(max_bytes=max_bytes, confirm_s=CONFIRM_PROBES * probe_interval_s)

    def __len__(self) -> int:
        return len(self._paths)

    def offered(self, addr: str, now: float) -> None:
        """``addr`` answered an HTTP message saying it takes datagrams."""
        if addr in self._paths:
            self._paths.move_to_end(addr)
            return
        self._paths[addr] = _Path()
        while len(self._paths) > self.peers_max:
            self._paths.popitem(last=False)

    def answered(self, addr: str) -> None:
        """An ack came from the node at ``addr``.  It proves the path only
        while a ping sent as a datagram awaits its answer: an ack to a ping
        that went by HTTP (before the peer offered datagrams) proves nothing
        of UDP.  (Any other message proves only that its datagrams reach us.)"""
        p = self._paths.get(addr)
        if p is not None and p.unanswered_since is not None:
            p.unanswered_since = None
            p.proven = True

    def forget(self, addr: str) -> None:
        """``addr`` refused or failed an HTTP message: learn its paths afresh."""
        self._paths.pop(addr, None)

    def use(self, addr: str, size: int, now: float, *, expects_reply: bool) -> bool:
        """Whether a message of ``size`` bytes to ``addr`` goes as a datagram
        (and, when it does and ``expects_reply``, the clock that waits for the
        answer starts, if not already running)."""
        p = self._paths.get(addr)
        if p is None or size > self.max_bytes or now < p.http_until:
            return False
        if p.unanswered_since is not None and now - p.unanswered_since > self.confirm_s:
            p.unanswered_since = None
            p.http_until = now + self.retry_after_s
            self.fallbacks += 1
            return False
        if expects_reply and p.unanswered_since is None and not p.proven:
            p.unanswered_since = now
        return True

    def falling_back(self, addr: str, now: float) -> bool:
        """Whether ``addr`` is on HTTP for now because its datagrams went unanswered."""
        p = self._paths.get(addr)
        return p is not None and now < p.http_until
