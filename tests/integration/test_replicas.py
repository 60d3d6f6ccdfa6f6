"""Replica policy on real daemons: a pinned model's copies fill up to max,
shrink to a new max, heal after a holder is lost (only after the grace), and
follow node labels; ``meshnode pin``/``unpin`` and ``info`` show it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from .conftest import Handle, Mesh, wait_for
from .test_transfer import ingest, make_model

MiB = 1024 * 1024
FAST_RULE = ["--replica-interval", "0.3", "--replica-grace", "3"]


async def _model(mesh: Mesh, h: Handle, name: str = "m") -> dict[str, Any]:
    r = await mesh.client.get(h.url + f"/models/{name}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _holders(handles: list[Handle], name: str = "m", tier: str = "disk") -> set[str]:
    return {h.node.cfg.node_id for h in handles if h.node.store.get(name, tier) is not None}


async def _settled(mesh: Mesh, handles: list[Handle], n: int, name: str = "m") -> set[str]:
    """Wait until exactly ``n`` nodes hold a copy and the API agrees."""
    async def ok() -> bool:
        rep = (await _model(mesh, handles[0], name))["replicas"]
        return len(_holders(handles, name)) == n and rep["actual"] == n and not rep["copying_to"]

    await wait_for(ok, timeout_s=30, what=f"{n} copies of {name}")
    return _holders(handles, name)


async def test_a_pinned_model_fills_shrinks_heals_and_follows_labels(mesh: Mesh, tmp_path: Path) -> None:
    a = await mesh.start("a", *FAST_RULE)
    b = await mesh.start("b", *FAST_RULE, join=[a])
    c = await mesh.start("c", *FAST_RULE, join=[a])
    d = await mesh.start("d", *FAST_RULE, "--labels", "zone=z2", join=[a])
    everyone = [a, b, c, d]
    await ingest(mesh, a, "m", make_model(tmp_path, 2 * MiB))

    # min 2, max 3 on four nodes: it fills up to three.
    r = await mesh.client.post(a.url + "/models/m/pin", json={"min": 2, "max": 3})
    assert r.status_code == 200, r.text
    assert r.json()["replicas"]["wanted"] == {"min": 2, "max": 3}
    three = await _settled(mesh, everyone, 3)

    # A smaller max: the worst-ranked holders drop theirs, down to one, and it stays there.
    r = await mesh.client.post(c.url + "/models/m/pin", json={"min": 1, "max": 1})
    assert r.status_code == 200, r.text
    one = await _settled(mesh, everyone, 1)
    assert one <= three
    await trio.sleep(1.5)  # five rounds of the rule: nothing flaps
    assert _holders(everyone) == one

    # Two again, then the holder that is not the first node is killed: within the grace
    # its copy still counts; after it, another node makes a new one.
    r = await mesh.client.post(a.url + "/models/m/pin", json={"min": 2, "max": 2})
    two = await _settled(mesh, everyone, 2)
    victim = next(h for h in everyone[1:] if h.node.cfg.node_id in two)
    victim.kill()
    alive = [h for h in everyone if h is not victim]
    await trio.sleep(1.0)
    rep = (await _model(mesh, a))["replicas"]
    assert rep["counted"] == 2 and rep["next"]["add"] == [], rep  # a restarting node is not a lost one
    healed = await _settled(mesh, alive, 2)
    assert victim.node.cfg.node_id not in healed
    assert (await _model(mesh, a))["replicas"]["lost"] == 1

    # Only on zone=z2: d gets a copy, and the others drop theirs once it is there.
    r = await mesh.client.post(a.url + "/models/m/pin", json={"min": 1, "max": 1, "labels": {"zone": "z2"}})
    assert r.status_code == 200, r.text
    assert await _settled(mesh, alive, 1) == {"d"}

    added = dropped = 0.0
    for h in alive:
        for line in (await mesh.client.get(h.url + "/metrics")).text.splitlines():
            if line.startswith("meshnode_replica_copies_added_total "):
                added += float(line.split()[-1])
            elif line.startswith("meshnode_replica_copies_dropped_total "):
                dropped += float(line.split()[-1])
    assert added >= 2 and dropped >= 2, (added, dropped)  # the living nodes' own steps (the victim's are gone)

    # Unpinned: the copies stay where they are.
    r = await mesh.client.delete(a.url + "/models/m/pin")
    assert r.status_code == 200 and r.json()["replicas"] is None, r.text
    await trio.sleep(1.0)
    assert _holders(alive) == {"d"}


async def test_a_spread_pin_puts_copies_in_every_zone(mesh: Mesh, tmp_path: Path) -> None:
    """Three nodes in zone z1, one in z2; four models held on a (z1), each pinned
    to two copies spread over zone: the second copy of every one is on d, the
    only node of the other zone (by rank alone, all four would land there
    about once in eighty)."""
    a = await mesh.start("a", *FAST_RULE, "--labels", "zone=z1")
    b = await mesh.start("b", *FAST_RULE, "--labels", "zone=z1", join=[a])
    c = await mesh.start("c", *FAST_RULE, "--labels", "zone=z1", join=[a])
    d = await mesh.start("d", *FAST_RULE, "--labels", "zone=z2", join=[a])
    everyone = [a, b, c, d]
    names = [f"m{i}" for i in range(4)]
    for i, name in enumerate(names):
        (tmp_path / name).mkdir()
        await ingest(mesh, a, name, make_model(tmp_path / name, MiB + i))
    for name in names:
        r = await mesh.client.post(a.url + f"/models/{name}/pin", json={"min": 2, "max": 2, "spread": "zone"})
        assert r.status_code == 200, r.text
    for name in names:
        held = await _settled(mesh, everyone, 2, name)
        assert "d" in held, (name, held)


async def test_pin_refuses_a_bad_policy_and_the_cli_pins_and_shows_it(mesh: Mesh, tmp_path: Path) -> None:
    a = await mesh.start("a", *FAST_RULE)
    await ingest(mesh, a, "m", make_model(tmp_path, 1 * MiB))
    for body, needle in (({"min": 3, "max": 2}, "min cannot be above max"),
                         ({"min": 1, "tier": "gpu0"}, "tier"),
                         ({"min": 1, "labels": {"zone": "a b"}}, "label value"),
                         ({"min": 1, "colour": "red"}, "colour")):
        r = await mesh.client.post(a.url + "/models/m/pin", json=body)
        assert r.status_code in (400, 422), (body, r.text)
        assert needle in r.json()["error"]["message"], (body, r.text)
    r = await mesh.client.post(a.url + "/models/nope/pin", json={"min": 1})
    assert r.status_code == 404 and r.json()["error"]["code"] == "MODEL_NOT_FOUND"

    exe = str(Path(sys.executable).parent / "meshnode")

    async def cli(*argv: str) -> subprocess.CompletedProcess[bytes]:
        return await trio.run_process([exe, "--peer", a.url, *argv], capture_stdout=True, capture_stderr=True,
                                      check=False, env={**os.environ, "COLUMNS": "200"})

    r = await cli("pin", "m", "--replicas", "1", "--max", "2", "--spread", "zone")
    assert r.returncode == 0, r.stderr.decode()
    assert "pinned 'm': 1 of 1..2 on disk" in r.stdout.decode(), r.stdout.decode()
    r = await cli("info", "m")
    assert r.returncode == 0 and "1 of 1..2 on disk" in r.stdout.decode(), r.stdout.decode()
    r = await cli("pin", "m", "--replicas", "1", "--labels", "zone")
    assert r.returncode == 2 and "--labels" in r.stderr.decode(), r.stderr.decode()
    r = await cli("unpin", "m")
    assert r.returncode == 0 and "unpinned 'm'" in r.stdout.decode(), r.stderr.decode()
    r = await cli("info", "m")
    assert "not pinned" in r.stdout.decode()

    # Pinned to RAM while its copy is on disk: the tier's copy is made from the disk's.
    r = await cli("pin", "m", "--replicas", "1", "--tier", "dram")
    assert r.returncode == 0, r.stderr.decode()
    await wait_for(lambda: a.node.store.get("m", "dram") is not None, what="a copy in RAM")
    assert a.node.store.get("m", "disk") is not None  # the disk's stays: another tier's copy is no stray
