"""The HTTP server: hypercorn's connection handling behind our own accept loop.

Why not ``hypercorn.trio.serve``: it accepts every connection it can, so
about 1,000 idle connections (slowloris) at ``ulimit -n 1024`` stopped
``/health``, and several thousand under a higher limit starved the peer
routes until peers marked the node dead.  This loop admits a connection only
within bounds, decided the moment it is accepted:

* at most ``total`` connections at once, derived from the file-descriptor
  limit (which the daemon raises to its hard limit first);
* at most ``per_client`` from one client address;
* the last ``reserve`` slots only for *privileged* clients: the mesh's
  members, this host's own addresses and loopback, so peer messages and
  health probes get through under any load from elsewhere.

A refused connection gets a one-line 503 and is closed at once, without
reading it.  An admitted one must send a complete request head within
``header_timeout_s`` (hypercorn's idle timer runs from the connection's start,
and again after each response, until a request head has arrived, so a client
that trickles a header byte at a time is cut off), and its head is bounded
in size by h11.  Everything past the accept is hypercorn's ``TCPServer``.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import tcp_server as _tcp_server
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, LifespanState
from hypercorn.utils import ShutdownError, raise_shutdown, repr_socket_addr, wrap_app

__all__ = ["ConnectionLimits", "HttpServer", "raise_fd_limit"]

log = logging.getLogger("meshnode.http")

# hypercorn reads a connection 64 KiB at a time, and each read costs its event
# machinery about 150 us: a large body (a bundle's import) spent more in that
# than in hashing.  A read takes what the socket holds, up to this (issue 29).
_tcp_server.MAX_RECV = 1024 * 1024

_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_BUSY_BODY = b'{"error":{"code":"TOO_MANY_CONNECTIONS","message":"too many connections; try again later"}}'
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


def raise_fd_limit(want: int = 65536) -> int:
    """Raise the soft limit on open files towards the hard one (at most
    ``want``); the soft limit in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return want if soft == resource.RLIM_INFINITY else soft


