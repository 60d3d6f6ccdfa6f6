"""OpenAI-style inference through any node.

``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings`` name
a ``model``; the node forwards the request, as it came, to a healthy service
of that model anywhere in the mesh (``protocol.serving.choose_services``:
its own first, then the fewest requests in flight from here) and streams the
answer back as it arrives (server-sent events included), byte for byte:
nothing in an engine's answer is parsed or buffered.

Engines listen on their node's loopback only.  A service on this node is
reached at ``127.0.0.1:port``; one on another node through that node's peer
route ``POST /mesh/v1/infer/<port>/v1/...``, signed with the cluster secret
like every peer request, which relays it to its own engine (``relay_local``).
So the API token (here) and the cluster secret (between nodes) guard every
way in.  A service that refuses the connection is skipped for the next one
before any byte was sent; once the request is out, an error is the client's
to see: an answer that is not HTTP, or a JSON answer that does not start as
JSON, is 502 ``ENGINE_BAD_ANSWER``; an answer cut short ends the client's
connection without its end, so the client sees the cut.  ``GET /v1/models``
lists every model served somewhere and healthy.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx

from protocol.serving import ServiceRecord, ServiceState, choose_services

from .errors import MeshError
from .mesh import Mesh
from .peers import TO, PeerClient, Recipient
from .registry import Registry
from .serving import ENGINE_HOST, Services

__all__ = ["INFER_PATHS", "AnswerCut", "InferenceProxy"]

log = logging.getLogger("meshnode.proxy")

INFER_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
TRIES = 3  # services tried for one request, when the first ones refuse the connection
READ_TIMEOUT_S = 600.0  # between two bytes of an answer (a long generation streams)
TIMEOUT = httpx.Timeout(READ_TIMEOUT_S, connect=5.0, write=30.0, pool=10.0)
PASSED_HEADERS = ("content-type", "content-length", "content-encoding", "cache-control")  # of an engine's answer, to the client


class AnswerCut(Exception):
    """An engine's answer ended before its end: the client's connection is
    closed without the answer's end, so the client sees the cut."""


Answer = tuple[int, dict[str, str], AsyncIterator[bytes]]


