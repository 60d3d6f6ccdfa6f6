"""The peer client: signed requests, and no failure of one peer ends the node."""

from __future__ import annotations

import argparse
import logging

import httpx
import pytest

from meshnode.config import add_start_arguments, config_from_args
from meshnode.peers import PeerSender, make_peer_client
from protocol.gossip import Send
from protocol.peerauth import AUTH_HEADER
from protocol.wire import Envelope, Ping


def _cfg(*argv: str):  # type: ignore[no-untyped-def]
    p = argparse.ArgumentParser()
    add_start_arguments(p)
    return config_from_args(p.parse_args(["--node-id", "me", "--port", "0", *argv]), env={})


def _env() -> Envelope:
    return Envelope("meshnode", "me", 1, "127.0.0.1:1", Ping(1, "you"))


@pytest.mark.parametrize("bad", ["999.1.1.1:80", "host:abc", "[zz]:1", "a b:1", ""])
async def test_an_address_no_url_can_hold_is_a_failed_send_not_a_crash(bad: str) -> None:
    """httpx raises ``InvalidURL`` (not an ``HTTPError``) for these: it used to
    escape the sender and end the node."""
    cfg = _cfg()
    async with make_peer_client(cfg) as client:
        sender = PeerSender(cfg, client)
        assert await sender.send_now(Send(bad, _env())) is False
    assert sender.stats["failed"] == 1


async def test_peer_requests_are_signed_and_carry_no_secret(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    cfg = _cfg("--cluster-secret", "the-secret-" + "q" * 30)
    client = make_peer_client(cfg)
    client._transport = httpx.MockTransport(handler)  # the client's own auth and headers, no network
    async with client:
        await PeerSender(cfg, client).send_now(Send("127.0.0.1:9", _env()))
        await client.get("http://127.0.0.1:9/mesh/v1/manifests/abc?x=1")
    assert len(seen) == 2
    for r in seen:
        assert "the-secret" not in str(r.headers) and "authorization" not in r.headers
        assert r.headers[AUTH_HEADER].startswith("v2 sender=me to=* gen=* ts=")  # no extension: unbound
    assert seen[0].headers[AUTH_HEADER] != seen[1].headers[AUTH_HEADER]  # a fresh nonce each
