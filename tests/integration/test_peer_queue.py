"""Peer messages dropped on a full send queue are counted and logged, at most
one line per ``DROP_LOG_EVERY_S`` with the count since (issue 25: 6,267 drops
and not one log line)."""

from __future__ import annotations

import argparse
import dataclasses
import logging

import pytest

from meshnode import peers
from meshnode.config import add_start_arguments, config_from_args
from meshnode.peers import PeerSender, make_peer_client
from protocol.gossip import Send
from protocol.wire import Envelope, Ping


def _send() -> Send:
    return Send("127.0.0.1:9", Envelope("meshnode", "me", 1, "127.0.0.1:1", Ping(1, "you")))


async def test_drops_on_a_full_queue_are_logged_rate_limited(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = argparse.ArgumentParser()
    add_start_arguments(p)
    cfg = dataclasses.replace(config_from_args(p.parse_args(["--node-id", "me", "--port", "0"]), env={}),
                              send_queue_max=2)
    clock = [1000.0]
    monkeypatch.setattr(peers.time, "monotonic", lambda: clock[0])
    caplog.set_level(logging.WARNING, logger="meshnode.peers")
    async with make_peer_client(cfg) as client:
        sender = PeerSender(cfg, client)  # not running: nothing drains the queue
        sender.enqueue([_send()] * 5)
        sender.enqueue([_send()] * 4)  # within the interval: counted, not logged
        clock[0] += peers.DROP_LOG_EVERY_S
        sender.enqueue([_send()])
    lines = [r.getMessage() for r in caplog.records if r.name == "meshnode.peers"]
    assert sender.stats["dropped_queue_full"] == 3 + 4 + 1
    assert len(lines) == 2, lines
    assert lines[0].startswith("dropped 3 peer messages: the send queue (2) is full")
    assert lines[1].startswith("dropped 5 peer messages") and "8 dropped in all" in lines[1]
