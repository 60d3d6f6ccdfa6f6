"""A captured peer request cannot be replayed: not to another node, not to the
same node after a kill -9 and restart (issue 22).  Real daemons on loopback,
and the peer client against a fake receiver (``httpx.MockTransport``)."""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

from meshnode.config import add_start_arguments, config_from_args
from meshnode.copies.dataplane import DataServer
from meshnode.peers import TO, Recipient, make_peer_client, sign_headers
from protocol.peerauth import AUTH_HEADER, HINT_HEADER, WINDOW_MS, nonce_of, sign_hint

from .conftest import Handle, Mesh, wait_for, wait_transfer

SECRET = "k3Jd9fQ2mZp8LwXr5TbN7cVh1-replay-test"
ENV = {"MESHNODE_CLUSTER_SECRET": SECRET}


@dataclass
class Captured:
    """A request exactly as it left the sender, as a relay on the path sees it."""

    path: str
    headers: dict[str, str]
    body: bytes
    at_s: float


def record_actions(sender: Handle) -> list[Captured]:
    """Every action ``sender`` hands over from now on, signed and ready to go."""
    out: list[Captured] = []

    async def hook(request: httpx.Request) -> None:  # runs after PeerAuth signed it
        if request.url.path == "/mesh/v1/actions":
            headers = {k: v for k, v in request.headers.items() if k in (AUTH_HEADER, "content-type")}
            out.append(Captured(request.url.raw_path.decode(), headers, request.content, time.monotonic()))

    assert sender.node.router is not None
    sender.node.router.peers.client.event_hooks["request"].append(hook)
    return out


async def replay(mesh: Mesh, to: Handle, c: Captured) -> httpx.Response:
    return await mesh.client.post(to.url + c.path, content=c.body, headers=c.headers)


async def copy_to(mesh: Mesh, target: Handle, model: str) -> None:
    """A copy of a's on ``target``'s disk (pulled over the peer routes and the data plane)."""
    device = f"{target.node.cfg.node_id}:disk"
    r = await mesh.client.post(target.url + f"/models/{model}/copy", json={"from_device": "a:disk", "to_device": device})
    assert r.status_code == 202, r.text
    t = await wait_transfer(mesh, target.url, r.json()["transfer_id"])
    assert t["status"] == "done", t


def holds(h: Handle, model: str) -> bool:
    return h.node.store.get(model, "disk") is not None


async def three_nodes(mesh: Mesh, tmp_path: Path) -> tuple[Handle, Handle, Handle]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(b"w" * 300_000)
    a = await mesh.start("a", env=ENV)
    b = await mesh.start("b", env=ENV, join=[a])
    c = await mesh.start("c", env=ENV, join=[a])
    r = await mesh.client.post(a.url + "/models/m/download", json={"source_url": src.as_uri(), "target_device": "a:disk"})
    assert r.status_code == 202, r.text
    assert (await wait_transfer(mesh, a.url, r.json()["transfer_id"]))["status"] == "done"
    await wait_for(lambda: _copies(mesh, 1, b, c), what="b and c hear of a's copy")
    await copy_to(mesh, b, "m")
    await copy_to(mesh, c, "m")
    await wait_for(lambda: _copies(mesh, 3, a, b, c), what="every node hears of the three copies")
    return a, b, c


async def _copies(mesh: Mesh, n: int, *hs: Handle) -> bool:
    """Whether each of ``hs`` knows ``n`` copies of m."""
    for h in hs:
        r = await mesh.client.get(h.url + "/models/m")
        if r.status_code != 200 or len(r.json()["copies"]) != n:
            return False
    return True


