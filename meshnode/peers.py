"""Outgoing peer messages: a bounded queue drained into at most
``cfg.senders`` concurrent requests over one pooled httpx client.

Each message gets its own task (within that bound), so one slow peer holds
one slot, not the probes to everyone else.  Gossip tolerates loss by design,
so a full queue drops the newest message and counts it rather than blocking
the state machine; every request has a timeout.  A peer that refuses us (wrong secret, other cluster, other version)
is logged once per peer and reason, without the secret.

Every request to a peer (here and wherever the node uses the peer client) is
signed by ``PeerAuth``: an HMAC over the request under the cluster secret,
with our node id, the receiver's node id and generation, the time and a fresh
nonce (``protocol.peerauth``); the secret itself is never sent.  A request
names its receiver with the ``TO`` request extension (``PeerClient``'s
methods take it as ``to=``); one without is signed ``to=*``, which the
receiver takes on the gossip route only.  Refused for a generation the
receiver has left (it restarted), with its current one in a hint signed
under the cluster secret, ``PeerAuth`` signs the request once more for it.

Signing API (for a new peer route)::

    to = Recipient(node_id, member.record.generation)
    await client.post(url, content=body, extensions={TO: to})      # the node's peer client
    headers = sign_headers(secret, my_id, "POST", path, body, to=to)  # by hand
"""

from __future__ import annotations

import logging
import secrets
import ssl
import time
from collections import Counter
from collections.abc import Generator
from typing import Any, Protocol

import httpx
import trio

from protocol.gossip import Send
from protocol.peerauth import (
    AUTH_HEADER,
    HINT_HEADER,
    NONCE_BYTES,
    Recipient,
    nonce_of,
    read_hint,
    sign,
)
from protocol.peerdgram import ANSWERED, DGRAM_HEADER, DatagramPaths
from protocol.wire import encode

from .config import Config
from .errors import MeshError

__all__ = ["PEER_PATH", "TO", "PeerAuth", "PeerClient", "PeerSender", "Recipient", "make_peer_client", "peer_ssl_context",
           "sign_headers"]

log = logging.getLogger("meshnode.peers")

class DatagramSender(Protocol):
    async def send(self, addr: str, body: bytes) -> bool: ...


DROP_LOG_EVERY_S = 30.0  # a full send queue is logged at most this often (with the count since)

PEER_PATH = "/mesh/v1/msg"
TO = "meshnode.to"  # httpx request extension: the ``Recipient`` a peer request is for


def sign_headers(secret: str, sender: str, method: str, target: str | bytes, body: bytes,
                 *, to: Recipient | None = None) -> dict[str, str]:
    """The peer credential header for one request to ``to`` (its node id and
    generation; None signs ``to=*``, taken by the gossip route only), signed
    now with a fresh nonce."""
    raw = target.encode("ascii") if isinstance(target, str) else target
    value = sign(secret, sender, method, raw, body, int(time.time() * 1000), secrets.token_bytes(NONCE_BYTES), to=to)
    return {AUTH_HEADER: value}


class PeerAuth(httpx.Auth):
    """Signs every request of the peer client (httpx calls it per request,
    redirects and retries included, with the body already read) for the
    receiver its ``TO`` extension names; a 401 with a valid hint of the
    receiver's new generation (checked under ``accepted``, our secrets) has
    it signed once more, for that generation."""

    requires_request_body = True

    def __init__(self, secret: str, sender: str, accepted: tuple[str, ...] = ()) -> None:
        self._secret = secret
        self._sender = sender
        self._accepted = accepted or (secret,)

    def __repr__(self) -> str:
        return f"PeerAuth(sender={self._sender!r})"

    def _sign(self, request: httpx.Request, to: Recipient | None) -> str:
        """Sign ``request`` for ``to``; the nonce used."""
        headers = sign_headers(self._secret, self._sender, request.method, request.url.raw_path, request.content, to=to)
        request.headers.update(headers)
        return nonce_of(headers[AUTH_HEADER])

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        to = request.extensions.get(TO)
        if to is not None and not isinstance(to, Recipient):
            raise TypeError(f"the {TO!r} extension is a Recipient, not {type(to).__name__}")
        nonce = self._sign(request, to)
        response = yield request
        if to is None or response.status_code != 401:
            return
        told = read_hint(response.headers.get(HINT_HEADER), self._accepted, nonce, to.node_id)
        if told is None or told == to:
            return
        self._sign(request, told)
        yield request


def peer_ssl_context(cfg: Config) -> ssl.SSLContext | None:
    """What this node's connections to its peers' APIs verify them with (and
    present, with client certificates); None without TLS."""
    if not cfg.tls:
        return None
    ctx = ssl.create_default_context(cafile=str(cfg.tls_ca) if cfg.tls_ca else None)
    if cfg.tls_cert and cfg.tls_key:
        ctx.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key))
    return ctx


