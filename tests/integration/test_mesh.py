"""Real daemons on loopback: join, catalog convergence, failure detection, leave."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio

from meshnode.mesh import wall_ms

from .conftest import Mesh, wait_for


async def states(mesh: Mesh, url: str) -> dict[str, str]:
    r = await mesh.client.get(url + "/nodes")
    return {n["node_id"]: n["state"] for n in r.json()["nodes"]}


async def model_names(mesh: Mesh, url: str) -> list[str]:
    r = await mesh.client.get(url + "/models")
    return [m["model_name"] for m in r.json()["models"]]


async def test_three_nodes_share_one_catalog(mesh: Mesh) -> None:
    a = await mesh.start("a")
    b = await mesh.start("b", join=[a])
    c = await mesh.start("c", join=[b])  # joins through b: learns a from gossip
    for h in (a, b, c):
        await wait_for(lambda h=h: _all_alive(mesh, h.url, 3), what=f"{h.node.cfg.node_id} to see 3 alive")

    r = await mesh.client.post(
        b.url + "/models/meta-llama/Llama-3.1-8B-Instruct/register",
        json={"model_type": "llm", "source_url": "hf://meta-llama/Llama-3.1-8B-Instruct",
              "metadata": {"description": "8B", "tags": ["chat"], "requirements": {"min_vram": 17_000_000_000}}},
    )
    assert r.status_code == 201, r.text
    for h in (a, c):
        await wait_for(lambda h=h: _has_model(mesh, h.url, "meta-llama/Llama-3.1-8B-Instruct"), what="registration to spread")
    info = (await mesh.client.get(a.url + "/models/meta-llama/Llama-3.1-8B-Instruct")).json()
    assert info["model_type"] == "llm"
    assert info["registered_by"] == "b"
    assert info["metadata"]["requirements"]["min_vram"] == 17_000_000_000

    r = await mesh.client.post(c.url + "/models/meta-llama/Llama-3.1-8B-Instruct/locations/a:disk")
    assert r.status_code == 201, r.text
    for h in (a, b):
        await wait_for(lambda h=h: _locations(mesh, h.url, "meta-llama/Llama-3.1-8B-Instruct", ["a:disk"]), what="location")
    av = (await mesh.client.get(b.url + "/v2/catalog/availability")).json()
    assert av["single_node_models"] == ["meta-llama/Llama-3.1-8B-Instruct"]
    assert av["nodes"]["a"]["models"] == ["meta-llama/Llama-3.1-8B-Instruct"]
    assert av["nodes"]["a"]["online"] is True
    await mesh.client.post(b.url + "/models/meta-llama/Llama-3.1-8B-Instruct/locations/c:disk")
    await mesh.client.post(b.url + "/models/meta-llama/Llama-3.1-8B-Instruct/locations/b:dram")

    async def replicated() -> bool:
        av = (await mesh.client.get(a.url + "/v2/catalog/availability")).json()
        return bool(av["replicated_models"] == ["meta-llama/Llama-3.1-8B-Instruct"] and av["single_node_models"] == [])

    await wait_for(replicated, what="model replicated on every node")

    # Unregister on a third node: gone everywhere.
    r = await mesh.client.delete(a.url + "/models/meta-llama/Llama-3.1-8B-Instruct")
    assert r.status_code == 200
    for h in (a, b, c):
        await wait_for(lambda h=h: _no_models(mesh, h.url), what="unregister to spread")


async def _all_alive(mesh: Mesh, url: str, n: int) -> bool:
    s = await states(mesh, url)
    return len(s) == n and all(v == "alive" for v in s.values())


async def _has_model(mesh: Mesh, url: str, name: str) -> bool:
    return name in await model_names(mesh, url)


async def _no_models(mesh: Mesh, url: str) -> bool:
    return await model_names(mesh, url) == []


async def _locations(mesh: Mesh, url: str, name: str, want: list[str]) -> bool:
    r = await mesh.client.get(url + f"/models/{name}/locations")
    return bool(r.status_code == 200 and r.json()["locations"] == want)


async def test_crashed_node_is_suspected_then_dead_and_a_restart_comes_back(
        mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="meshnode.mesh")
    a = await mesh.start("a")
    b = await mesh.start("b", join=[a])
    c = await mesh.start("c", join=[a])
    await wait_for(lambda: _all_alive(mesh, a.url, 3), what="3 alive")
    r = await mesh.client.post(c.url + "/models/m1/register", json={"model_type": "llm"})
    assert r.status_code == 201
    await wait_for(lambda: _has_model(mesh, a.url, "m1"), what="m1 on a")
    gen_before = c.node.generation

    c.kill()  # no goodbye
    seen: set[str] = set()

    async def dead_on_both() -> bool:
        sa, sb = await states(mesh, a.url), await states(mesh, b.url)
        seen.add(sa["c"])
        return sa["c"] == "dead" and sb["c"] == "dead"

    await wait_for(dead_on_both, timeout_s=20, what="c dead on a and b")
    assert "suspect" in seen or "dead" in seen
    assert (await states(mesh, a.url))["b"] == "alive"  # no false death of the survivor

    # Same data dir: a new, higher generation; its registration survived.
    c2 = await mesh.start("c", join=[a], data_dir=mesh.root / "c")
    assert c2.node.generation > gen_before
    await wait_for(lambda: _all_alive(mesh, b.url, 3), what="c back alive on b")
    assert "m1" in await model_names(mesh, c2.url)
    nodes = (await mesh.client.get(b.url + "/nodes")).json()["nodes"]
    assert [n["generation"] for n in nodes if n["node_id"] == "c"] == [c2.node.generation]
    # What an operator reads in the log, at INFO.
    said = [r.getMessage() for r in caplog.records if r.name == "meshnode.mesh"]
    for line in ("member c joined", "member c is dead", "member c restarted"):
        assert any(s.startswith(line) for s in said), (line, said)


async def test_clean_stop_is_seen_as_left_not_dead(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="meshnode.mesh")
    a = await mesh.start("a")
    b = await mesh.start("b", join=[a])
    for h in (a, b):  # b can only tell a it leaves once it has heard of a
        await wait_for(lambda h=h: _all_alive(mesh, h.url, 2), what="2 alive")
    await b.stop()
    await wait_for(lambda: _state_is(mesh, a.url, "b", "left"), what="b left")
    assert "member b left the mesh" in [r.getMessage() for r in caplog.records]
    # And it stays "left": nobody declares it dead later.
    for _ in range(10):
        assert (await states(mesh, a.url))["b"] == "left"
        await _sleep_intervals(2)


async def _state_is(mesh: Mesh, url: str, node: str, state: str) -> bool:
    return (await states(mesh, url)).get(node) == state


async def _sleep_intervals(n: int) -> None:
    import trio

    await trio.sleep(0.1 * n)  # waiting for gossip rounds to pass, not standing in for work


async def test_concurrent_registrations_converge_to_one_winner(mesh: Mesh) -> None:
    a = await mesh.start("a")
    b = await mesh.start("b", join=[a])
    await wait_for(lambda: _all_alive(mesh, a.url, 2), what="2 alive")
    ra = mesh.client.post(a.url + "/models/shared/register", json={"model_type": "from-a"})
    rb = mesh.client.post(b.url + "/models/shared/register", json={"model_type": "from-b"})
    assert (await ra).status_code == 201 and (await rb).status_code in (200, 201)  # 200: b heard a's first

    async def same() -> Any:
        ia = (await mesh.client.get(a.url + "/models/shared")).json()
        ib = (await mesh.client.get(b.url + "/models/shared")).json()
        return ia["model_type"] == ib["model_type"] and ia["registered_by"] == ib["registered_by"]

    await wait_for(same, what="one winner everywhere")


async def test_registering_again_says_it_replaced_and_what_changed(mesh: Mesh) -> None:
    a = await mesh.start("a")
    url = a.url + "/models/acme/m/register"
    first = await mesh.client.post(url, json={"model_type": "llm", "metadata": {"description": "one"}})
    assert first.status_code == 201 and first.json()["replaced"] is False
    again = await mesh.client.post(url, json={"model_type": "llm", "metadata": {"description": "two", "tags": ["x"]}})
    assert again.status_code == 200, again.text
    assert again.json()["replaced"] is True
    assert again.json()["changed"] == ["metadata.description", "metadata.tags"]
    same = await mesh.client.post(url, json={"model_type": "llm", "metadata": {"description": "two", "tags": ["x"]}})
    assert same.json()["replaced"] is True and same.json()["changed"] == []
    assert (await mesh.client.get(a.url + "/models/acme/m")).json()["metadata"]["description"] == "two"


async def test_a_node_alone_keeps_dialling_its_seeds(mesh: Mesh) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # b starts first, pointed at a seed that is not up yet.
    b = await mesh.start("b", "--join", f"127.0.0.1:{port}")
    await _sleep_intervals(10)
    assert await states(mesh, b.url) == {"b": "alive"}
    a = await mesh.start("a", "--port", str(port))
    await wait_for(lambda: _all_alive(mesh, a.url, 2), what="b to find a once it is up")
    await wait_for(lambda: _all_alive(mesh, b.url, 2), what="a on b")


async def test_a_write_after_a_read_wins_even_against_a_fast_clock(mesh: Mesh) -> None:
    """b's wall clock runs 30 s ahead: a's later unregister must still win (HLC, not wall time)."""
    a = await mesh.start("a")
    b = await mesh.start("b", join=[a])
    assert b.node.registry is not None
    b.node.registry.clock_ms = lambda: wall_ms() + 30_000
    assert (await mesh.client.post(b.url + "/models/skew/register", json={})).status_code == 201
    await wait_for(lambda: _has_model(mesh, a.url, "skew"), what="registration on a")
    assert (await mesh.client.delete(a.url + "/models/skew")).status_code == 200
    for h in (a, b):
        await wait_for(lambda h=h: _no_models(mesh, h.url), what="unregister wins everywhere")


async def test_read_your_writes_through_any_node(mesh: Mesh) -> None:
    """A model registered on a and asked for on b a moment later was 404
    MODEL_NOT_FOUND: b had not heard yet.  A write answers with its token;
    a request carrying it waits (bounded) until the node has seen it."""
    a = await mesh.start("a", "--gossip-interval", "2")  # slow gossip: b would not hear for a while
    b = await mesh.start("b", "--gossip-interval", "2", join=[a])
    await wait_for(lambda: _all_alive(mesh, a.url, 2), what="2 alive")
    for i in range(3):
        r = await mesh.client.post(a.url + f"/models/ryw-{i}/register", json={"model_type": "llm"})
        token = r.headers["X-Mesh-Token"]
        assert r.json()["mesh_token"] == token and token.startswith("a:")
        # At once, on b, with the token: no 404, no retry loop.
        got = await mesh.client.get(b.url + f"/models/ryw-{i}", headers={"X-Mesh-After": token})
        assert got.status_code == 200, got.text
        assert got.headers["X-Mesh-Caught-Up"] == "true"
    # Without the token b may not know yet (that is the point of it); with a bad one, a clear 400.
    bad = await mesh.client.get(b.url + "/models", headers={"X-Mesh-After": "a:x:1"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "INVALID_REQUEST"
    # A token from a writer b never heard of (another mesh's, an old one): answered at once,
    # saying it did not catch up (a CLI's last write on another mesh must not slow every command).
    t0 = trio.current_time()
    far = await mesh.client.get(b.url + "/models", headers={"X-Mesh-After": "ghost:1:5"})
    assert far.status_code == 200 and far.headers["X-Mesh-Caught-Up"] == "false"
    assert trio.current_time() - t0 < 1.0


async def test_node_labels_are_gossiped_and_shown(mesh: Mesh) -> None:
    """``--labels zone=a,gpu=h100``: in the node's record, so every node's
    /nodes shows every node's labels (for the replica policies to come)."""
    from meshnode.config import ConfigError

    a = await mesh.start("a", "--labels", "zone=a,gpu=h100")
    b = await mesh.start("b", "--labels", "zone=b", join=[a])

    async def labels_on_b() -> bool:
        nodes = {n["node_id"]: n for n in (await mesh.client.get(b.url + "/nodes")).json()["nodes"]}
        return nodes.get("a", {}).get("labels") == {"zone": "a", "gpu": "h100"} and nodes["b"]["labels"] == {"zone": "b"}

    await wait_for(labels_on_b, what="a's labels on b")
    for bad in ("zone", "zone=a b", ",".join(f"k{i}=v" for i in range(17))):
        with pytest.raises(ConfigError, match="--labels"):
            await mesh.start("c", "--labels", bad)
