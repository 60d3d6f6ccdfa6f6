"""Credentials on the way in: API bearer tokens (public routes) and signed
peer requests (``/mesh/`` routes), checked in constant time, never logged.

A peer request must be signed for this node's id and current generation
(``protocol.peerauth``), and after this process started; only the gossip
route (``POST /mesh/v1/msg``) also takes one signed for whoever answers
(``to=*``)."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Iterable

from protocol.peerauth import (
    AUTH_HEADER,
    PeerAuthError,
    PeerCredential,
    Recipient,
    ReplayGuard,
    parse_header,
    verify,
)
from protocol.peerdgram import DGRAM_METHOD

from ..peers import PEER_PATH
from ..ratelimit import LogOnce

__all__ = ["PeerAuthError", "PeerGate", "Refusals", "check_bearer", "request_target"]

log = logging.getLogger("meshnode.api")


def check_bearer(header: str | None, accepted: tuple[str, ...]) -> bool:
    """True when no credential is required, or the header carries one of ``accepted``.

    Every accepted value is compared (``hmac.compare_digest``), so the time
    taken does not tell which one, or how much of one, matched.
    """
    if not accepted:
        return True
    if not header or not header.startswith("Bearer "):
        return False
    given = header[len("Bearer ") :].strip().encode()
    ok = False
    for token in accepted:
        ok |= hmac.compare_digest(given, token.encode())
    return ok


def request_target(raw_path: bytes, query_string: bytes) -> bytes:
    """The path and query as the client signed them (ASGI splits the two)."""
    return raw_path + b"?" + query_string if query_string else raw_path


class PeerGate:
    """Checks the signature of peer requests (``protocol.peerauth``) against
    the cluster secrets, this node's id and its current generation
    (``generation()``: below 1 while the node is starting), with one replay
    guard for the node that refuses anything signed before the gate was made
    (the process's start, or ``started_ms``)."""

    def __init__(self, secrets: tuple[str, ...], node_id: str, generation: Callable[[], int],
                 started_ms: int | None = None) -> None:
        self.secrets = secrets
        self.node_id = node_id
        self.generation = generation
        self.guard = ReplayGuard(started_ms=int(time.time() * 1000) if started_ms is None else started_ms)

    @property
    def required(self) -> bool:
        return bool(self.secrets)

    def precheck(self, headers: Iterable[tuple[bytes, bytes]]) -> PeerCredential | None:
        """Form and freshness of the credential, before the body is read;
        None when this node requires none.  Raises ``PeerAuthError``."""
        if not self.secrets:
            return None
        value = None
        name = AUTH_HEADER.encode()
        for k, v in headers:
            if k.lower() == name:
                value = v.decode("latin-1")
                break
        return parse_header(value, int(time.time() * 1000), self.guard.window_ms)

    def check(self, cred: PeerCredential | None, method: str, target: bytes, body: bytes) -> str | None:
        """The authenticated sender (None when none is required).  Raises
        ``PeerAuthError``; a stale generation's carries ``headers`` for the answer."""
        if cred is None:
            return None
        unbound_ok = method == "POST" and target.split(b"?", 1)[0] == PEER_PATH.encode()
        me = Recipient(self.node_id, self.generation())
        return verify(cred, self.secrets, method, target, body, self.guard, me=me, unbound_ok=unbound_ok)

    def check_datagram(self, credential: str, body: bytes) -> str | None:
        """The authenticated sender of a peer datagram (``protocol.peerdgram``):
        unbound, signed with method ``DGRAM``, under the same secrets, clock
        window and replay guard as the HTTP route.  Raises ``PeerAuthError``."""
        if not self.secrets:
            return None
        cred = parse_header(credential, int(time.time() * 1000), self.guard.window_ms)
        me = Recipient(self.node_id, self.generation())
        return verify(cred, self.secrets, DGRAM_METHOD, PEER_PATH.encode(), body, self.guard, me=me, unbound_ok=True)



class Refusals:
    """Requests refused for their credential: counted, and one log line per
    client and kind a minute (the reason never holds a secret)."""

    def __init__(self) -> None:
        self.count = 0
        self._log_once = LogOnce()

    def note(self, remote: str, what: str, why: Exception | None = None) -> None:
        self.count += 1
        if not self._log_once((remote.rsplit(":", 1)[0], what)):
            return
        log.warning("refused %s from %s: %s", what, remote, why or "missing or wrong credential")