async def test_a_captured_delete_does_nothing_at_another_node_nor_after_a_restart(mesh: Mesh, tmp_path: Path) -> None:
    """The attack: a signed ``delete_copy`` on its way from a to c, captured by
    a relay, deleted b's copy when replayed to b, and c's new copy when
    replayed to c after a kill -9 and restart within the minute."""
    a, b, c = await three_nodes(mesh, tmp_path)
    captured = record_actions(a)
    r = await mesh.client.delete(a.url + "/models/m/locations/c:disk")
    assert r.status_code == 200 and r.json()["deleted_copy"] is True, r.text
    assert len(captured) == 1
    sent = captured[0]
    assert json.loads(sent.body) == {"op": "delete_copy", "model": "m", "kind": "disk", "node": "c"}
    assert not holds(c, "m")

    # Replayed to another node: refused for its signature, and b keeps its copy.
    r = await replay(mesh, b, sent)
    assert r.status_code == 401 and "signed for node 'c'" in r.json()["error"]["message"], r.text
    assert holds(b, "m")

    # c gets a new copy, dies (no goodbye) and comes back on the same data dir.
    await copy_to(mesh, c, "m")
    assert holds(c, "m")
    old_generation = c.node.generation
    c.kill()
    await c.done.wait()
    c = await mesh.start("c", env=ENV, join=[a])
    assert holds(c, "m") and c.node.generation > old_generation
    assert time.monotonic() - sent.at_s < WINDOW_MS / 1000 - 5  # inside the window: only the fix refuses it
    r = await replay(mesh, c, sent)
    assert r.status_code == 401, r.text
    assert "generation" in r.json()["error"]["message"]
    assert holds(c, "m")
    r = await replay(mesh, b, sent)  # and b still refuses it
    assert r.status_code == 401 and holds(b, "m")


async def test_an_action_naming_another_node_is_refused(mesh: Mesh, tmp_path: Path) -> None:
    _, b, _ = await three_nodes(mesh, tmp_path)
    to_b = Recipient("b", b.node.generation)

    async def post(body: dict[str, object], to: Recipient | None = to_b) -> httpx.Response:
        data = json.dumps(body).encode()
        headers = {"content-type": "application/json", **sign_headers(SECRET, "a", "POST", "/mesh/v1/actions", data, to=to)}
        return await mesh.client.post(b.url + "/mesh/v1/actions", content=data, headers=headers)

    action = {"op": "delete_copy", "model": "m", "kind": "disk"}
    r = await post({**action, "node": "c"})
    assert r.status_code == 421 and r.json()["error"]["code"] == "WRONG_NODE", r.text
    r = await post(action)
    assert r.status_code == 400 and '"node"' in r.json()["error"]["message"], r.text
    r = await post({**action, "node": ["b"]})
    assert r.status_code == 400, r.text
    r = await post({**action, "node": "b"}, to=None)  # signed for whoever answers: not for an action
    assert r.status_code == 401 and "must name its receiver" in r.json()["error"]["message"], r.text
    r = await post({**action, "node": "b"}, to=Recipient("b", b.node.generation + 1))  # a generation b never had
    assert r.status_code == 401 and HINT_HEADER in r.headers
    assert holds(b, "m")
    r = await post({**action, "node": "b"})
    assert r.status_code == 200 and r.json()["deleted"] is True, r.text
    assert not holds(b, "m")


async def test_the_sender_signs_again_for_a_restarted_node(mesh: Mesh) -> None:
    """A sender that still knows the old generation is told the new one (in a
    hint signed under the cluster secret) and signs its request once more."""
    a = await mesh.start("a", env=ENV)
    c = await mesh.start("c", env=ENV, join=[a])
    old = c.node.generation
    c.kill()
    await c.done.wait()
    c = await mesh.start("c", env=ENV, join=[a])
    assert c.node.generation > old
    assert a.node.router is not None
    client = a.node.router.peers.client
    r = await client.get(c.url + "/mesh/v1/manifests/" + "0" * 32, extensions={TO: Recipient("c", old)})
    assert r.status_code == 404 and r.json()["error"]["code"] == "COPY_NOT_FOUND", r.text  # past the credential
    assert [h.status_code for h in r.history] == [401]
    assert f"gen={c.node.generation} " in r.request.headers[AUTH_HEADER]