def make_peer_client(cfg: Config) -> httpx.AsyncClient:
    verify: ssl.SSLContext | bool = peer_ssl_context(cfg) or True
    headers = {"content-type": "application/msgpack", "user-agent": "meshnode-peer/1"}
    secret = cfg.secrets.outgoing_cluster_secret
    return httpx.AsyncClient(
        verify=verify,
        headers=headers,
        auth=PeerAuth(secret, cfg.node_id, cfg.secrets.cluster_secrets) if secret else None,
        timeout=httpx.Timeout(cfg.peer_timeout_s),
        # Idle connections go after 3 s, before a peer's server drops them (5 s).
        limits=httpx.Limits(max_connections=256, max_keepalive_connections=64, keepalive_expiry=3.0),
        trust_env=False,
    )


class PeerSender:
    def __init__(self, cfg: Config, client: httpx.AsyncClient, datagrams: DatagramSender | None = None) -> None:
        self.cfg = cfg
        self.client = client
        self.datagrams = datagrams
        self.paths = DatagramPaths.for_probes(max(cfg.datagram_max, 1), cfg.gossip.probe_interval_s)
        self._send, self._recv = trio.open_memory_channel[Send](cfg.send_queue_max)
        self.stats: Counter[str] = Counter()
        self._warned: set[tuple[str, str]] = set()
        self._seeds_pending: set[str] = set()
        self.seeds_tried = trio.Event()
        self.seeds_answered: list[str] = []
        self._drops_logged_at: float | None = None
        self._drops_unlogged = 0

    def watch_seeds(self, seeds: list[str]) -> None:
        """Log how the first message to each join seed fares (answered, or
        why not), and set ``seeds_tried`` once every one has had its try."""
        self._seeds_pending = set(seeds)
        if not seeds:
            self.seeds_tried.set()

    def _seed_outcome(self, to: str, problem: str | None) -> None:
        if to not in self._seeds_pending:
            return
        self._seeds_pending.discard(to)
        if problem is None:
            self.seeds_answered.append(to)
            log.info("join seed %s answered", to)
        else:
            log.warning("join seed %s unreachable (%s); the node keeps dialling its seeds in the background",
                        to, problem)
        if not self._seeds_pending:
            self.seeds_tried.set()

    def enqueue(self, sends: list[Send]) -> None:
        for s in sends:
            try:
                self._send.send_nowait(s)
                self.stats["queued"] += 1
            except trio.WouldBlock:
                self.stats["dropped_queue_full"] += 1
                self._drops_unlogged += 1
        if self._drops_unlogged:
            self._log_drops()

    def _log_drops(self) -> None:
        """A WARNING for messages dropped on a full queue: the first at once, then
        at most one per ``DROP_LOG_EVERY_S`` with the count since (gossip survives
        loss, but steady drops mean the node cannot keep up)."""
        now = time.monotonic()
        if self._drops_logged_at is not None and now - self._drops_logged_at < DROP_LOG_EVERY_S:
            return
        self._drops_logged_at = now
        n, self._drops_unlogged = self._drops_unlogged, 0
        log.warning("dropped %d peer message%s: the send queue (%d) is full, peers answer too slowly or this "
                    "node is overloaded; %d dropped in all", n, "" if n == 1 else "s", self.cfg.send_queue_max,
                    self.stats["dropped_queue_full"])

    def _first(self, to: str, reason: str) -> bool:
        """True the first time (per peer and reason) something is worth a log line."""
        if (to, reason) in self._warned or len(self._warned) >= 10_000:
            return False
        self._warned.add((to, reason))
        return True

    def answered(self, addr: str) -> None:
        """An ack came from the node at ``addr``: what we send it gets there."""
        self.paths.answered(addr)

    async def _as_datagram(self, s: Send, body: bytes) -> bool:
        """Send ``body`` as a datagram when the peer takes them and it fits
        (``protocol.peerdgram``); False when it must go by HTTP."""
        if self.datagrams is None or not self.paths.use(
                s.to, len(body), trio.current_time(), expects_reply=s.envelope.type in ANSWERED):
            return False
        if not await self.datagrams.send(s.to, body):
            return False
        self.stats["sent"] += 1
        self.stats["sent_datagrams"] += 1
        self.stats["bytes"] += len(body)
        return True

    async def send_now(self, s: Send) -> bool:
        """Deliver one message, as a datagram where it can go as one, else by
        HTTP; False (a log line, a count) on any failure of that one peer: a
        bad address, a refused connection, a timeout."""
        body = encode(s.envelope)
        if await self._as_datagram(s, body):
            return True
        return await self._post(s, body)

    async def _post(self, s: Send, body: bytes) -> bool:
        try:
            r = await self.client.post(f"{self.cfg.scheme}://{s.to}{PEER_PATH}", content=body)
        except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as e:
            # InvalidURL is not an HTTPError: an address the decoder let through
            # must still never end the node, so it is caught here too.
            self.stats["failed"] += 1
            self.paths.forget(s.to)
            log.debug("message to %s failed: %s", s.to[:80], type(e).__name__)
            self._seed_outcome(s.to, f"{type(e).__name__}: {str(e)[:120]}" if str(e) else type(e).__name__)
            return False
        if r.status_code == 204 or r.status_code == 200:
            self.stats["sent"] += 1
            self.stats["bytes"] += len(body)
            self._warned.discard((s.to, "refused"))
            self._seed_outcome(s.to, None)
            if self.datagrams is not None and r.headers.get(DGRAM_HEADER) == "1":
                self.paths.offered(s.to, trio.current_time())
            else:
                self.paths.forget(s.to)  # it takes none (any more: restarted without them)
            return True
        self.paths.forget(s.to)
        self.stats["refused"] += 1
        reason = ""
        try:
            reason = str(r.json()["error"]["message"])[:200]
        except (ValueError, KeyError, TypeError):  # not our error shape: show the text
            reason = r.text[:200]
        self._seed_outcome(s.to, f"HTTP {r.status_code}: {reason}")
        if self._first(s.to, "refused"):
            log.warning("peer %s refused our message (HTTP %d): %s", s.to, r.status_code, reason)
        return False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Datagrams leave in turn, at once; HTTP messages each get a task,
        at most ``cfg.senders`` at a time, so a slow peer holds one slot and
        never the datagrams behind it."""
        limiter = trio.CapacityLimiter(self.cfg.senders)

        async def one(s: Send, body: bytes, token: object) -> None:
            try:
                await self._post(s, body)
            except Exception:  # a bug in sending to one peer: a log line, never the node's end
                self._crashed(s)
            finally:
                limiter.release_on_behalf_of(token)

        async with trio.open_nursery() as nursery:
            task_status.started()
            async for s in self._recv:
                try:
                    body = encode(s.envelope)
                    if await self._as_datagram(s, body):
                        continue
                except Exception:
                    self._crashed(s)
                    continue
                token = object()  # a unique borrower per message
                await limiter.acquire_on_behalf_of(token)
                nursery.start_soon(one, s, body, token)

    def _crashed(self, s: Send) -> None:
        self.stats["failed"] += 1
        if self._first(s.to, "crash"):
            log.exception("sending a message to %s failed unexpectedly", s.to[:80])


class PeerClient:
    """Requests to one peer's HTTP routes: an action handed over, a manifest."""

    def __init__(self, client: httpx.AsyncClient, scheme: str, action_timeout_s: float = 10.0) -> None:
        self.client = client
        self.scheme = scheme
        self.action_timeout_s = action_timeout_s

    async def post_action(self, to: Recipient, address: str, action: dict[str, Any]) -> dict[str, Any]:
        """``POST /mesh/v1/actions`` to node ``to`` at ``address``; its answer, or a ``MeshError``
        (a peer's error answer is passed on with its code and status)."""
        node_id = to.node_id
        try:
            r = await self.client.post(f"{self.scheme}://{address}/mesh/v1/actions", json=action,
                                       timeout=self.action_timeout_s, extensions={TO: to})
        except (httpx.HTTPError, httpx.InvalidURL, OSError) as e:
            raise MeshError("PEER_UNREACHABLE", f"node {node_id!r} did not answer: {type(e).__name__}") from None
        try:
            body = r.json()
        except ValueError:
            raise MeshError("BAD_PEER_ANSWER", f"node {node_id!r} sent a non-JSON answer (HTTP {r.status_code})") from None
        if r.status_code >= 400:
            err = body.get("error", {}) if isinstance(body, dict) else {}
            err = err if isinstance(err, dict) else {}
            raise MeshError(str(err.get("code", "PEER_ERROR"))[:64], str(err.get("message", "peer refused"))[:500],
                            status=r.status_code)
        return body if isinstance(body, dict) else {}

    async def seen(self, address: str, token: str, timeout_s: float = 3.0, *, to: Recipient) -> bool:
        """Whether node ``to`` at ``address`` has seen the write ``token`` names
        (``GET /mesh/v1/seen``: it pulls from the writer, waiting a little)."""
        try:
            r = await self.client.get(f"{self.scheme}://{address}/mesh/v1/seen", headers={"X-Mesh-After": token},
                                      timeout=timeout_s, extensions={TO: to})
            return r.status_code == 200 and r.json().get("seen") is True
        except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError, AttributeError):
            return False

    async def get_manifest(self, address: str, manifest_hash: str, *, to: Recipient) -> bytes:
        """The manifest's bytes from node ``to`` at ``address`` (the caller
        checks them against the hash), or a ``MeshError``."""
        try:
            r = await self.client.get(f"{self.scheme}://{address}/mesh/v1/manifests/{manifest_hash}",
                                      extensions={TO: to})
        except (httpx.HTTPError, httpx.InvalidURL, OSError) as e:
            raise MeshError("PEER_UNREACHABLE", f"{type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise MeshError("PEER_ERROR", f"HTTP {r.status_code}")
        return r.content
