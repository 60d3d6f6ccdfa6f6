"""Peer datagrams (``protocol.peerdgram``): the packet, and which path a
message to a peer takes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import RemoteProtocolError
from protocol.peerdgram import DGRAM_PAYLOAD_MAX, DatagramPaths, pack, unpack

CRED = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=300)


@given(CRED, st.binary(max_size=2000))
def test_a_packet_carries_its_credential_and_body_unchanged(cred: str, body: bytes) -> None:
    assert unpack(pack(cred, body)) == (cred, body)


@given(st.binary(max_size=600))
def test_any_bytes_unpack_or_raise_the_remote_error(packet: bytes) -> None:
    try:
        cred, body = unpack(packet)
    except RemoteProtocolError:
        return
    assert pack(cred, body) == packet


@given(st.binary(max_size=40), st.integers(0, 2**16 - 1))
def test_a_credential_length_past_the_packet_is_refused(tail: bytes, n: int) -> None:
    packet = b"MNd1" + n.to_bytes(2, "big") + tail
    if n > len(tail) or n > 512:
        with pytest.raises(RemoteProtocolError):
            unpack(packet)


def test_what_does_not_fit_is_not_packed() -> None:
    with pytest.raises(ValueError):
        pack("x" * 513, b"")
    with pytest.raises(ValueError):
        pack("", b"\0" * (DGRAM_PAYLOAD_MAX + 1))


# -- which path -------------------------------------------------------------------------

ADDRS = ["a:1", "b:2", "c:3"]
Event = tuple[str, str, int, bool]  # kind, addr, size, expects_reply


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[float, Event]]:
    n = draw(st.integers(1, 60))
    t = 0.0
    out = []
    for _ in range(n):
        t += draw(st.floats(0.0, 3.0))
        kind = draw(st.sampled_from(["offered", "answered", "forget", "use", "use", "use"]))
        out.append((t, (kind, draw(st.sampled_from(ADDRS)), draw(st.integers(1, 3000)), draw(st.booleans()))))
    return out


@settings(max_examples=300)
@given(histories())
def test_datagrams_only_to_peers_that_offered_them_within_size_and_answering(hist: list[tuple[float, Event]]) -> None:
    """Replays a history against the table and a plain model of the rules:
    a datagram only to a peer whose last HTTP answer offered them (and that
    no failure made us forget since), never over ``max_bytes``, never while a
    ping sent as a datagram has gone unanswered past ``confirm_s``, and then
    HTTP only for ``retry_after_s``."""
    paths = DatagramPaths(max_bytes=1400, confirm_s=1.5, retry_after_s=10.0)
    offered: set[str] = set()
    waiting: dict[str, float] = {}  # addr -> when its first unanswered ping went
    http_until: dict[str, float] = {}
    proven: set[str] = set()  # acked since offered
    for now, (kind, addr, size, expects) in hist:
        if kind == "offered":
            paths.offered(addr, now)
            offered.add(addr)
        elif kind == "answered":
            paths.answered(addr)
            if waiting.pop(addr, None) is not None:  # only an ack awaited for a datagram ping proves the path
                proven.add(addr)
        elif kind == "forget":
            paths.forget(addr)
            offered.discard(addr)
            waiting.pop(addr, None)
            http_until.pop(addr, None)
            proven.discard(addr)
        else:
            got = paths.use(addr, size, now, expects_reply=expects)
            want = addr in offered and size <= 1400 and now >= http_until.get(addr, 0.0)
            if want and addr in waiting and now - waiting[addr] > 1.5:
                waiting.pop(addr)
                http_until[addr] = now + 10.0
                want = False
            if want and expects and addr not in proven:
                waiting.setdefault(addr, now)
            assert got == want, (now, kind, addr, size, expects)
            assert not (got and size > 1400)


def test_an_unanswered_ping_puts_the_peer_on_http_for_a_while() -> None:
    paths = DatagramPaths(confirm_s=1.5, retry_after_s=60.0)
    assert not paths.use("a:1", 100, 0.0, expects_reply=True)  # never offered
    paths.offered("a:1", 0.0)
    assert paths.use("a:1", 100, 0.0, expects_reply=True)  # the ping goes, its clock runs
    assert paths.use("a:1", 100, 1.0, expects_reply=False)
    assert not paths.use("a:1", 100, 2.0, expects_reply=False)  # 2 s without a word
    assert paths.fallbacks == 1 and paths.falling_back("a:1", 2.0)
    paths.offered("a:1", 3.0)  # an HTTP answer offers them again: still HTTP until the minute is up
    assert not paths.use("a:1", 100, 30.0, expects_reply=True)
    assert paths.use("a:1", 100, 62.1, expects_reply=True)
    paths.answered("a:1")  # answered: the path is proven
    assert paths.use("a:1", 100, 70.0, expects_reply=True)
    assert paths.use("a:1", 100, 80.0, expects_reply=False)  # a late ack now is a slow peer, not a lost path
    assert paths.fallbacks == 1


def test_an_ack_to_a_ping_that_went_by_http_proves_nothing() -> None:
    """The ack that answers a ping sent by HTTP (the one whose 204 offered
    datagrams) may come after the offer: the path is still unproven."""
    paths = DatagramPaths(confirm_s=1.5, retry_after_s=60.0)
    paths.offered("a:1", 0.0)
    paths.answered("a:1")  # answers the HTTP ping
    assert paths.use("a:1", 100, 0.1, expects_reply=True)  # the first datagram ping: its clock runs
    assert not paths.use("a:1", 100, 2.0, expects_reply=False)  # unanswered: HTTP
    assert paths.fallbacks == 1


def test_the_table_is_bounded() -> None:
    paths = DatagramPaths(peers_max=100)
    for i in range(1000):
        paths.offered(f"n{i}:1", 0.0)
    assert len(paths) == 100
    assert paths.use("n999:1", 10, 0.0, expects_reply=False) and not paths.use("n0:1", 10, 0.0, expects_reply=False)


def test_bad_settings_are_refused() -> None:
    for kw in ({"max_bytes": 0}, {"max_bytes": DGRAM_PAYLOAD_MAX + 1}, {"confirm_s": 0.0}, {"peers_max": 0},
               {"retry_after_s": -1.0}):
        with pytest.raises(ValueError):
            DatagramPaths(**kw)  # type: ignore[arg-type]