def _cfg() -> object:
    p = argparse.ArgumentParser()
    add_start_arguments(p)
    return config_from_args(p.parse_args(["--node-id", "me", "--port", "0", "--cluster-secret", SECRET]), env={})


async def test_only_a_true_hint_makes_the_sender_sign_again() -> None:
    """A hint not signed under the secret, or for another request, or another
    node, is ignored (nobody on the path chooses the generation we sign for);
    a true one is followed once, never in a loop."""
    stale, new = Recipient("r", 5), Recipient("r", 9)
    seen: list[str] = []  # the credential of each request, as it was sent (httpx signs the same request again)
    answer: dict[str, object] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers[AUTH_HEADER])
        nonce = nonce_of(request.headers[AUTH_HEADER])
        kind = answer["kind"]
        hint = {
            "forged": sign_hint("not-the-secret" * 3, new, nonce),
            "other-request": sign_hint(SECRET, new, "0" * 32),
            "other-node": sign_hint(SECRET, Recipient("x", 9), nonce),
            "true": sign_hint(SECRET, new, nonce),
        }[str(kind)]
        return httpx.Response(401, headers={HINT_HEADER: hint}, json={"error": {"code": "UNAUTHORIZED", "message": "x"}})

    client = make_peer_client(_cfg())  # type: ignore[arg-type]
    client._transport = httpx.MockTransport(handler)  # the client's own auth, no network
    async with client:
        for kind in ("forged", "other-request", "other-node"):
            seen.clear()
            answer["kind"] = kind
            r = await client.get("http://127.0.0.1:9/mesh/v1/seen", extensions={TO: stale})
            assert r.status_code == 401 and len(seen) == 1, kind
        seen.clear()
        answer["kind"] = "true"
        r = await client.get("http://127.0.0.1:9/mesh/v1/seen", extensions={TO: stale})
        assert r.status_code == 401 and len(seen) == 2  # signed again once, then the answer stands
        assert " to=r gen=5 " in seen[0] and " to=r gen=9 " in seen[1]
        assert nonce_of(seen[0]) != nonce_of(seen[1])
        seen.clear()
        r = await client.get("http://127.0.0.1:9/mesh/v1/seen")  # no receiver named: unbound, no second try
        assert len(seen) == 1 and " to=* gen=* " in seen[0]


class _Nothing:
    """A data plane resolver that holds nothing (the handshake is what is tested)."""

    def locate(self, manifest_hash_hex: str, index: int) -> tuple[str, int, int] | None:
        return None

    def have(self, manifest_hash_hex: str) -> bytes | None:
        return None


async def _recv(s: trio.SocketStream, n: int) -> bytes:
    out = b""
    while len(out) < n:
        try:
            got = await s.receive_some(n - len(out))
        except trio.BrokenResourceError:
            break
        if not got:
            break
        out += got
    return out


async def test_a_recorded_data_plane_handshake_proves_nothing_on_another_connection() -> None:
    """The data plane has no signed requests to replay: each connection proves
    the secret over a fresh server nonce, so the bytes of a good handshake,
    recorded and sent again, are refused."""
    key = SECRET.encode()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(DataServer(_Nothing(), (SECRET,)).serve, "127.0.0.1", 0)
        cn = secrets.token_bytes(16)
        s = await trio.open_tcp_stream("127.0.0.1", port)
        await s.send_all(b"MNDP\x02" + cn)
        sn = (await _recv(s, 17))[1:]
        proof = hmac.new(key, b"cli" + cn + sn, hashlib.sha256).digest()
        await s.send_all(proof)
        assert await _recv(s, 1) == b"\x00"  # the genuine handshake
        await s.aclose()
        again = await trio.open_tcp_stream("127.0.0.1", port)
        await again.send_all(b"MNDP\x02" + cn)
        assert (await _recv(again, 17))[1:] != sn
        await again.send_all(proof)  # the recorded proof
        assert await _recv(again, 1) == b"\x01"  # refused
        await again.aclose()
        nursery.cancel_scope.cancel()
