"""The peer route, ``POST /mesh/v1/msg``, as a bare ASGI handler.

Peer messages are the bulk of a node's requests (every probe, ack and
anti-entropy step is one), so they skip the web framework: check the form and
freshness of the peer credential, read at most ``MAX_MESSAGE_BYTES``, check
its MAC and nonce, hand the bytes to the node (which checks that the
envelope's sender is the one that signed), answer 204 (saying, when its UDP
port is bound, that the node takes small messages as datagrams there:
``protocol.peerdgram``).  Everything else goes
to the Quart app.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from protocol import RemoteProtocolError
from protocol.peerdgram import DGRAM_HEADER
from protocol.wire import MAX_MESSAGE_BYTES

from ..peers import PEER_PATH
from .auth import PeerAuthError, PeerGate, Refusals, request_target

__all__ = ["DrainOrClose", "PeerFastPath"]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Any  # Quart's own, more precise, ASGI types


async def _reply(send: Send, status: int, code: str = "", message: str = "", close: bool = False,
                 extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    body = b"" if status == 204 else json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [(b"content-length", str(len(body)).encode()), *extra]
    if body:
        headers.append((b"content-type", b"application/json"))
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _has_body(scope: Scope) -> bool:
    for k, v in scope["headers"]:
        if k == b"content-length":
            return v.strip() not in (b"0", b"")
        if k == b"transfer-encoding":
            return True
    return False


class DrainOrClose:
    """Every response drains the request or closes the connection.

    A route that answered before the request's body had arrived (401, 404,
    405, a refusal by size) hung a keep-alive connection for 30 s: Quart
    cancels the request's task as soon as its response is sent, which cut
    hypercorn short while it was deciding, in that very task, whether to
    close the connection or ready it for the next request.  So the last send
    of every response is shielded (bounded, like hypercorn's own writes), and
    a response sent before the body was all read says ``Connection: close``:
    the client opens a fresh connection, the server closes this one."""

    def __init__(self, app: ASGIApp, send_timeout_s: float = 30.0) -> None:
        self.app = app
        self.send_timeout_s = send_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        drained = not _has_body(scope)

        async def tracked_receive() -> dict[str, Any]:
            nonlocal drained
            event = await receive()
            if event["type"] != "http.request" or not event.get("more_body", False):
                drained = True
            return event

        async def guarded_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and not drained:
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.move_on_after(self.send_timeout_s) as scope_:
                    scope_.shield = True
                    await send(message)
                return
            await send(message)

        await self.app(scope, tracked_receive, guarded_send)


Receiver = Callable[[bytes, str, "str | None"], None]  # data, remote, signer; raises RemoteProtocolError


_TAKES_DATAGRAMS = ((DGRAM_HEADER.encode(), b"1"),)


class PeerFastPath:
    def __init__(self, app: ASGIApp, gate: PeerGate, refusals: Refusals, receive: Receiver,
                 takes_datagrams: Callable[[], bool] = lambda: False) -> None:
        self.app = app
        self.gate = gate
        self.refusals = refusals
        self.receive = receive
        self.takes_datagrams = takes_datagrams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PEER_PATH:
            await self.app(scope, receive, send)
            return
        client = scope.get("client") or ("?", 0)
        remote = f"{client[0]}:{client[1]}"
        if scope["method"] != "POST":
            await _reply(send, 405, "METHOD_NOT_ALLOWED", "peer messages are POSTed")
            return
        length = None
        for k, v in scope["headers"]:
            if k == b"content-length":
                length = int(v) if v.isdigit() else None
        try:
            cred = self.gate.precheck(scope["headers"])
        except PeerAuthError as e:
            self.refusals.note(remote, "a peer message", e)
            await _reply(send, 401, "UNAUTHORIZED", e.reason, close=True)
            return
        if length is not None and length > MAX_MESSAGE_BYTES:
            await _reply(send, 413, "TOO_LARGE", f"message over {MAX_MESSAGE_BYTES} bytes", close=True)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await receive()
            if event["type"] != "http.request":
                return  # the client went away
            chunk = event.get("body", b"")
            size += len(chunk)
            if size > MAX_MESSAGE_BYTES:
                await _reply(send, 413, "TOO_LARGE", f"message over {MAX_MESSAGE_BYTES} bytes", close=True)
                return
            chunks.append(chunk)
            if not event.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            target = request_target(scope.get("raw_path") or PEER_PATH.encode(), scope.get("query_string", b""))
            sender = self.gate.check(cred, "POST", target, body)
        except PeerAuthError as e:
            self.refusals.note(remote, "a peer message", e)
            await _reply(send, 401, "UNAUTHORIZED", e.reason)
            return
        try:
            self.receive(body, remote, sender)
        except RemoteProtocolError as e:
            await _reply(send, 400, "BAD_PEER_MESSAGE", str(e)[:300])
            return
        await _reply(send, 204, extra=_TAKES_DATAGRAMS if self.takes_datagrams() else ())
