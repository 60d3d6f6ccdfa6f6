"""What an API token may make a node read: the operator's ingest roots, and
public HTTP servers.

An API token names sources, and the node reads them with its own rights.
Without limits a token could ingest ``/etc/shadow``, list any directory
through the copy's file list, probe which paths exist, or make the node fetch
from servers only reachable from inside (cloud metadata at 169.254.169.254,
an admin port on loopback).  So:

* a local path is taken only when, after every symlink is resolved, it lies
  inside one of the ingest roots (``--ingest-roots``; by default
  ``<data-dir>/import``).  A path outside gets ``PATH_NOT_ALLOWED`` whether
  or not it exists, so the answer tells nothing about the host;
* an ``http(s)://`` source whose host resolves to a loopback, private,
  link-local, shared, multicast or reserved address gets ``PRIVATE_SOURCE``
  unless the operator allows them (``--allow-private-sources``).  The check
  runs on every request the download makes (redirects included) and the
  connection goes to the very address that was checked, so neither a
  redirect nor a DNS answer that changes in between gets around it.  The
  Hugging Face endpoint is the operator's (``HF_ENDPOINT``) and not checked.
* an S3 endpoint a client names (``s3://...?endpoint_url=``) is checked the
  same way at every connection boto3 opens to it, not once up front: inside
  ``public_only_connections(host)`` (the worker threads of such a fetch)
  urllib3 resolves, checks and connects to the checked address in one step
  for that host, so a name that answers public to the check and private to
  the connect (DNS rebinding) gets ``PRIVATE_SOURCE``.  Other connections of
  the thread (the node's own credential refresh from an instance's metadata
  service, an operator's proxy) are the operator's and pass; through a
  proxy the name is checked once up front and the proxy resolves it.  The
  operator's ``--s3-endpoint-url`` is not checked.
* a pipeline's ``health_check`` of a host outside the mesh follows the same
  rule (``protocol.healthcheck`` decides, ``actions.executors`` connects to
  the checked address).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import trio

from .common import SourceError, safe_url

__all__ = ["PrivateAddress", "PublicOnlyTransport", "confine_path", "guard_error", "is_public_address",
           "pin_request", "public_only_connections", "resolve_addresses", "resolve_public"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def confine_path(path: str, roots: Sequence[Path]) -> Path:
    """The real path of ``path`` when it lies inside one of ``roots`` (both
    resolved through symlinks); else ``SourceError``.  Blocking (it reads
    links): run it in a thread."""
    if not os.path.isabs(path):
        raise SourceError("INVALID_REQUEST", f"{path[:200]!r} is not an absolute path")
    real = Path(os.path.realpath(path))
    for root in roots:
        r = Path(os.path.realpath(root))
        if real == r or real.is_relative_to(r):
            return real
    shown = ", ".join(str(r) for r in roots) or "none"
    raise SourceError(
        "PATH_NOT_ALLOWED",
        f"{path[:200]} is outside the directories this node ingests from ({shown}); "
        "put the files there, or have the operator add a root with --ingest-roots",
    )


def is_public_address(ip: IPAddress) -> bool:
    """A globally routable unicast address (an IPv4-mapped IPv6 one judged as IPv4)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _check_public(host: str, addrs: Sequence[str]) -> list[str]:
    """``addrs`` (what ``host`` resolved to) when every one is public; else ``SourceError``."""
    if not addrs:
        raise SourceError("UNAVAILABLE", f"{host[:100]} resolves to no address")
    for a in addrs:
        if not is_public_address(ipaddress.ip_address(a.split("%", 1)[0])):
            what = host[:100] if a == host.strip("[]") else f"{host[:100]} is {a}, which"
            raise SourceError(
                "PRIVATE_SOURCE",
                f"{what} is a loopback, private or link-local address: this node fetches from such "
                "addresses only when its operator allows it (--allow-private-sources)",
            )
    return list(addrs)


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _unresolvable(host: str, e: BaseException) -> SourceError:
    return SourceError("UNAVAILABLE", f"cannot resolve {host[:100]}: {e}")


def _public_infos(host: str, infos: Sequence[Any]) -> list[str]:
    """The addresses of ``getaddrinfo``'s answer for ``host``, each checked (``_check_public``)."""
    return _check_public(host, list(dict.fromkeys(str(info[4][0]) for info in infos)))


