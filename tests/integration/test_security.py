"""Tokens, cluster secrets, other clusters, and the non-loopback refusal."""

from __future__ import annotations

import argparse
import logging
import re
import time

import pytest
import trio

from meshnode.config import ConfigError, add_start_arguments, config_from_args, secret_bits
from meshnode.peers import Recipient, sign_headers
from protocol.peerauth import AUTH_HEADER, sign
from protocol.wire import (
    INT_MAX,
    Envelope,
    Gossip,
    MemberRecord,
    MemberState,
    MemberUpdate,
    Ping,
    encode,
)

from .conftest import Handle, Mesh, wait_for


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_start_arguments(p)
    return p.parse_args(list(argv))


STRONG = ["Tq4-" + "x1Yz_Wv9" * 3, "0123456789abcdef" * 2, "k3Jd9fQ2mZp8LwXr5TbN7cVh1"]


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::"])
def test_refuses_non_loopback_without_token_and_secret(host: str, tmp_path: object) -> None:
    with pytest.raises(ConfigError, match="refusing to bind"):
        config_from_args(parse("--host", host, "--advertise", "h:1"), env={})
    with pytest.raises(ConfigError, match="refusing to bind"):
        config_from_args(parse("--host", host, "--advertise", "h:1"), env={"MESHNODE_API_TOKENS": STRONG[0]})
    cfg = config_from_args(
        parse("--host", host, "--advertise", "h:1"),
        env={"MESHNODE_API_TOKENS": f"{STRONG[0]},{STRONG[1]}", "MESHNODE_CLUSTER_SECRET": STRONG[2]},
    )
    assert cfg.secrets.api_tokens == (STRONG[0], STRONG[1])
    assert STRONG[0] not in repr(cfg) and STRONG[2] not in repr(cfg)


@pytest.mark.parametrize(
    ("tokens", "secret", "weak"),
    [
        ("t", STRONG[2], "API token"),  # a 1-character token on 0.0.0.0 used to be taken
        (STRONG[0], "abcd", "cluster secret"),  # a 4-character secret fell in 1.6 s
        (f"{STRONG[0]},short", STRONG[2], "API token"),  # every token of a rotation list
        (STRONG[0], "password" * 4, "cluster secret"),  # long but repetitive
        (STRONG[0], "0123456789abcdef0123456789abcde", "cluster secret"),  # 124 bits of hex
    ],
)
def test_refuses_weak_secrets_on_non_loopback_binds(tokens: str, secret: str, weak: str) -> None:
    env = {"MESHNODE_API_TOKENS": tokens, "MESHNODE_CLUSTER_SECRET": secret}
    with pytest.raises(ConfigError, match=f"{weak} has about \\d+ bits of entropy.*at least 128.*token_urlsafe") as e:
        config_from_args(parse("--host", "0.0.0.0", "--advertise", "h:1"), env=env)
    assert secret not in str(e.value) and "short" not in str(e.value)
    # On loopback (a single-user home setup) short ones are fine.
    config_from_args(parse(), env=env)


@pytest.mark.parametrize(("text", "low", "high"), [
    ("0123456789abcdef" * 2, 128, 128),  # openssl rand -hex 16
    ("A" * 43, 0, 0),
    ("Tq4-x1Yz_Wv9x1Yz_Wv9x1Yz", 150, 160),  # 24 printable
    ("ab" * 40, 0, 0),
])
def test_secret_bits(text: str, low: float, high: float) -> None:
    assert low <= secret_bits(text) <= high


