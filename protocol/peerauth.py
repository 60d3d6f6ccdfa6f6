"""Peer request authentication: an HMAC, never the secret itself.

Theory of operation
-------------------
Every HTTP request one node sends another (gossip messages, manifests,
actions handed over) carries one header::

    x-mesh-auth: v1 sender=<node id> ts=<unix ms> nonce=<32 hex> mac=<64 hex>

where ``mac`` is HMAC-SHA256 under the cluster secret of::

    b"meshnode-peer-v1\\n" method "\\n" target "\\n" sender "\\n" ts "\\n" nonce "\\n" sha256(body) hex

``target`` is the request's path with its query string, as sent (bytes).  So the
MAC binds the message, who sends it, when and a one-time nonce; the secret
never crosses the wire, and a captured request cannot be replayed:

* a timestamp more than ``window_ms`` from the receiver's clock is refused
  (the caller logs the skew, so an operator can fix NTP);
* within the window, a nonce already seen is refused.  ``ReplayGuard``
  remembers the nonces of accepted requests for as long as the window lasts,
  at most ``max_nonces`` of them: past that bound it forgets the oldest and
  raises a *floor* to the newest timestamp it forgot, refusing anything not
  newer, so memory stays bounded and nothing forgotten can be replayed.

Rotation: a sender signs with its first secret; a receiver accepts a MAC
under any of its secrets (each compared in constant time).  Add the new
secret everywhere, make it first everywhere, then drop the old one.

No secret configured (a single-user loopback node) means no header is sent
and none is required.  Pure: the caller passes the clock, the nonce and the
bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections import OrderedDict
from dataclasses import dataclass

from .names import NODE_ID_MAX

__all__ = [
    "AUTH_HEADER",
    "WINDOW_MS",
    "PeerAuthError",
    "PeerCredential",
    "ReplayGuard",
    "parse_header",
    "sign",
    "verify",
]

AUTH_HEADER = "x-mesh-auth"
WINDOW_MS = 60_000
NONCE_BYTES = 16
_LABEL = b"meshnode-peer-v1\n"
_HEADER = re.compile(
    rf"v1 sender=([A-Za-z0-9._-]{{1,{NODE_ID_MAX}}}) ts=([0-9]{{1,15}}) nonce=([0-9a-f]{{32}}) mac=([0-9a-f]{{64}})\Z"
)


class PeerAuthError(Exception):
    """A peer request is not authenticated.  ``reason`` is short and holds no secret."""

    def __init__(self, reason: str, *, skew_ms: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.skew_ms = skew_ms


@dataclass(frozen=True, slots=True)
class PeerCredential:
    sender: str
    ts_ms: int
    nonce: str
    mac: bytes


def _mac(secret: str, method: str, target: bytes, sender: str, ts_ms: int, nonce: str, body: bytes) -> bytes:
    msg = b"\n".join(
        (
            _LABEL + method.upper().encode(),
            target,
            sender.encode(),
            str(ts_ms).encode(),
            nonce.encode(),
            hashlib.sha256(body).hexdigest().encode(),
        )
    )
    return hmac.new(secret.encode(), msg, hashlib.sha256).digest()


def sign(secret: str, sender: str, method: str, target: bytes, body: bytes, now_ms: int, nonce: bytes) -> str:
    """The ``x-mesh-auth`` header value for one request."""
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes")
    n = nonce.hex()
    mac = _mac(secret, method, target, sender, now_ms, n, body).hex()
    return f"v1 sender={sender} ts={now_ms} nonce={n} mac={mac}"


def parse_header(value: str | None, now_ms: int, window_ms: int = WINDOW_MS) -> PeerCredential:
    """Check the header's form and freshness (cheap: before the body is read)."""
    if not value:
        raise PeerAuthError("no peer credential (x-mesh-auth)")
    m = _HEADER.match(value)
    if m is None:
        raise PeerAuthError("malformed peer credential")
    ts = int(m.group(2))
    skew = ts - now_ms
    if abs(skew) > window_ms:
        raise PeerAuthError(
            f"peer clock is {skew / 1000:+.1f} s from ours (the limit is {window_ms / 1000:g} s): check NTP",
            skew_ms=skew,
        )
    return PeerCredential(m.group(1), ts, m.group(3), bytes.fromhex(m.group(4)))


def verify(
    cred: PeerCredential, secrets: tuple[str, ...], method: str, target: bytes, body: bytes, guard: ReplayGuard
) -> str:
    """The authenticated sender, or ``PeerAuthError``.  Every secret is tried
    (constant time each); the nonce is spent only when the MAC matched."""
    ok = False
    for secret in secrets:
        ok |= hmac.compare_digest(_mac(secret, method, target, cred.sender, cred.ts_ms, cred.nonce, body), cred.mac)
    if not ok:
        raise PeerAuthError("peer credential does not match the cluster secret")
    if not guard.spend(cred.nonce, cred.ts_ms):
        raise PeerAuthError("replayed peer request (its nonce was already used)")
    return cred.sender


class ReplayGuard:
    """The nonces spent within the window, bounded by ``max_nonces``."""

    def __init__(self, window_ms: int = WINDOW_MS, max_nonces: int = 200_000) -> None:
        if window_ms <= 0 or max_nonces < 1:
            raise ValueError("window_ms and max_nonces must be positive")
        self.window_ms = window_ms
        self.max_nonces = max_nonces
        self._seen: OrderedDict[str, int] = OrderedDict()  # nonce -> ts, in the order spent
        self.floor_ms = -1  # nothing at or below this is accepted (raised only by forgetting)
        self.refused = 0

    def __len__(self) -> int:
        return len(self._seen)

    def spend(self, nonce: str, ts_ms: int) -> bool:
        """Record ``nonce`` of a request stamped ``ts_ms`` (already inside the
        window); False if it was spent already or cannot be told apart from one."""
        if ts_ms <= self.floor_ms or nonce in self._seen:
            self.refused += 1
            return False
        # ts_ms is at most a window ahead of now, so anything stamped two windows
        # before it is outside the window: the freshness check refuses it anyway.
        horizon = ts_ms - 2 * self.window_ms
        while self._seen:
            oldest, ts = next(iter(self._seen.items()))
            if ts > horizon:
                break
            del self._seen[oldest]
        self._seen[nonce] = ts_ms
        while len(self._seen) > self.max_nonces:
            _, ts = self._seen.popitem(last=False)
            self.floor_ms = max(self.floor_ms, ts)
        return True
