"""OpenAI-style inference through any node.

``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings`` name
a ``model``; the node forwards the request, as it came, to a healthy service
of that model anywhere in the mesh (``protocol.serving.choose_services``:
its own first, then the fewest requests in flight from here) and streams the
answer back as it arrives (server-sent events included).  A service that
refuses the connection is skipped for the next one before any byte was sent;
once the request is out, an error is the client's to see.  ``GET /v1/models``
lists every model served somewhere and healthy.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from protocol.serving import ServiceRecord, ServiceState, choose_services

from .errors import MeshError
from .mesh import Mesh
from .registry import Registry
from .serving import Services

__all__ = ["InferenceProxy"]

log = logging.getLogger("meshnode.proxy")

TRIES = 3  # services tried for one request, when the first ones refuse the connection
READ_TIMEOUT_S = 600.0  # between two bytes of an answer (a long generation streams)


class InferenceProxy:
    def __init__(self, mesh: Mesh, services: Services, registry: Registry,
                 client: httpx.AsyncClient | None = None) -> None:
        self.mesh = mesh
        self.services = services
        self.registry = registry
        self.inflight: Counter[tuple[str, int]] = Counter()
        self.forwarded = 0
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(READ_TIMEOUT_S, connect=5.0, write=30.0, pool=10.0),
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=64), trust_env=False)

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

    async def forward(self, path: str, body: bytes, model: str,
                      accept: str | None) -> tuple[int, dict[str, str], AsyncIterator[bytes]]:
        """The engine's status, headers and body (streamed) for ``body`` sent to ``path``."""
        last: str = ""
        for rec in self._candidates(model)[:TRIES]:
            base = self.services.url_of(rec)
            if base is None:
                continue
            key = (rec.node, rec.port)
            headers = {"content-type": "application/json"}
            if accept:
                headers["accept"] = accept[:200]
            req = self._client.build_request("POST", base + path, content=body, headers=headers)
            self.inflight[key] += 1
            try:
                resp = await self._client.send(req, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                self._done(key)
                last = f"{rec.node}:{rec.port}: {type(e).__name__}"
                log.info("inference for %s: %s refused the connection, trying the next service", model, last)
                continue
            except httpx.HTTPError as e:
                self._done(key)
                raise MeshError("ENGINE_FAILED", f"the service {rec.node}:{rec.port} failed: {type(e).__name__}") \
                    from None
            except BaseException:
                self._done(key)
                raise
            self.forwarded += 1
            out = {"content-type": resp.headers.get("content-type", "application/json"),
                   "x-mesh-service": f"{rec.node}:{rec.port}"}
            return resp.status_code, out, self._relay(resp, key, functools.partial(self._done, key))
        raise MeshError("NO_HEALTHY_SERVICE", f"every healthy service of {model[:200]!r} refused ({last})")

    def _done(self, key: tuple[str, int]) -> None:
        self.inflight[key] -= 1
        if self.inflight[key] <= 0:
            del self.inflight[key]

    @staticmethod
    async def _relay(resp: httpx.Response, key: tuple[str, int], done: Callable[[], None]) -> AsyncIterator[bytes]:
        try:
            async for chunk in resp.aiter_raw():
                yield chunk
        except httpx.HTTPError as e:  # the engine went away mid-answer: the client sees the cut
            log.warning("inference answer from %s:%d cut: %s", key[0], key[1], type(e).__name__)
        finally:
            await resp.aclose()
            done()