def test_secrets_given_as_flags_are_warned_about(tmp_path: object) -> None:
    """Flags show in /proc/<pid>/cmdline: the node says so at start on a
    non-loopback bind, and points to the file and environment forms."""
    args = parse("--host", "0.0.0.0", "--advertise", "h:1", "--api-tokens", STRONG[0], "--cluster-secret", STRONG[2])
    cfg = config_from_args(args, env={})
    assert any("--api-tokens given on the command line" in n and "--api-tokens-file" in n for n in cfg.notes)
    assert any("--cluster-secret given on the command line" in n for n in cfg.notes)
    assert any("no TLS" in n for n in cfg.notes)
    assert not any(STRONG[0] in n or STRONG[2] in n for n in cfg.notes)
    env_cfg = config_from_args(parse("--host", "0.0.0.0", "--advertise", "h:1"),
                               env={"MESHNODE_API_TOKENS": STRONG[0], "MESHNODE_CLUSTER_SECRET": STRONG[2]})
    assert not any("command line" in n for n in env_cfg.notes)


def test_config_file_env_and_flags(tmp_path: object) -> None:
    from pathlib import Path

    d = Path(str(tmp_path))
    (d / "secret").write_text("s1\ns2\n")
    (d / "mesh.toml").write_text('node_id = "from-file"\nport = 9000\ncluster = "prod"\n')
    env = {"MESHNODE_CONFIG": str(d / "mesh.toml"), "MESHNODE_PORT": "9100", "MESHNODE_CLUSTER_SECRET_FILE": str(d / "secret")}
    cfg = config_from_args(parse("--port", "9200"), env=env)
    assert (cfg.node_id, cfg.port, cfg.cluster) == ("from-file", 9200, "prod")
    assert cfg.secrets.cluster_secrets == ("s1", "s2")
    cfg = config_from_args(parse(), env=env)
    assert cfg.port == 9100
    (d / "bad.toml").write_text("nonsense = 1\n")
    with pytest.raises(ConfigError, match="unknown keys"):
        config_from_args(parse("--config", str(d / "bad.toml")), env={})
    with pytest.raises(ConfigError, match="HOST:PORT"):
        config_from_args(parse("--join", "nohost"), env={})


