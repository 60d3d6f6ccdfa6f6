"""A name that does not resolve is the network's answer for now (503
``UNAVAILABLE``), not a missing model (404).  The resolver is replaced:
no query leaves the machine."""

from __future__ import annotations

import socket

import pytest
import trio

from meshnode.copies.sources import guard
from meshnode.errors import STATUS


class NoNames(trio.abc.HostnameResolver):
    async def getaddrinfo(self, host, port, family=0, type=0, proto=0, flags=0):  # type: ignore[no-untyped-def]
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def getnameinfo(self, sockaddr, flags):  # type: ignore[no-untyped-def]
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


@pytest.mark.parametrize("fn", [guard.resolve_addresses, guard.resolve_public])
async def test_a_name_that_does_not_resolve_is_unavailable(fn) -> None:  # type: ignore[no-untyped-def]
    trio.socket.set_custom_hostname_resolver(NoNames())
    try:
        with pytest.raises(guard.SourceError) as e:
            await fn("weights.example.invalid", 443)
    finally:
        trio.socket.set_custom_hostname_resolver(None)
    assert e.value.code == "UNAVAILABLE" and STATUS[e.value.code] == 503
    assert "cannot resolve weights.example.invalid" in e.value.message