class InferenceProxy:
    def __init__(self, mesh: Mesh, services: Services, registry: Registry, peers: PeerClient,
                 client: httpx.AsyncClient | None = None) -> None:
        self.mesh = mesh
        self.services = services
        self.registry = registry
        self.peers = peers
        self.inflight: Counter[tuple[str, int]] = Counter()
        self.forwarded = 0
        self._client = client or httpx.AsyncClient(
            timeout=TIMEOUT, limits=httpx.Limits(max_connections=512, max_keepalive_connections=64), trust_env=False)

    async def aclose(self) -> None:
        await self._client.aclose()

    def models_json(self) -> dict[str, Any]:
        names = sorted({s.model for s in self.services.records() if s.state is ServiceState.HEALTHY})
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "meshnode"} for n in names]}

    def _candidates(self, model: str) -> list[ServiceRecord]:
        records = self.services.records()
        reachable = {m.record.node_id for m in self.mesh.members() if m.state.reachable}
        cands = choose_services(records, model, self.mesh.id, reachable, self.inflight)
        if cands:
            return cands
        if self.registry.find(model) is None and not any(s.model == model for s in records):
            raise MeshError("MODEL_NOT_FOUND", f"model {model[:200]!r} is neither registered nor served")
        states = sorted({f"{s.node}:{s.port} {s.state.value}" for s in records if s.model == model})
        raise MeshError("NO_HEALTHY_SERVICE", f"no healthy service of {model[:200]!r} in the mesh"
                        + (f" ({', '.join(states[:8])})" if states else " (it is not served anywhere)"))

    def _request(self, rec: ServiceRecord, path: str, body: bytes, accept: str | None) -> httpx.Request | None:
        headers = {"content-type": "application/json", "accept-encoding": "identity"}
        if accept:
            headers["accept"] = accept[:200]
        if rec.node == self.mesh.id:
            return self._client.build_request("POST", f"http://{ENGINE_HOST}:{rec.port}{path}", content=body,
                                              headers=headers)
        m = self.mesh.member(rec.node)
        if m is None:
            return None
        url = f"{self.peers.scheme}://{m.record.address}/mesh/v1/infer/{rec.port}{path}"
        return self.peers.client.build_request("POST", url, content=body, headers=headers, timeout=TIMEOUT,
                                               extensions={TO: Recipient(rec.node, m.record.generation)})

    async def forward(self, path: str, body: bytes, model: str, accept: str | None) -> Answer:
        """The engine's status, headers and body (streamed) for ``body`` sent to ``path``."""
        last: str = ""
        for rec in self._candidates(model)[:TRIES]:
            req = self._request(rec, path, body, accept)
            if req is None:
                continue
            key = (rec.node, rec.port)
            client = self._client if rec.node == self.mesh.id else self.peers.client
            self.inflight[key] += 1
            try:
                status, headers, stream = await self._send(client, req, f"{rec.node}:{rec.port}", key)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                last = f"{rec.node}:{rec.port}: {type(e).__name__}"
                log.info("inference for %s: %s refused the connection, trying the next service", model, last)
                continue
            self.forwarded += 1
            headers["x-mesh-service"] = f"{rec.node}:{rec.port}"
            return status, headers, stream
        raise MeshError("NO_HEALTHY_SERVICE", f"every healthy service of {model[:200]!r} refused ({last})")

    async def relay_local(self, port: int, path: str, body: bytes, accept: str | None) -> Answer:
        """A peer's hop: ``body`` to this node's own engine on ``port``."""
        if path not in INFER_PATHS:
            raise MeshError("NOT_FOUND", f"no inference route {path[:100]!r}")
        rec = next((r for r in self.services.records() if r.node == self.mesh.id and r.port == port
                    and r.state.up), None)
        if rec is None:
            raise MeshError("SERVICE_NOT_FOUND", f"{self.mesh.id} runs no service on port {port}")
        req = self._request(rec, path, body, accept)
        assert req is not None
        key = (rec.node, rec.port)
        self.inflight[key] += 1
        try:
            return await self._send(self._client, req, f"{rec.node}:{rec.port}", key)
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            raise MeshError("ENGINE_FAILED", f"the service {rec.node}:{rec.port} refused: {type(e).__name__}") \
                from None

    async def _send(self, client: httpx.AsyncClient, req: httpx.Request, where: str, key: tuple[str, int]) -> Answer:
        """Send ``req``; the answer's status, the headers passed on, and its
        body as it comes.  ``key``'s in-flight count ends with the body."""
        try:
            resp = await client.send(req, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            self._done(key)
            raise
        except httpx.RemoteProtocolError:
            self._done(key)
            raise MeshError("ENGINE_BAD_ANSWER", f"the service {where} answered something that is not HTTP") \
                from None
        except httpx.HTTPError as e:
            self._done(key)
            raise MeshError("ENGINE_FAILED", f"the service {where} failed: {type(e).__name__}") from None
        except BaseException:
            self._done(key)
            raise
        chunks = resp.aiter_raw()
        try:
            first = await anext(chunks, b"")
            if 200 <= resp.status_code < 300 and resp.headers.get("content-type", "").startswith("application/json") \
                    and first.strip()[:1] not in (b"{", b"["):
                raise MeshError("ENGINE_BAD_ANSWER", f"the service {where} answered {resp.status_code} with a body "
                                "that is not JSON")
        except httpx.HTTPError as e:
            await resp.aclose()
            self._done(key)
            raise MeshError("ENGINE_BAD_ANSWER", f"the service {where} broke off its answer: {type(e).__name__}") \
                from None
        except BaseException:
            await resp.aclose()
            self._done(key)
            raise
        out = {k: resp.headers[k] for k in PASSED_HEADERS if k in resp.headers}
        out.setdefault("content-type", "application/json")
        return resp.status_code, out, self._relay(resp, first, chunks, where, key)

    def _done(self, key: tuple[str, int]) -> None:
        self.inflight[key] -= 1
        if self.inflight[key] <= 0:
            del self.inflight[key]

    async def _relay(self, resp: httpx.Response, first: bytes, chunks: AsyncIterator[bytes], where: str,
                     key: tuple[str, int]) -> AsyncIterator[bytes]:
        try:
            if first:
                yield first
            async for chunk in chunks:
                yield chunk
        except httpx.HTTPError as e:  # the engine went away mid-answer: the client must see the cut
            log.warning("inference answer from %s cut: %s", where, type(e).__name__)
            raise AnswerCut(f"the answer from {where} was cut: {type(e).__name__}") from None
        finally:
            await resp.aclose()
            self._done(key)
