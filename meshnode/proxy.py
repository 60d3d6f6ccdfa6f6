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
import random
import ssl
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import trio

from protocol.peerauth import AUTH_HEADER, HINT_HEADER, Recipient, nonce_of, read_hint
from protocol.routing import route
from protocol.serving import ServiceRecord, ServiceState

from .engineclient import Answer, BadAnswer, EngineClient, Unreachable
from .errors import MeshError
from .mesh import Mesh
from .peers import sign_headers
from .registry import Registry
from .serving import ENGINE_HOST, Services

__all__ = ["INFER_PATHS", "AnswerCut", "InferenceProxy", "PeerHop"]

log = logging.getLogger("meshnode.proxy")

INFER_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
TRIES = 3  # services tried for one request, when the first ones refuse the connection
READ_TIMEOUT_S = 600.0  # between two bytes of an answer (a long generation streams)
PASSED_HEADERS = (b"content-type", b"content-length", b"content-encoding", b"cache-control")  # of an answer


class AnswerCut(Exception):
    """An engine's answer ended before its end: the client's connection is
    closed without the answer's end, so the client sees the cut."""


@dataclass(frozen=True)
class PeerHop:
    """How this node reaches another node's API: its scheme and TLS context,
    and the cluster secret it signs with (None: no secret, nothing signed)."""

    scheme: str = "http"
    ssl_context: ssl.SSLContext | None = None
    secret: str | None = None
    accepted: tuple[str, ...] = ()  # every secret we accept: a hint of a new generation is checked under them


Forwarded = tuple[int, dict[str, str], AsyncIterator[bytes]]


