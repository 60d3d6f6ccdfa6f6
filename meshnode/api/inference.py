"""Inference's own lean path in front of the app: ``POST /v1/chat/completions``,
``/v1/completions``, ``/v1/embeddings`` and the peer hop
``POST /mesh/v1/infer/<port>/v1/...``, answered at the ASGI level.

Every inference request, and every token event of a streamed answer, would
otherwise pay for the Quart app's request machinery (its context, seven
before- and after-request hooks, a response object): more than the
forwarding itself.  This path keeps what those hooks guard and nothing more:

* a public request passes the same edge rules (``ApiGuard.check``: Host,
  Origin, body type) and the same bearer check as every public route;
* a peer hop passes the same ``PeerGate`` (signed for this node and its
  generation, good once);
* the body is bounded (``PUBLIC_BODY_MAX``: 413 before it is read);
* its duration is observed under the route's rule, as the app's routes are;
* errors are ``{"error": {"code", "message"}}`` with the status of their code.

The answer is the engine's, streamed as it comes (``meshnode/proxy.py``);
an answer cut short ends the response without its end, so the client sees
the cut.  Everything else goes on to the app.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from protocol.routing import affinity_key

from ..errors import MeshError
from ..proxy import INFER_PATHS, AnswerCut, InferenceProxy
from .auth import PeerAuthError, PeerGate, Refusals, check_bearer, request_target
from .guard import ApiGuard

__all__ = ["InferenceFastPath"]

PEER_INFER = "/mesh/v1/infer/"
PEER_RULE = "/mesh/v1/infer/<int:port>/v1/<path:rest>"


class _Headers:
    """An ASGI scope's headers, read case-insensitively (what ``ApiGuard`` asks)."""

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._d = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw}

    def get(self, key: str) -> str | None:
        return self._d.get(key.lower())


def _error_message(e: MeshError) -> bytes:
    return json.dumps({"error": {"code": e.code, "message": e.message, **e.details}},
                      separators=(",", ":")).encode()


class InferenceFastPath:
    def __init__(self, app: Any, *, proxy: Callable[[], InferenceProxy | None], api_tokens: tuple[str, ...],
                 guard: ApiGuard, gate: PeerGate, refusals: Refusals, body_max: int,
                 observe: Callable[[str, str, float], None]) -> None:
        self.app = app
        self.proxy = proxy
        self.api_tokens = api_tokens
        self.guard = guard
        self.gate = gate
        self.refusals = refusals
        self.body_max = body_max
        self.observe = observe

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path in INFER_PATHS:
            rule = path
        elif path.startswith(PEER_INFER):
            rule = PEER_RULE
        else:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            await self._handle(scope, receive, send, path)
        except MeshError as e:
            await _reply(send, e.status, _error_message(e), close=e.status in (401, 413))
        except AnswerCut:
            pass  # logged where it happened; returning unfinished closes the connection: the client sees the cut
        finally:
            self.observe("POST", rule, time.perf_counter() - started)

    async def _handle(self, scope: dict[str, Any], receive: Any, send: Any, path: str) -> None:
        headers = _Headers(scope["headers"])
        client = scope.get("client") or ("?", 0)
        remote = str(client[0])
        proxy = self.proxy()
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.body_max:
            raise MeshError("TOO_LARGE", f"request body of {length} bytes is over the {self.body_max} byte limit")
        if path.startswith(PEER_INFER):
            try:
                cred = self.gate.precheck(scope["headers"])
                body = await self._body(receive)
                if cred is not None:
                    self.gate.check(cred, "POST", request_target(scope.get("raw_path") or path.encode(),
                                                                 scope.get("query_string", b"")), body)
            except PeerAuthError as e:
                self.refusals.note(remote, "a peer request", e)
                await _reply(send, 401, _error_message(MeshError("UNAUTHORIZED", e.reason)), close=True,
                             extra=list(e.headers.items()))
                return
            port_text, _, rest = path[len(PEER_INFER):].partition("/")
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise MeshError("NOT_FOUND", "no such route")
            if proxy is None:
                raise MeshError("STARTING", "the node is still starting")
            status, out, stream = await proxy.relay_local(int(port_text), "/" + rest, body, headers.get("accept"))
        else:
            self.guard.check("POST", path, headers, scope.get("scheme", "http"), remote)
            if not check_bearer(headers.get("authorization"), self.api_tokens):
                self.refusals.note(remote, "an API request")
                raise MeshError("UNAUTHORIZED", "missing or wrong API token")
            body = await self._body(receive)
            if proxy is None:
                raise MeshError("STARTING", "the node is still starting")
            doc = _json_of(body)
            status, out, stream = await proxy.forward(path, body, _model_of(doc), headers.get("accept"),
                                                      affinity_key(doc, headers.get("x-session-id")))
        await _stream(send, status, out, stream)

    async def _body(self, receive: Any) -> bytes:
        chunks, size = [], 0
        while True:
            event = await receive()
            if event["type"] == "http.disconnect":
                raise MeshError("INVALID_REQUEST", "the client went away before its body ended")
            data = event.get("body", b"")
            size += len(data)
            if size > self.body_max:
                raise MeshError("TOO_LARGE", f"request body over {self.body_max} bytes")
            chunks.append(data)
            if not event.get("more_body", False):
                return b"".join(chunks)


def _json_of(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise MeshError("INVALID_JSON", "the request body is not JSON") from None


def _model_of(doc: Any) -> str:
    """The ``model`` an OpenAI-style request names."""
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, str) or not 0 < len(model) <= 200:
        raise MeshError("INVALID_REQUEST", "the request names its model: {\"model\": \"...\", ...}")
    return model


async def _reply(send: Any, status: int, body: bytes, *, close: bool = False,
                 extra: list[tuple[str, str]] | None = None) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in extra or []]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _stream(send: Any, status: int, headers: dict[str, str], stream: AsyncIterator[bytes]) -> None:
    """The answer as it comes; with a known length, its last bytes end the
    response in the same write (one send less a request, not a byte held)."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in headers.items()]})
    length = headers.get("content-length", "")
    left = int(length) if length.isdigit() else -1
    async for chunk in stream:
        if chunk:
            left -= len(chunk)
            if left == 0:
                async for _rest in stream:  # the answer's end first: accounted for, its connection pooled
                    pass
                await send({"type": "http.response.body", "body": chunk, "more_body": False})
                return
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
