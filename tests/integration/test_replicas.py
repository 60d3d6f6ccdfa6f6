"""Replica policy on real daemons: a pinned model's copies fill up to max,
shrink to a new max, heal after a holder is lost (only after the grace), and
follow node labels; ``meshnode pin``/``unpin`` and ``info`` show it."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from meshnode.cli.render import replicas_line

from .conftest import Handle, Mesh, wait_for, wait_transfer
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

    async def steps() -> tuple[float, float]:
        added = dropped = 0.0
        for h in alive:
            for line in (await mesh.client.get(h.url + "/metrics")).text.splitlines():
                if line.startswith("meshnode_replica_copies_added_total "):
                    added += float(line.split()[-1])
                elif line.startswith("meshnode_replica_copies_dropped_total "):
                    dropped += float(line.split()[-1])
        return added, dropped

    async def counted() -> bool:
        # The living nodes' own steps (the victim's are gone). A drop is counted once its
        # files are gone, which can be a moment after the catalog stopped naming the copy.
        added, dropped = await steps()
        return added >= 2 and dropped >= 2

    await wait_for(counted, timeout_s=10, what="the replica steps counted in /metrics")

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
                         ({"min": 1, "labels": {"zone": "a b"}}, "labels.zone"),
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


def _worst_ranked_last(nodes: list[str]) -> str:
    """A model name whose rendezvous rank puts ``nodes[-1]`` below the others: a drop by
    rank alone (the rule before issue 24) would take that node's copy."""
    def rank(model: str, nid: str) -> bytes:
        return hashlib.blake2b(f"{model}\x00{nid}".encode(), digest_size=8).digest()

    return next(name for name in (f"h{i}" for i in range(1000))
                if all(rank(name, nodes[-1]) > rank(name, n) for n in nodes[:-1]))


async def _copy_by_hand(mesh: Mesh, via: Handle, to: Handle, name: str) -> None:
    """A copy from ``via`` (which holds it) to ``to``, asked of ``via``."""
    r = await mesh.client.post(via.url + f"/models/{name}/copy",
                               json={"from_device": f"{via.node.cfg.node_id}:disk", "to_device": f"{to.node.cfg.node_id}:disk"})
    assert r.status_code == 202, r.text
    assert (await wait_transfer(mesh, to.url, r.json()["transfer_id"]))["status"] == "done"


async def test_spread_moves_a_copy_out_of_the_crowded_zone_and_keeps_it_there(
        mesh: Mesh, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 24.3: copies on n1 and n2 (zone a), pinned --replicas 2 --max 2 --spread zone,
    n3 in zone b: the copies stayed in zone a, and a copy made by hand on n3 was dropped
    (by rank alone).  Now one copy ends in each zone, short is null, and n3's is kept."""
    caplog.set_level(logging.INFO, logger="meshnode.replicas")
    n1 = await mesh.start("n1", *FAST_RULE, "--labels", "zone=a")
    n2 = await mesh.start("n2", *FAST_RULE, "--labels", "zone=a", join=[n1])
    n3 = await mesh.start("n3", *FAST_RULE, "--labels", "zone=b", join=[n1])
    everyone = [n1, n2, n3]
    hand = _worst_ranked_last(["n1", "n2", "n3"])  # by rank alone, n3's copy would be the one to go
    for name in ("m", hand):
        (tmp_path / name).mkdir()
        await ingest(mesh, n1, name, make_model(tmp_path / name, MiB + len(name)))
        await _copy_by_hand(mesh, n1, n2, name)
    await _copy_by_hand(mesh, n1, n3, hand)
    for name in ("m", hand):
        r = await mesh.client.post(n1.url + f"/models/{name}/pin", json={"min": 2, "max": 2, "spread": "zone"})
        assert r.status_code == 200, r.text

    for name in ("m", hand):
        await wait_for(lambda name=name: "n3" in _holders(everyone, name) and len(_holders(everyone, name)) == 2,
                       timeout_s=30, what=f"{name}: one copy in each zone")
        held = await _settled(mesh, everyone, 2, name)
        assert "n3" in held and len(held & {"n1", "n2"}) == 1, (name, held)
        rep = (await _model(mesh, n2, name))["replicas"]
        assert rep["short"] is None and rep["spread"] == {"label": "zone", "covered": 2, "target": 2}, rep
        assert rep["next"] == {"add": [], "drop": []} and rep["outside"] == 0, rep
    settled = {name: _holders(everyone, name) for name in ("m", hand)}
    await trio.sleep(1.5)  # five rounds of the rule: it stands still there
    assert {name: _holders(everyone, name) for name in ("m", hand)} == settled
    drops = [r.getMessage() for r in caplog.records if "dropped the copy" in r.getMessage()]
    assert len(drops) == 2 and all("zone=a is the most crowded value (2 copies)" in d for d in drops), drops


async def test_copies_outside_the_labels_are_counted_apart(mesh: Mesh, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """Issue 24.5: ``actual`` counted copies outside the labels ("3 of 2..2"), and their
    drop was logged as "more than the policy's max"."""
    caplog.set_level(logging.INFO, logger="meshnode.replicas")
    a = await mesh.start("a", *FAST_RULE)
    b = await mesh.start("b", *FAST_RULE, join=[a])
    d = await mesh.start("d", *FAST_RULE, "--labels", "zone=z2", join=[a])
    everyone = [a, b, d]
    await ingest(mesh, a, "m", make_model(tmp_path, MiB))
    await _copy_by_hand(mesh, a, b, "m")
    # Two wanted on zone=z2, where only d is: d makes one; a's and b's stay (below min, a
    # copy outside the labels is better than none) but are no replicas.
    r = await mesh.client.post(a.url + "/models/m/pin", json={"min": 2, "max": 2, "labels": {"zone": "z2"}})
    assert r.status_code == 200, r.text
    await wait_for(lambda: _holders(everyone) == {"a", "b", "d"}, timeout_s=30, what="d's copy")

    async def counted_apart() -> bool:
        rep = (await _model(mesh, b))["replicas"]
        return rep["actual"] == 1 and rep["outside"] == 2 and not rep["copying_to"]

    await wait_for(counted_apart, what="1 copy inside the labels, 2 outside")
    rep = (await _model(mesh, b))["replicas"]
    assert rep["short"] is not None and "fewer than the 2" in rep["short"], rep
    line = replicas_line(rep)
    assert line.startswith("1 of 2..2 on disk (2 more outside the labels; "), line
    # The one copy inside the labels is the one the evictor may not take.
    assert d.node.keeper is not None
    assert d.node.keeper.keep_reason("m", "disk") is not None

    # One wanted: the copies outside the labels go, and the log says why.
    r = await mesh.client.post(a.url + "/models/m/pin", json={"min": 1, "max": 1, "labels": {"zone": "z2"}})
    assert r.status_code == 200, r.text
    assert await _settled(mesh, everyone, 1) == {"d"}

    async def none_outside() -> bool:
        return (await _model(mesh, a))["replicas"]["outside"] == 0  # once b's drop reached a

    await wait_for(none_outside, what="no copy outside the labels")
    drops = [r.getMessage() for r in caplog.records if "dropped the copy" in r.getMessage()]
    assert len(drops) == 2 and all("outside the policy's labels" in x for x in drops), drops