class InferenceProxy:
    def __init__(self, mesh: Mesh, services: Services, registry: Registry, hop: PeerHop) -> None:
        self.mesh = mesh
        self.services = services
        self.registry = registry
        self.hop = hop
        self.inflight: Counter[tuple[str, int]] = Counter()
        self.forwarded = 0
        self._client = EngineClient(read_timeout_s=READ_TIMEOUT_S, ssl_context=hop.ssl_context)

    async def aclose(self) -> None:
        await self._client.aclose()

    def models_json(self) -> dict[str, Any]:
        names = sorted({s.model for s in self.services.records() if s.state is ServiceState.HEALTHY})
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "meshnode"} for n in names]}

    def _candidates(self, model: str, key: str | None) -> list[ServiceRecord]:
        records = self.services.records()
        reachable = {m.record.node_id for m in self.mesh.members() if m.state.reachable}
        cands = route(records, model, self.mesh.id, reachable, self.inflight, key,
                      draw=random.getrandbits(32), routers=len(reachable) + 1)
        if cands:
            return cands
        if self.registry.find(model) is None and not any(s.model == model for s in records):
            raise MeshError("MODEL_NOT_FOUND", f"model {model[:200]!r} is neither registered nor served")
        states = sorted({f"{s.node}:{s.port} {s.state.value}" for s in records if s.model == model})
        raise MeshError("NO_HEALTHY_SERVICE", f"no healthy service of {model[:200]!r} in the mesh"
                        + (f" ({', '.join(states[:8])})" if states else " (it is not served anywhere)"))

    async def forward(self, path: str, body: bytes, model: str, accept: str | None,
                      key: str | None = None) -> Forwarded:
        """The engine's status, headers and body (streamed) for ``body`` sent
        to ``path``; ``key``: what the route sticks to (``protocol.routing``)."""
        last: str = ""
        for rec in self._candidates(model, key)[:TRIES]:
            try:
                return await self._send(rec, path, body, accept)
            except Unreachable as e:
                last = f"{rec.node}:{rec.port}: {e}"
                log.info("inference for %s: %s refused the connection, trying the next service", model, last)
        raise MeshError("NO_HEALTHY_SERVICE", f"every healthy service of {model[:200]!r} refused ({last})")

    async def relay_local(self, port: int, path: str, body: bytes, accept: str | None) -> Forwarded:
        """A peer's hop: ``body`` to this node's own engine on ``port``."""
        if path not in INFER_PATHS:
            raise MeshError("NOT_FOUND", f"no inference route {path[:100]!r}")
        rec = next((r for r in self.services.records() if r.node == self.mesh.id and r.port == port
                    and r.state.up), None)
        if rec is None:
            raise MeshError("SERVICE_NOT_FOUND", f"{self.mesh.id} runs no service on port {port}")
        try:
            return await self._send(rec, path, body, accept)
        except Unreachable as e:
            raise MeshError("ENGINE_FAILED", f"the service {rec.node}:{rec.port} refused: {e}") from None

    async def _send(self, rec: ServiceRecord, path: str, body: bytes, accept: str | None) -> Forwarded:
        """Send to ``rec``'s engine: on this node straight to it, else through
        its node's peer route, signed for that node.  ``Unreachable`` when no
        connection could be made; the answer's status, the headers passed on,
        and its body as it comes."""
        where = f"{rec.node}:{rec.port}"
        key = (rec.node, rec.port)
        headers = [("content-type", "application/json"), ("accept-encoding", "identity")]
        if accept:
            headers.append(("accept", accept[:200]))
        self.inflight[key] += 1
        try:
            if rec.node == self.mesh.id:
                answer = await self._client.request("http", ENGINE_HOST, rec.port, "POST", path, headers, body)
            else:
                answer = await self._hop(rec, path, headers, body)
            first = await self._first(answer, where)
        except BadAnswer as e:
            self._done(key)
            raise MeshError("ENGINE_BAD_ANSWER", f"the service {where}: {e}") from None
        except trio.TooSlowError:
            self._done(key)
            raise MeshError("ENGINE_FAILED", f"the service {where} did not answer within {READ_TIMEOUT_S:g} s") \
                from None
        except BaseException:
            self._done(key)
            raise
        self.forwarded += 1
        out = {k.decode(): v.decode("latin-1") for k, v in answer.headers if k in PASSED_HEADERS}
        out.setdefault("content-type", "application/json")
        out["x-mesh-service"] = where
        return answer.status, out, self._relay(answer, first, where, key)

    async def _hop(self, rec: ServiceRecord, path: str, headers: list[tuple[str, str]], body: bytes) -> Answer:
        m = self.mesh.member(rec.node)
        if m is None:
            raise Unreachable(f"node {rec.node} is not known")
        host, _, port = m.record.address.rpartition(":")
        host = host.strip("[]")
        target = f"/mesh/v1/infer/{rec.port}{path}"
        to = Recipient(rec.node, m.record.generation)
        for again in (False, True):
            signed = list(headers)
            nonce = ""
            if self.hop.secret is not None:
                auth = sign_headers(self.hop.secret, self.mesh.id, "POST", target, body, to=to)
                signed.append((AUTH_HEADER, auth[AUTH_HEADER]))
                nonce = nonce_of(auth[AUTH_HEADER])
            answer = await self._client.request(self.hop.scheme, host, int(port), "POST", target, signed, body)
            hint = answer.header(HINT_HEADER.encode())
            if answer.status != 401 or again or hint is None or self.hop.secret is None:
                return answer
            told = read_hint(hint.decode("latin-1"), self.hop.accepted or (self.hop.secret,), nonce, rec.node)
            if told is None or told == to:
                return answer
            async for _ in answer.body:  # drain the refusal; sign once more, for the node's new generation
                pass
            to = told
        raise AssertionError("unreachable")

    @staticmethod
    async def _first(answer: Answer, where: str) -> bytes:
        """The answer's first bytes: a 2xx JSON answer that does not start as
        JSON is ``ENGINE_BAD_ANSWER`` (nothing is parsed: one look at its start)."""
        try:
            first = await anext(answer.body, b"")
        except (BadAnswer, trio.TooSlowError) as e:
            raise MeshError("ENGINE_BAD_ANSWER", f"the service {where} broke off its answer: {e}") from None
        ctype = answer.header(b"content-type") or b""
        if 200 <= answer.status < 300 and ctype.startswith(b"application/json") and first.strip()[:1] not in (b"{", b"["):
            await answer.body.aclose()
            raise MeshError("ENGINE_BAD_ANSWER", f"the service {where} answered {answer.status} with a body that "
                            "is not JSON")
        return first

    def _done(self, key: tuple[str, int]) -> None:
        self.inflight[key] -= 1
        if self.inflight[key] <= 0:
            del self.inflight[key]

    async def _relay(self, answer: Answer, first: bytes, where: str, key: tuple[str, int]) -> AsyncIterator[bytes]:
        try:
            if first:
                yield first
            async for chunk in answer.body:
                yield chunk
        except (BadAnswer, trio.TooSlowError) as e:  # the engine went away mid-answer: the client must see the cut
            log.warning("inference answer from %s cut: %s", where, e)
            raise AnswerCut(f"the answer from {where} was cut: {e}") from None
        finally:
            await answer.body.aclose()
            self._done(key)
