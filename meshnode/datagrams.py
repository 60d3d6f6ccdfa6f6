"""The node's UDP socket at its HTTP port: small peer messages as signed
datagrams (``protocol.peerdgram``), both ways.

Sending signs and packs the envelope and sends it, without waiting for
anything; the choice of datagram or HTTP is ``DatagramPaths``' (in
``PeerSender``).  Receiving checks each datagram as the HTTP peer route checks
a request (form, MAC, freshness, nonce; then the envelope, whose sender must be
the signer) and hands it to the node.  A bad datagram is a count and a log line
at most once a minute per address and reason; the loop never ends on one.
Peer addresses that are names are resolved off the event loop and cached for
a minute (a bounded table)."""

from __future__ import annotations

import errno
import ipaddress
import logging
import secrets
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Callable

import trio
import trio.lowlevel

from protocol import RemoteProtocolError
from protocol.peerauth import NONCE_BYTES, PeerAuthError, sign
from protocol.peerdgram import DGRAM_METHOD, pack, unpack

from .peers import PEER_PATH
from .ratelimit import LogOnce

__all__ = ["Datagrams"]

log = logging.getLogger("meshnode.datagrams")

RESOLVED_KEEP_S = 60.0
RESOLVE_TIMEOUT_S = 1.0  # a name not resolved by then goes by HTTP for RESOLVED_KEEP_S
RESOLVED_MAX = 10_000
RECV_BUFFER = 65_536

Receiver = Callable[[bytes, str, "str | None"], None]  # data, remote, signer; raises RemoteProtocolError
Checker = Callable[[str, bytes], "str | None"]  # credential, body -> signer; raises PeerAuthError


class Datagrams:
    def __init__(self, node_id: str, secret: str | None, check: Checker) -> None:
        self.node_id = node_id
        self._secret = secret
        self._check = check
        self._sock: trio.socket.SocketType | None = None
        self._family = socket.AF_INET
        self._resolved: OrderedDict[str, tuple[float, tuple[str, int] | None]] = OrderedDict()
        self._log_once = LogOnce()
        self.stats: Counter[str] = Counter()

    @property
    def bound(self) -> bool:
        return self._sock is not None

    async def bind(self, host: str, port: int) -> bool:
        """Bind the UDP port of the same number as the HTTP one; False (and a
        warning: peers then send this node HTTP only) when it cannot."""
        try:
            infos = await trio.socket.getaddrinfo(host or None, port, type=socket.SOCK_DGRAM,
                                                  flags=socket.AI_PASSIVE)
            family, type_, proto, _, addr = infos[0]
            sock = trio.socket.socket(family, type_, proto)
            try:
                await sock.bind(addr)
            except OSError:
                sock.close()
                raise
        except OSError as e:
            log.warning("cannot bind UDP %s:%d (%s): peers send this node HTTP only", host, port, e.strerror or e)
            return False
        self._sock, self._family = sock, family
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()

    # -- sending -------------------------------------------------------------------------

    async def _sockaddr(self, addr: str) -> tuple[str, int] | None:
        now = time.monotonic()
        hit = self._resolved.get(addr)
        if hit is not None and now < hit[0]:
            return hit[1]
        host, _, port_text = addr.rpartition(":")
        host = host.strip("[]")
        found: tuple[str, int] | None = None
        try:
            port = int(port_text)
            try:
                ip = ipaddress.ip_address(host)
                found = (str(ip), port) if (ip.version == 6) == (self._family == socket.AF_INET6) else None
            except ValueError:
                with trio.move_on_after(RESOLVE_TIMEOUT_S):  # sends wait behind it: bounded
                    infos = await trio.socket.getaddrinfo(host, port, family=self._family, type=socket.SOCK_DGRAM)
                    found = (str(infos[0][4][0]), int(infos[0][4][1])) if infos else None
        except (OSError, ValueError):
            found = None
        self._resolved[addr] = (now + RESOLVED_KEEP_S, found)
        self._resolved.move_to_end(addr)
        while len(self._resolved) > RESOLVED_MAX:
            self._resolved.popitem(last=False)
        return found

    async def send(self, addr: str, body: bytes) -> bool:
        """Send ``body`` (an encoded envelope) to the peer at ``addr``; False
        when it could not leave (the caller sends it by HTTP instead)."""
        if self._sock is None:
            return False
        where = await self._sockaddr(addr)
        if where is None:
            return False
        cred = ""
        if self._secret:
            cred = sign(self._secret, self.node_id, DGRAM_METHOD, PEER_PATH.encode(), body,
                        int(time.time() * 1000), secrets.token_bytes(NONCE_BYTES))
        try:
            await self._sock.sendto(pack(cred, body), where)
        except trio.ClosedResourceError:
            return False
        except OSError as e:
            self.stats["send_failed"] += 1
            if e.errno not in (errno.ECONNREFUSED, errno.EAGAIN) and self._log_once((addr, "send")):
                log.warning("datagram to %s failed: %s", addr[:80], e.strerror or e)
            return False
        self.stats["sent"] += 1
        self.stats["bytes_sent"] += len(body)
        return True

    # -- receiving -----------------------------------------------------------------------

    def handle(self, packet: bytes, remote: str, receive: Receiver) -> None:
        """Check one datagram and hand its envelope to ``receive``."""
        try:
            cred, body = unpack(packet)
            signer = self._check(cred, body)
        except (RemoteProtocolError, PeerAuthError) as e:
            self.stats["refused"] += 1
            if self._log_once((remote.rsplit(":", 1)[0], type(e).__name__)):
                log.warning("refused a peer datagram from %s: %s", remote, e)
            return
        try:
            receive(body, remote, signer)  # logs what is wrong with the envelope itself
        except RemoteProtocolError:
            self.stats["bad"] += 1
            return
        self.stats["received"] += 1

    async def run(self, receive: Receiver, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if self._sock is None:
            return
        sock = self._sock
        while True:
            try:
                packet, source = await sock.recvfrom(RECV_BUFFER)
            except trio.ClosedResourceError:
                return  # closed: the node is ending
            except OSError as e:  # an ICMP error of an earlier send, on some systems
                self.stats["recv_failed"] += 1
                if self._log_once(("recv", e.errno)):
                    log.warning("receiving a datagram failed: %s", e.strerror or e)
                await trio.lowlevel.checkpoint()
                continue
            try:
                self.handle(packet, f"{source[0]}:{source[1]}", receive)
            except Exception:  # a bug on one datagram: a log line, never the node's end
                self.stats["crashed"] += 1
                if self._log_once(("crash", source[0])):
                    log.exception("handling a datagram from %s failed unexpectedly", source[0])