@dataclass(frozen=True)
class ConnectionLimits:
    total: int
    per_client: int = 64
    reserve: int = 32
    header_timeout_s: float = 5.0

    @classmethod
    def for_fd_limit(cls, nofile: int, *, total: int | None = None, per_client: int = 64) -> ConnectionLimits:
        """Half of what the descriptor limit leaves after the data plane, the
        peer client, open copies and the rest (about 512), at most 4096."""
        if total is None:
            total = max(64, min(4096, (nofile - 512) // 2))
        reserve = max(8, total // 8)
        return cls(total=total, per_client=min(per_client, total), reserve=min(reserve, total - 1))


class HttpServer:
    """Serves an ASGI app with hypercorn's per-connection machinery, admitting
    connections within ``limits``; ``privileged(ip)`` says which clients may
    use the reserve and are not held to the per-client bound."""

    def __init__(self, app: Any, config: HyperConfig, limits: ConnectionLimits, privileged: Callable[[str], bool]) -> None:
        self.app = wrap_app(app, config.wsgi_max_body_size, None)
        self.config = config
        self.limits = limits
        self.privileged = privileged
        self.open = 0
        self.by_client: Counter[str] = Counter()
        self.refused = 0
        self._refused_logged_at = -1e9

    def statistics(self) -> dict[str, int]:
        return {"http_connections": self.open, "http_connections_refused": self.refused}

    async def serve(
        self,
        *,
        shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind, report the bound addresses (``["http://127.0.0.1:7420"]``), serve until cancelled."""
        config = self.config
        lifespan_state: LifespanState = {}
        lifespan = Lifespan(self.app, config, lifespan_state)
        context = WorkerContext(None)
        async with trio.open_nursery() as lifespan_nursery:
            await lifespan_nursery.start(lifespan.handle_lifespan)
            await lifespan.wait_for_startup()
            async with trio.open_nursery() as server_nursery:
                sockets = config.create_sockets()
                ssl_context = config.create_ssl_context()
                listeners: list[trio.abc.Listener[Any]] = []
                binds = []
                for sock, secure in [*((s, True) for s in sockets.secure_sockets), *((s, False) for s in sockets.insecure_sockets)]:
                    sock.listen(config.backlog)
                    listener: trio.abc.Listener[Any] = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
                    if secure:
                        listener = trio.SSLListener(listener, ssl_context, https_compatible=True)  # type: ignore[arg-type]
                    listeners.append(listener)
                    binds.append(("https://" if secure else "http://") + repr_socket_addr(sock.family, sock.getsockname()))
                task_status.started(binds)
                handler = partial(self._connection, partial(TCPServer, self.app, config, context, ConnectionState(lifespan_state.copy())))
                try:
                    async with trio.open_nursery(strict_exception_groups=True) as nursery:
                        if shutdown_trigger is not None:
                            nursery.start_soon(raise_shutdown, shutdown_trigger)
                        nursery.start_soon(raise_shutdown, context.terminate.wait)
                        for listener in listeners:
                            nursery.start_soon(self._accept_loop, listener, handler, server_nursery)
                        await trio.sleep_forever()
                except BaseExceptionGroup as error:
                    _, other_errors = error.split((ShutdownError, KeyboardInterrupt))
                    if other_errors is not None:
                        raise other_errors from None
                finally:
                    await context.terminated.set()
                    server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
            await lifespan.wait_for_shutdown()
            lifespan_nursery.cancel_scope.cancel()

    async def _accept_loop(
        self, listener: trio.abc.Listener[Any], handler: Callable[[Any, str], Awaitable[None]], nursery: trio.Nursery
    ) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as e:
                    if e.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    self._note_refused("out of file descriptors: %s", errno.errorcode.get(e.errno or 0, "?"))
                    await trio.sleep(0.1)
                    continue
                sock = (stream.transport_stream if isinstance(stream, trio.SSLStream) else stream).socket
                try:
                    ip = str(sock.getpeername()[0])
                except OSError:  # gone already
                    await trio.aclose_forcefully(stream)
                    continue
                why = self._refusal(ip)
                if why is not None:
                    self._refuse(sock, stream, ip, why)
                    continue
                self.open += 1
                self.by_client[ip] += 1
                nursery.start_soon(handler, stream, ip)

    def _refusal(self, ip: str) -> str | None:
        lim = self.limits
        if self.open >= lim.total:
            return f"at its limit of {lim.total} connections"
        if self.privileged(ip):
            return None
        if self.open >= lim.total - lim.reserve:
            return f"at {self.open} connections, the last {lim.reserve} kept for peers and local clients"
        if self.by_client[ip] >= lim.per_client:
            return f"{lim.per_client} connections from one client"
        return None

    def _refuse(self, sock: trio.socket.SocketType, stream: Any, ip: str, why: str) -> None:
        self.refused += 1
        try:
            if not isinstance(stream, trio.SSLStream):
                os.write(sock.fileno(), _BUSY)  # non-blocking: best effort, never waits
        except OSError:
            pass
        sock.close()
        self._note_refused("refused a connection from %s: %s", ip, why)

    def _note_refused(self, msg: str, *args: object) -> None:
        now = trio.current_time()
        if now - self._refused_logged_at >= 10:  # one line per 10 s, with the count
            self._refused_logged_at = now
            log.warning(msg + " (%d refused so far)", *args, self.refused)

    async def _connection(self, make_server: Callable[[Any], Awaitable[None]], stream: Any, ip: str) -> None:
        try:
            await make_server(stream)
        finally:
            await trio.aclose_forcefully(stream)  # also when cancelled before hypercorn closed it
            self.open -= 1
            self.by_client[ip] -= 1
            if self.by_client[ip] <= 0:
                del self.by_client[ip]