async def test_api_tokens(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    a = await mesh.start("a", "--api-tokens", "old-token,new-token")
    c = mesh.client
    assert (await c.get(a.url + "/health")).status_code == 200  # liveness stays open
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic old-token"}, {"authorization": "Bearer  x"}):
        r = await c.get(a.url + "/models", headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "UNAUTHORIZED"
        assert "token" not in r.json()["error"]["message"].replace("API token", "")
        assert "old-token" not in r.text and "new-token" not in r.text
    for tok in ("old-token", "new-token"):
        assert (await c.get(a.url + "/models", headers={"authorization": f"Bearer {tok}"})).status_code == 200
    assert not any("old-token" in rec.getMessage() or "new-token" in rec.getMessage() for rec in caplog.records)


async def test_cluster_secret_guards_peer_route(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    a = await mesh.start("a", "--cluster-secret", "s3cret-a")
    r = await mesh.client.post(a.url + "/mesh/v1/msg", content=b"x")
    assert r.status_code == 401
    r = await mesh.client.post(a.url + "/mesh/v1/msg", content=b"x", headers={"authorization": "Bearer nope"})
    assert r.status_code == 401
    # A node with the wrong secret never joins; one with the rotated-in secret does.
    b = await mesh.start("b", "--cluster-secret", "other", join=[a])
    await mesh.start("c", "--cluster-secret", "s3cret-a,next", join=[a])
    await wait_for(lambda: _knows(mesh, a.url, "c"), what="c joins a")
    await trio.sleep(1.0)  # ten gossip rounds in which b keeps trying
    assert not await _knows(mesh, a.url, "b")
    assert not await _knows(mesh, b.url, "a")
    assert any("refused" in rec.getMessage() for rec in caplog.records)
    assert not any("s3cret-a" in rec.getMessage() or "other" in rec.getMessage().split() for rec in caplog.records)


async def test_peer_requests_are_signed_replays_and_stale_ones_refused(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    """A captured peer request does not work twice, nor two minutes later; the
    node says why (the clock skew), and never with the secret."""
    caplog.set_level(logging.INFO)
    secret = "s3cret-" + "z" * 30
    a = await mesh.start("a", "--cluster-secret", secret)
    body = encode(Envelope("meshnode", "b", 1, "127.0.0.1:9", Ping(1, "a")))
    headers = {"content-type": "application/msgpack", **sign_headers(secret, "b", "POST", "/mesh/v1/msg", body)}
    r = await mesh.client.post(a.url + "/mesh/v1/msg", content=body, headers=headers)
    assert r.status_code == 204
    r = await mesh.client.post(a.url + "/mesh/v1/msg", content=body, headers=headers)
    assert r.status_code == 401 and "replayed" in r.json()["error"]["message"]
    # Signed by b, claiming to be c: the envelope's sender must be the signer.
    bad = encode(Envelope("meshnode", "c", 1, "127.0.0.1:9", Ping(2, "a")))
    r = await mesh.client.post(a.url + "/mesh/v1/msg", content=bad, headers=sign_headers(secret, "b", "POST", "/mesh/v1/msg", bad))
    assert r.status_code == 400 and "signed by" in r.json()["error"]["message"]
    # Signed two minutes ago (or by a node whose clock is two minutes off).
    old = sign(secret, "b", "POST", b"/mesh/v1/msg", body, int(time.time() * 1000) - 120_000, bytes(16))
    r = await mesh.client.post(a.url + "/mesh/v1/msg", content=body, headers={AUTH_HEADER: old})
    assert r.status_code == 401 and "NTP" in r.json()["error"]["message"]
    # The same for the routes behind the framework (manifests, actions).
    for method, path in (("GET", "/mesh/v1/manifests/" + "0" * 32), ("POST", "/mesh/v1/actions")):
        r = await mesh.client.request(method, a.url + path, headers={AUTH_HEADER: old})
        assert r.status_code == 401 and "NTP" in r.json()["error"]["message"]
        signed = sign_headers(secret, "b", method, path, b"", to=Recipient("a", a.node.generation))
        r = await mesh.client.request(method, a.url + path, headers=signed)
        assert r.status_code in (400, 404)  # past the credential: the route's own answer
        r = await mesh.client.request(method, a.url + path, headers=signed)
        assert r.status_code == 401 and "replayed" in r.json()["error"]["message"]
    assert any("-120." in rec.getMessage() and "NTP" in rec.getMessage() for rec in caplog.records)
    assert secret not in caplog.text


async def test_other_cluster_is_refused_and_never_merged(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    a = await mesh.start("a", "--cluster", "blue")
    b = await mesh.start("b", "--cluster", "green", join=[a])
    await mesh.client.post(b.url + "/models/green-model/register", json={})
    await wait_for(
        lambda: any("another cluster" in rec.getMessage() for rec in caplog.records),
        what="log line about the other cluster",
    )
    assert not await _knows(mesh, a.url, "b")
    assert (await mesh.client.get(a.url + "/models")).json()["total_count"] == 0


async def _knows(mesh: Mesh, url: str, node: str) -> bool:
    r = await mesh.client.get(url + "/nodes")
    return node in {n["node_id"] for n in r.json()["nodes"]}


async def _send_as(mesh: Mesh, to: str, secret: str, signer: str, body: object) -> int:
    data = encode(Envelope("meshnode", signer, 1, "127.0.0.1:9", body))  # type: ignore[arg-type]
    r = await mesh.client.post(to + "/mesh/v1/msg", content=data, headers=sign_headers(secret, signer, "POST", "/mesh/v1/msg", data))
    return r.status_code


async def test_a_forged_eviction_is_refuted_and_logged(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    """A record of a live node at generation+1 marked left made every node drop
    it and its registrations, and it said nothing; one at 2**63-1 outlived a
    restart.  Now the victim moves above the forgery with a WARNING and a
    metric, and a far-future generation is dropped by everyone."""
    caplog.set_level(logging.WARNING)
    secret = "s3cret-" + "f" * 30
    a = await mesh.start("a", "--cluster-secret", secret)
    b = await mesh.start("b", "--cluster-secret", secret, join=[a])
    c = await mesh.start("c", "--cluster-secret", secret, join=[a])
    await mesh.client.post(b.url + "/models/victim-model/register", json={})
    await wait_for(lambda: _alive_everywhere(mesh, [a, b, c], "b"), what="b alive everywhere")
    await wait_for(lambda: _listed(mesh, a.url, "victim-model"), what="the model reaches a")
    gen = b.node.generation
    for forged_gen in (INT_MAX, gen + 1):
        forged = Gossip((MemberUpdate(MemberRecord("b", b.address, forged_gen, 0, MemberState.LEFT)),))
        for target in (a, c, b):
            assert await _send_as(mesh, target.url, secret, "c", forged) == 204
    await wait_for(lambda: b.node.generation > gen + 1, what="b moves above the forgery")
    await wait_for(lambda: _alive_everywhere(mesh, [a, b, c], "b"), what="b alive everywhere again")
    await wait_for(lambda: _listed(mesh, a.url, "victim-model"), what="b's registration back on a")
    warned = [r.getMessage() for r in caplog.records if r.name == "meshnode.mesh" and r.levelno == logging.WARNING]
    # b refutes it: from the member record ("... or the record is forged; moving to
    # generation"), or, when a peer's keys at the forged generation reach it first
    # (a loaded machine), from those ("... moving to generation ... to refute it").
    assert any("moving to generation" in m for m in warned), warned
    assert any("ahead of our clock" in m for m in warned), warned
    metrics = (await mesh.client.get(b.url + "/metrics")).text
    conflicts = re.search(r"^meshnode_identity_conflicts_total (\S+)$", metrics, re.M)
    assert conflicts is not None and float(conflicts.group(1)) >= 1
    assert (await mesh.client.get(b.url + "/health")).json()["generation"] == b.node.generation
    for h in (a, c):
        assert all(n["generation"] < INT_MAX for n in (await mesh.client.get(h.url + "/nodes")).json()["nodes"])


async def _alive_everywhere(mesh: Mesh, handles: list[Handle], node: str) -> bool:
    for h in handles:
        r = await mesh.client.get(h.url + "/nodes")
        if {n["node_id"]: n["state"] for n in r.json()["nodes"]}.get(node) != "alive":
            return False
    return True


async def _listed(mesh: Mesh, url: str, model: str) -> bool:
    return (await mesh.client.get(url + f"/models/{model}")).status_code == 200


async def test_ready_waits_for_the_seeds_and_needs_no_token(mesh: Mesh) -> None:
    """/ready is a readiness probe: 503 NOT_READY while a join seed has not
    answered nor failed (here one that accepts and never answers, until the
    peer timeout), then 200; no token, as /health."""
    held: list[trio.SocketStream] = []

    async def hold(stream: trio.SocketStream) -> None:
        held.append(stream)
        async with stream:  # closed when the test's scope ends
            await trio.sleep_forever()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as seed:
        seed.start_soon(trio.serve_listeners, hold, listeners)
        a = await mesh.start("a", "--api-tokens", "t" * 40, "--join", f"127.0.0.1:{port}")
        r = await mesh.client.get(a.url + "/ready")
        assert r.status_code == 503 and r.json()["error"]["code"] == "NOT_READY", r.text
        with trio.fail_after(10):
            await a.node.ready.wait()
        r = await mesh.client.get(a.url + "/ready")
        assert r.status_code == 200 and r.json()["node_id"] == "a" and held
        assert a.node.ready_status.endswith(f"no join seed answered yet (127.0.0.1:{port}), retrying")
        seed.cancel_scope.cancel()  # the held connections close with their tasks
    for listener in listeners:
        await listener.aclose()
