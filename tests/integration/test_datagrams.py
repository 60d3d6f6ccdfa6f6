"""Small peer messages as UDP datagrams (``protocol.peerdgram``) on real
daemons on loopback: they are used once offered, checked like the HTTP route
(a forged, foreign or replayed datagram is refused before the node sees it),
a node that takes none is sent HTTP, and a peer whose datagrams vanish is not
taken for dead."""

from __future__ import annotations

import secrets
import socket
import time

import trio

from meshnode.datagrams import Datagrams, Receiver
from meshnode.peers import PEER_PATH
from protocol.peerauth import NONCE_BYTES, sign
from protocol.peerdgram import DGRAM_HEADER, DGRAM_METHOD, pack
from protocol.wire import Envelope, MemberRecord, MemberState, MemberUpdate, Ping, encode

from .conftest import Handle, Mesh, wait_for
from .test_mesh import _all_alive, states

SECRET = "Qm4s8dVn2xLc7pRt0yWk5hJf-datagram-test"
ENV = {"MESHNODE_CLUSTER_SECRET": SECRET}


def stat(h: Handle, name: str) -> int:
    return int(h.node.statistics().get(name, 0))


def port_of(h: Handle) -> int:
    return int(str(h.url).rsplit(":", 1)[1])


def forged_ping(sender: str, sender_addr: str, rumour: str) -> bytes:
    """A ping from ``sender`` carrying the rumour that member ``rumour`` is alive."""
    record = MemberRecord(rumour, "127.0.0.1:9", 1, 0, MemberState.ALIVE)
    return encode(Envelope("meshnode", sender, 1, sender_addr, Ping(1, "a", (MemberUpdate(record),))))


def signed(secret: str, sender: str, body: bytes) -> bytes:
    cred = sign(secret, sender, DGRAM_METHOD, PEER_PATH.encode(), body, int(time.time() * 1000),
                secrets.token_bytes(NONCE_BYTES))
    return pack(cred, body)


async def send_udp(port: int, packet: bytes) -> None:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        await s.sendto(packet, ("127.0.0.1", port))


async def test_a_mesh_talks_in_datagrams_once_offered(mesh: Mesh) -> None:
    a = await mesh.start("a", env=ENV)
    b = await mesh.start("b", join=[a], env=ENV)
    c = await mesh.start("c", join=[a], env=ENV)
    for h in (a, b, c):
        await wait_for(lambda h=h: _all_alive(mesh, h.url, 3), what=f"{h.node.cfg.node_id} to see 3 alive")

    async def mostly_datagrams() -> bool:
        return all(stat(h, "datagram_received") >= 20 and stat(h, "send_sent_datagrams") >= 20 for h in (a, b, c))

    await wait_for(mostly_datagrams, what="datagrams both ways on every node")
    for h in (a, b, c):
        assert stat(h, "datagram_refused") == 0 and stat(h, "bad_messages") == 0
        assert stat(h, "send_sent_datagrams") > stat(h, "send_sent") / 2, h.node.statistics()
    # The peer route's answer is what offers them.
    r = await mesh.client.post(a.url + PEER_PATH, content=b"", headers={"x-mesh-auth": "nonsense"})
    assert r.status_code == 401 and DGRAM_HEADER not in r.headers
    text = (await mesh.client.get(a.url + "/metrics")).text
    assert "meshnode_send_sent_datagrams_total" in text and "meshnode_datagram_received_total" in text


async def test_a_forged_foreign_or_replayed_datagram_is_refused_before_the_node_sees_it(mesh: Mesh) -> None:
    a = await mesh.start("a", env=ENV)
    port = port_of(a)
    body = forged_ping("mallory", "127.0.0.1:9", "evil")

    await send_udp(port, b"GET / HTTP/1.1\r\n\r\n")  # not ours at all
    await send_udp(port, pack("", body))  # no credential
    await send_udp(port, signed("not-the-cluster-secret-at-all-0123456789", "mallory", body))
    await wait_for(lambda: stat(a, "datagram_refused") == 3, what="three datagrams refused")
    assert "evil" not in await states(mesh, a.url)

    # Signed by one node, claiming to be another: the node drops it (a bad message).
    await send_udp(port, signed(SECRET, "bob", body))
    await wait_for(lambda: stat(a, "bad_messages") == 1, what="the envelope's sender checked against its signer")
    assert "evil" not in await states(mesh, a.url)

    # The same rumour, rightly signed, is taken (so the refusals above were the credential's doing) ...
    good = signed(SECRET, "mallory", body)
    await send_udp(port, good)
    await wait_for(lambda: stat(a, "datagram_received") == 1, what="a signed datagram taken")
    assert "evil" in await states(mesh, a.url)
    # ... once: the same datagram again is a replay.
    await send_udp(port, good)
    await wait_for(lambda: stat(a, "datagram_refused") == 4, what="the replay refused")
    assert stat(a, "datagram_received") == 1
    r = await mesh.client.get(a.url + "/health")
    assert r.status_code == 200


async def test_a_node_that_takes_no_datagrams_is_sent_http(mesh: Mesh) -> None:
    a = await mesh.start("a", env=ENV)
    b = await mesh.start("b", "--datagram-max", "0", join=[a], env=ENV)
    c = await mesh.start("c", join=[a], env=ENV)
    for h in (a, b, c):
        await wait_for(lambda h=h: _all_alive(mesh, h.url, 3), what=f"{h.node.cfg.node_id} to see 3 alive")
    await trio.sleep(2.0)
    assert b.node.datagrams is None and stat(b, "send_sent_datagrams") == 0
    assert stat(a, "send_sent_datagrams") > 0  # a and c talk in datagrams; to b, by HTTP
    assert (await states(mesh, b.url)) == {"a": "alive", "b": "alive", "c": "alive"}


async def test_a_peer_whose_datagrams_vanish_is_sent_http_and_stays_alive(mesh: Mesh, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # b's UDP port is deaf from the start (a firewall that passes TCP only): b offers
    # datagrams in its HTTP answers, yet whatever is sent there is lost.
    take = Datagrams.handle

    def deaf_b(self: Datagrams, packet: bytes, remote: str, receive: Receiver) -> None:
        if self.node_id != "b":
            take(self, packet, remote, receive)

    monkeypatch.setattr(Datagrams, "handle", deaf_b)
    a = await mesh.start("a", env=ENV)
    b = await mesh.start("b", join=[a], env=ENV)
    c = await mesh.start("c", join=[a], env=ENV)
    for h in (a, b, c):
        await wait_for(lambda h=h: _all_alive(mesh, h.url, 3), what=f"{h.node.cfg.node_id} to see 3 alive")
    await wait_for(lambda: stat(a, "send_sent_datagrams") > 10, what="a sending datagrams (to c)")
    await wait_for(lambda: a.node.mesh is not None and a.node.mesh.sender.paths.falling_back(b.address, trio.current_time()),
                   what="a back on HTTP for b")
    deaths = stat(a, "deaths_declared") + stat(c, "deaths_declared")
    await trio.sleep(4.0)  # ten probe intervals
    for h in (a, c):
        assert (await states(mesh, h.url))["b"] == "alive", h.node.cfg.node_id
    assert stat(a, "deaths_declared") + stat(c, "deaths_declared") == deaths
    assert stat(b, "datagram_received") == 0
