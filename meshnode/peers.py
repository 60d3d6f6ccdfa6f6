"""Outgoing peer messages: a bounded queue drained into at most
``cfg.senders`` concurrent requests over one pooled httpx client.

Each message gets its own task (within that bound), so one slow peer holds
one slot, not the probes to everyone else.  Gossip tolerates loss by design,
so a full queue drops the newest message and counts it rather than blocking
the state machine; every request has a timeout.  A peer that refuses us (wrong secret, other cluster, other version)
is logged once per peer and reason, without the secret.
"""

from __future__ import annotations

import logging
import ssl
from collections import Counter

import httpx
import trio

from protocol.gossip import Send
from protocol.wire import encode

from .config import Config

__all__ = ["PEER_PATH", "PeerSender", "make_peer_client"]

log = logging.getLogger("meshnode.peers")

PEER_PATH = "/mesh/v1/msg"


def make_peer_client(cfg: Config) -> httpx.AsyncClient:
    verify: ssl.SSLContext | bool = True
    cert = None
    if cfg.tls:
        ctx = ssl.create_default_context(cafile=str(cfg.tls_ca) if cfg.tls_ca else None)
        if cfg.tls_cert and cfg.tls_key:
            ctx.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key))
        verify = ctx
    headers = {"content-type": "application/msgpack", "user-agent": "meshnode-peer/1"}
    secret = cfg.secrets.outgoing_cluster_secret
    if secret:
        headers["authorization"] = f"Bearer {secret}"
    return httpx.AsyncClient(
        verify=verify,
        cert=cert,
        headers=headers,
        timeout=httpx.Timeout(cfg.peer_timeout_s),
        limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        trust_env=False,
    )


class PeerSender:
    def __init__(self, cfg: Config, client: httpx.AsyncClient) -> None:
        self.cfg = cfg
        self.client = client
        self._send, self._recv = trio.open_memory_channel[Send](cfg.send_queue_max)
        self.stats: Counter[str] = Counter()
        self._warned: set[tuple[str, str]] = set()

    def enqueue(self, sends: list[Send]) -> None:
        for s in sends:
            try:
                self._send.send_nowait(s)
                self.stats["queued"] += 1
            except trio.WouldBlock:
                self.stats["dropped_queue_full"] += 1

    def _warn_once(self, to: str, reason: str, msg: str, *args: object) -> None:
        if (to, reason) not in self._warned and len(self._warned) < 10_000:
            self._warned.add((to, reason))
            log.warning(msg, *args)

    async def send_now(self, s: Send) -> bool:
        url = f"{self.cfg.scheme}://{s.to}{PEER_PATH}"
        try:
            r = await self.client.post(url, content=encode(s.envelope))
        except httpx.HTTPError as e:
            self.stats["failed"] += 1
            log.debug("message to %s failed: %s", s.to, type(e).__name__)
            return False
        if r.status_code == 204 or r.status_code == 200:
            self.stats["sent"] += 1
            self._warned.discard((s.to, "refused"))
            return True
        self.stats["refused"] += 1
        reason = ""
        try:
            reason = str(r.json()["error"]["message"])[:200]
        except Exception:
            reason = r.text[:200]
        self._warn_once(s.to, "refused", "peer %s refused our message (HTTP %d): %s", s.to, r.status_code, reason)
        return False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        limiter = trio.CapacityLimiter(self.cfg.senders)

        async def one(s: Send, token: object) -> None:
            try:
                await self.send_now(s)
            finally:
                limiter.release_on_behalf_of(token)

        async with trio.open_nursery() as nursery:
            task_status.started()
            async for s in self._recv:
                token = object()  # a unique borrower per message
                await limiter.acquire_on_behalf_of(token)
                nursery.start_soon(one, s, token)
