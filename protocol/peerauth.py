"""Peer request authentication: an HMAC, never the secret itself.

Theory of operation
-------------------
Every HTTP request one node sends another (gossip messages, manifests,
actions handed over) carries one header::

    x-mesh-auth: v2 sender=<node id> to=<node id>|* gen=<generation>|* ts=<unix ms> nonce=<32 hex> mac=<64 hex>

where ``mac`` is HMAC-SHA256 under the cluster secret of::

    b"meshnode-peer-v2\\n" method "\\n" target "\\n" sender "\\n" to "\\n" gen "\\n" ts "\\n" nonce "\\n" sha256(body) hex

``target`` is the request's path with its query string, as sent (bytes).  So the
MAC binds the message, who sends it, to whom (a node id at one generation: one
run of that node), when and a one-time nonce; the secret never crosses the
wire, and a captured request cannot be replayed, not to another node, not to
the same node twice, not across its restart:

* a timestamp more than ``window_ms`` from the receiver's clock is refused
  (the caller logs the skew, so an operator can fix NTP);
* a request signed for another node id is refused, and so is one signed for
  another generation of this node.  A node's generation (``membership``) is
  new at every start, above every earlier one (kept on disk, and wall-clock
  ms besides), and gossiped in its member record, so a sender knows it;
* anything stamped before the receiver's own start (``ReplayGuard``'s
  ``started_ms``) is refused: the nonces a previous run spent are not
  remembered, and a kill -9 and restart within the window must not make them
  new again.  (A sender whose clock is behind the receiver's by *s* has its
  requests refused during the receiver's first *s*; NTP keeps *s* small.)
* within the window, a nonce already seen is refused.  ``ReplayGuard``
  remembers the nonces of accepted requests for as long as the window lasts,
  at most ``max_nonces`` of them: past that bound it forgets the oldest and
  raises a *floor* to the newest timestamp it forgot, refusing anything not
  newer, so memory stays bounded and nothing forgotten can be replayed.

Unbound requests (``to=* gen=*``).  A sender does not always know whom an
address reaches: a join seed is only an address, and gossip is addressed by
address.  Such a request is accepted only where the caller says so
(``unbound_ok``: the node accepts it on the gossip route alone), whose effect
is a CRDT merge of records the signer itself sent (and whose envelope's sender
must be the signer): idempotent, and what gossip spreads to every node
anyway.  Replayed to another node (once there, inside the window) it tells
that node nothing gossip would not.  Actions, and every other route, need a
bound request.

Stale generation.  A sender that signs for a generation its receiver has
left (the receiver restarted, and gossip has not told the sender yet) is
refused with a *hint*: the 401 carries ``x-mesh-peer: v2 node=<id>
gen=<current> mac=<64 hex>``, with the MAC, under the secret that verified
the request, of::

    b"meshnode-peer-v2-gen\\n" node "\\n" gen "\\n" nonce of the refused request

It is given only once the refused request's MAC matched.  The sender checks
it (``read_hint``) against the nonce it has just used and the node it meant,
and then signs the request once more, for that generation, with a fresh nonce
and time.  A forged hint, or one from another request, is ignored, so nobody
on the path can make a sender sign for a generation of their choosing; and a
request signed for a generation still to come could not be spent either,
being stamped before that run's start.

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
from typing import Final

from .names import NODE_ID_MAX

__all__ = [
    "AUTH_HEADER",
    "HINT_HEADER",
    "WINDOW_MS",
    "PeerAuthError",
    "PeerCredential",
    "Recipient",
    "ReplayGuard",
    "nonce_of",
    "parse_header",
    "read_hint",
    "sign",
    "sign_hint",
    "verify",
]

AUTH_HEADER = "x-mesh-auth"
HINT_HEADER = "x-mesh-peer"  # on a 401 for a stale generation: the receiver's current one, signed
WINDOW_MS = 60_000
NONCE_BYTES = 16
GENERATION_MAX = 2**63 - 1  # as the wire's integers
_LABEL = b"meshnode-peer-v2\n"
_HINT_LABEL = b"meshnode-peer-v2-gen\n"
_ID = rf"[A-Za-z0-9._-]{{1,{NODE_ID_MAX}}}"
_HEADER = re.compile(
    rf"v2 sender=({_ID}) to=({_ID}|\*) gen=([0-9]{{1,19}}|\*) ts=([0-9]{{1,15}}) nonce=([0-9a-f]{{32}}) mac=([0-9a-f]{{64}})\Z"
)
_HINT = re.compile(rf"v2 node=({_ID}) gen=([0-9]{{1,19}}) mac=([0-9a-f]{{64}})\Z")
ANY: Final = "*"  # ``to`` and ``gen`` of an unbound request


@dataclass(frozen=True, slots=True)
class Recipient:
    """Whom a peer request is for: a node id at one generation (one run of that node)."""

    node_id: str
    generation: int


class PeerAuthError(Exception):
    """A peer request is not authenticated.  ``reason`` is short and holds no secret.
    ``hint`` (a stale generation's refusal only): the ``x-mesh-peer`` value
    that lets the sender sign again for our current generation."""

    def __init__(self, reason: str, *, skew_ms: int | None = None, hint: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.skew_ms = skew_ms
        self.hint = hint

    @property
    def headers(self) -> dict[str, str]:
        """What the refusal's answer carries besides its body."""
        return {HINT_HEADER: self.hint} if self.hint else {}


@dataclass(frozen=True, slots=True)
class PeerCredential:
    sender: str
    to: Recipient | None  # None: unbound (``to=* gen=*``)
    ts_ms: int
    nonce: str
    mac: bytes


def _mac(secret: str, method: str, target: bytes, sender: str, to: Recipient | None, ts_ms: int, nonce: str,
         body: bytes) -> bytes:
    msg = b"\n".join(
        (
            _LABEL + method.upper().encode(),
            target,
            sender.encode(),
            (ANY if to is None else to.node_id).encode(),
            (ANY if to is None else str(to.generation)).encode(),
            str(ts_ms).encode(),
            nonce.encode(),
            hashlib.sha256(body).hexdigest().encode(),
        )
    )
    return hmac.new(secret.encode(), msg, hashlib.sha256).digest()


def sign(secret: str, sender: str, method: str, target: bytes, body: bytes, now_ms: int, nonce: bytes,
         *, to: Recipient | None = None) -> str:
    """The ``x-mesh-auth`` header value for one request, for ``to`` (unbound
    when None: accepted only where the receiver allows it, the gossip route)."""
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes")
    n = nonce.hex()
    mac = _mac(secret, method, target, sender, to, now_ms, n, body).hex()
    dest = f"to={ANY} gen={ANY}" if to is None else f"to={to.node_id} gen={to.generation}"
    return f"v2 sender={sender} {dest} ts={now_ms} nonce={n} mac={mac}"


def nonce_of(value: str) -> str:
    """The nonce of a header ``sign`` made (what a hint answering it is tied to)."""
    m = _HEADER.match(value)
    if m is None:
        raise ValueError("not a peer credential")
    return m.group(5)


def _hint_mac(secret: str, me: Recipient, nonce: str) -> bytes:
    msg = b"\n".join((_HINT_LABEL + me.node_id.encode(), str(me.generation).encode(), nonce.encode()))
    return hmac.new(secret.encode(), msg, hashlib.sha256).digest()


def sign_hint(secret: str, me: Recipient, nonce: str) -> str:
    """The ``x-mesh-peer`` value telling the signer of the request with ``nonce`` our generation."""
    return f"v2 node={me.node_id} gen={me.generation} mac={_hint_mac(secret, me, nonce).hex()}"


def read_hint(value: str | None, secrets: tuple[str, ...], nonce: str, node_id: str) -> Recipient | None:
    """The generation a receiver told us in its refusal of our request with
    ``nonce`` to ``node_id``; None unless the hint is for that very request and
    that node, under one of ``secrets`` (each compared in constant time)."""
    m = _HINT.match(value or "")
    if m is None or m.group(1) != node_id:
        return None
    gen = int(m.group(2))
    if not 0 < gen <= GENERATION_MAX:
        return None
    told = Recipient(node_id, gen)
    given = bytes.fromhex(m.group(3))
    ok = False
    for secret in secrets:
        ok |= hmac.compare_digest(_hint_mac(secret, told, nonce), given)
    return told if ok else None


def parse_header(value: str | None, now_ms: int, window_ms: int = WINDOW_MS) -> PeerCredential:
    """Check the header's form and freshness (cheap: before the body is read)."""
    if not value:
        raise PeerAuthError("no peer credential (x-mesh-auth)")
    m = _HEADER.match(value)
    if m is None:
        if value.startswith("v1 "):
            raise PeerAuthError("peer credential of version 1 (an older meshnode): it does not name its "
                                "receiver, so it is refused; upgrade that node")
        raise PeerAuthError("malformed peer credential")
    to_text, gen_text = m.group(2), m.group(3)
    if (to_text == ANY) != (gen_text == ANY):
        raise PeerAuthError("malformed peer credential: to= and gen= are both given or both *")
    to = None
    if to_text != ANY:
        gen = int(gen_text)
        if gen > GENERATION_MAX or gen_text != str(gen):
            raise PeerAuthError("malformed peer credential: gen= is a number below 2**63, without leading zeros")
        to = Recipient(to_text, gen)
    ts = int(m.group(4))
    skew = ts - now_ms
    if abs(skew) > window_ms:
        raise PeerAuthError(
            f"peer clock is {skew / 1000:+.1f} s from ours (the limit is {window_ms / 1000:g} s): check NTP",
            skew_ms=skew,
        )
    return PeerCredential(m.group(1), to, ts, m.group(5), bytes.fromhex(m.group(6)))


def verify(
    cred: PeerCredential,
    secrets: tuple[str, ...],
    method: str,
    target: bytes,
    body: bytes,
    guard: ReplayGuard,
    *,
    me: Recipient,
    unbound_ok: bool = False,
) -> str:
    """The authenticated sender, or ``PeerAuthError``.  ``me``: this node's id
    and current generation (below 1 while it is not known yet: then only
    unbound requests can pass); ``unbound_ok``: whether this route takes a
    request signed ``to=*``.  Every secret is tried (constant time each); the
    nonce is spent only when everything else passed."""
    matched: str | None = None
    for secret in secrets:
        good = hmac.compare_digest(
            _mac(secret, method, target, cred.sender, cred.to, cred.ts_ms, cred.nonce, body), cred.mac
        )
        if good and matched is None:
            matched = secret
    if matched is None:
        raise PeerAuthError("peer credential does not match the cluster secret")
    to = cred.to
    if to is None:
        if not unbound_ok:
            raise PeerAuthError("this peer request must name its receiver (to=<node id> gen=<generation>)")
    elif to.node_id != me.node_id:
        raise PeerAuthError(f"peer request signed for node {to.node_id!r}; this is node {me.node_id!r}")
    elif me.generation < 1:
        raise PeerAuthError(f"node {me.node_id!r} is starting: it takes requests for its new generation soon")
    elif to.generation != me.generation:
        raise PeerAuthError(
            f"peer request signed for generation {to.generation} of node {me.node_id!r}, which runs as "
            f"generation {me.generation} now (it restarted)",
            hint=sign_hint(matched, me, cred.nonce),
        )
    if cred.ts_ms < guard.started_ms:
        raise PeerAuthError(
            f"peer request signed {(guard.started_ms - cred.ts_ms) / 1000:.1f} s before this node started "
            "(a replay across a restart, or a peer clock behind ours: check NTP)"
        )
    if not guard.spend(cred.nonce, cred.ts_ms):
        raise PeerAuthError("replayed peer request (its nonce was already used)")
    return cred.sender


class ReplayGuard:
    """The nonces spent within the window, bounded by ``max_nonces``, and
    ``started_ms``: the receiver's start (wall ms), before which ``verify``
    accepts nothing, as the nonces of an earlier run are not here."""

    def __init__(self, window_ms: int = WINDOW_MS, max_nonces: int = 200_000, *, started_ms: int = -1) -> None:
        if window_ms <= 0 or max_nonces < 1:
            raise ValueError("window_ms and max_nonces must be positive")
        self.window_ms = window_ms
        self.max_nonces = max_nonces
        self.started_ms = started_ms
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