async def resolve_addresses(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, unchecked (one lookup: connect to
    these, not to the name again); ``SourceError`` ``UNAVAILABLE`` when none."""
    literal = _literal(host)
    if literal is not None:
        return [str(literal)]
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise _unresolvable(host, e) from None
    addrs = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addrs:
        raise SourceError("UNAVAILABLE", f"{host[:100]} resolves to no address")
    return addrs


async def resolve_public(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, or ``SourceError`` when one of
    them is not public (all must be: a name that also points inside is refused)."""
    return _check_public(host, await resolve_addresses(host, port))


def _resolve_public_now(host: str, port: int) -> list[str]:
    """``resolve_public`` in the calling thread (urllib3's, inside the guard)."""
    literal = _literal(host)
    if literal is not None:
        return _check_public(host, [str(literal)])
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise _unresolvable(host, e) from None
    return _public_infos(host, infos)


# -- every connection of a thread checked (boto3 through urllib3) -----------------------------


class PrivateAddress(OSError):
    """A connection refused by ``public_only_connections``: ``error`` says why."""

    def __init__(self, error: SourceError) -> None:
        super().__init__(error.message)
        self.error = error


_public_only = threading.local()


@contextlib.contextmanager
def public_only_connections(host: str) -> Iterator[None]:
    """Every connection urllib3 opens to ``host`` in this thread meanwhile
    goes only to a public address, the very one checked (``PrivateAddress``
    otherwise); connections to other hosts are left alone."""
    _install_urllib3_guard()
    before: frozenset[str] = getattr(_public_only, "hosts", frozenset())
    _public_only.hosts = before | {host.strip("[]").lower()}
    try:
        yield
    finally:
        _public_only.hosts = before


def _install_urllib3_guard() -> None:
    """Wrap urllib3's ``create_connection`` (which its connections call by
    module attribute) once; the wrapper does nothing outside the guard."""
    import urllib3.util.connection as uc

    real = uc.create_connection
    if getattr(real, "meshnode_guard", False):
        return

    def create_connection(address: tuple[str, int], *args: Any, **kw: Any) -> socket.socket:
        host, port = address
        if host.strip("[]").lower() not in getattr(_public_only, "hosts", ()):
            return real(address, *args, **kw)
        try:
            addrs = _resolve_public_now(host, port)
        except SourceError as e:
            raise PrivateAddress(e) from None
        last: OSError | None = None
        for a in addrs:  # the checked addresses, not a second lookup
            try:
                return real((a, port), *args, **kw)
            except OSError as e:
                last = e
        assert last is not None
        raise last

    create_connection.meshnode_guard = True  # type: ignore[attr-defined]
    uc.create_connection = create_connection


def guard_error(e: BaseException) -> SourceError | None:
    """The refusal behind ``e`` (a library's wrapping of ``PrivateAddress``:
    urllib3 raises from it, botocore within it), if any."""
    x: BaseException | None = e
    for _ in range(16):  # a bounded walk down the chain
        if x is None:
            return None
        if isinstance(x, PrivateAddress):
            return x.error
        x = x.__cause__ or x.__context__
    return None


def pin_request(request: httpx.Request, address: str) -> None:
    """Send ``request`` to ``address`` (one its host resolved to, checked
    already) instead of looking the name up again, with the name kept for
    ``Host`` and for TLS (SNI and the certificate's name)."""
    url = request.url
    host = url.host
    if address != host:
        request.url = url.copy_with(host=address)
        if url.scheme == "https":
            request.extensions = {**request.extensions, "sni_hostname": host}


class PublicOnlyTransport(httpx.AsyncBaseTransport):
    """An HTTP transport that connects only to public addresses: each request
    (each hop of a redirect too) has its host resolved and checked, then goes
    to the checked address, with the original name kept for ``Host`` and TLS."""

    def __init__(self, inner: httpx.AsyncBaseTransport | None = None) -> None:
        self._inner = inner or httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        host = url.host
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            addrs = await resolve_public(host, port)
        except SourceError as e:
            raise SourceError(e.code, f"{safe_url(str(url))}: {e.message}") from None
        pin_request(request, addrs[0])
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()
