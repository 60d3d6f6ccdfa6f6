"""GPUs in the catalog, on real daemons with fake GPUs: every node shows every
node's GPUs, a change past a threshold reaches the others and one below it
costs no write, a failing or stuck read marks the figures stale and the node
goes on, and placement ranks GPUs by free VRAM."""

from __future__ import annotations

import threading

import pytest
import trio

import meshnode.gpus
from meshnode.gpus import FakeGpus
from protocol.keys import GPUS_KEY

from .conftest import Handle, Mesh, all_alive, wait_for

GiB = 2**30
MiB = 2**20


def fake_of(h: Handle) -> FakeGpus:
    assert h.node.gpus is not None and isinstance(h.node.gpus.reader, FakeGpus)
    return h.node.gpus.reader


async def node_view(mesh: Mesh, viewer: Handle, node_id: str) -> dict:  # type: ignore[type-arg]
    nodes = (await mesh.client.get(viewer.url + "/nodes")).json()["nodes"]
    return next(n for n in nodes if n["node_id"] == node_id)


async def test_every_node_shows_every_nodes_gpus(mesh: Mesh) -> None:
    a = await mesh.start("node1", "--fake-gpus", "2x24GiB", "--gpu-interval", "0.2")
    b = await mesh.start("node2", join=[a])
    await all_alive(mesh, [a, b])

    async def seen() -> bool:
        return len((await node_view(mesh, b, "node1"))["gpus"]) == 2

    await wait_for(seen, what="node1's GPUs on node2")
    v = await node_view(mesh, b, "node1")
    assert [(g["index"], g["total_bytes"], g["free_bytes"]) for g in v["gpus"]] == [(0, 24 * GiB, 24 * GiB),
                                                                                     (1, 24 * GiB, 24 * GiB)]
    assert v["gpu_status"]["source"] == "fake" and v["gpu_status"]["stale"] is False
    mine = await node_view(mesh, b, "node2")  # no GPU, no flag (and no NVIDIA driver here)
    assert mine["gpus"] == [] and mine["gpu_status"]["source"] == "none"
    storage = (await mesh.client.get(a.url + "/storage")).json()["devices"]
    assert {"disk", "dram", "gpu0", "gpu1"} <= set(storage)
    assert storage["gpu1"] == {"total": 24 * GiB, "used": 0, "free": 24 * GiB, "available": 24 * GiB}
    assert set((await mesh.client.get(b.url + "/storage")).json()["devices"]) == {"disk", "dram"}
    metrics = (await mesh.client.get(a.url + "/metrics")).text
    assert 'meshnode_gpu_memory_total_bytes{gpu="1",uuid="GPU-fake-node1-1"} 2.5769803776e+10' in metrics
    assert "meshnode_gpu_stale 0.0" in metrics
    assert "meshnode_gpu_memory_total_bytes" not in (await mesh.client.get(b.url + "/metrics")).text

    # An engine takes 10 GiB on gpu0: the others see it.  100 MiB more is below
    # the threshold: no write, the figures shown stay within it.
    fake = fake_of(a)
    assert a.node.gpus is not None
    fake.allocate(0, 4242, 10 * GiB)
    a.node.gpus.poke()

    async def used() -> bool:
        g0 = (await node_view(mesh, b, "node1"))["gpus"][0]
        return bool(g0["used_bytes"] == 10 * GiB and g0["processes"] == [[4242, 10 * GiB]])

    await wait_for(used, what="gpu0's new load on node2")
    writes = a.node.gpus.writes
    fake.set_used(0, 100 * MiB)
    for _ in range(3):
        a.node.gpus.poke()
        await trio.sleep(0.3)
    assert a.node.gpus.writes == writes
    assert a.node.gpus.current is not None and a.node.gpus.current.gpus[0].used_bytes == 10 * GiB + 100 * MiB

    # Placement on a GPU: node1's freest GPU (gpu1) fits; node2 has none.
    r = await mesh.client.post(a.url + "/models/org/g/register",
                               json={"model_type": "llm", "metadata": {"requirements": {"min_vram": 16 * GiB}}})
    assert r.status_code in (200, 201), r.text

    async def placed() -> bool:
        p = (await mesh.client.get(b.url + "/placement", params={"model": "org/g", "device": "gpu"})).json()
        return bool(p.get("chosen") == "node1:gpu1")

    await wait_for(placed, what="org/g placed on node1:gpu1")
    p = (await mesh.client.get(b.url + "/placement", params={"model": "org/g", "device": "gpu"})).json()
    assert {n["node_id"]: n["reasons"] for n in p["ranking"]}["node2"] == ["no GPU"]


async def test_a_failing_or_stuck_read_marks_the_figures_stale(mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(meshnode.gpus, "READ_TIMEOUT_S", 0.5)
    a = await mesh.start("node1", "--fake-gpus", "1x80GiB", "--gpu-interval", "0.2")
    b = await mesh.start("node2", join=[a])
    await all_alive(mesh, [a, b])
    fake = fake_of(a)
    fake.fail_with("NVML: GPU is lost")

    async def status_on_b() -> dict:  # type: ignore[type-arg]
        return dict((await node_view(mesh, b, "node1"))["gpu_status"] or {})

    async def stale() -> bool:
        return (await status_on_b()).get("error") == "NVML: GPU is lost"

    await wait_for(stale, what="node1's GPUs stale on node2")
    v = await node_view(mesh, b, "node1")
    assert v["gpu_status"]["stale"] is True and v["gpus"][0]["total_bytes"] == 80 * GiB  # the last good figures
    assert "meshnode_gpu_stale 1.0" in (await mesh.client.get(a.url + "/metrics")).text
    fake.fail_with(None)

    async def fresh() -> bool:
        return (await status_on_b()).get("stale") is False

    await wait_for(fresh, what="node1's GPUs fresh again")

    # A read that never returns (a driver stuck on a sick GPU): after the
    # deadline the figures are stale, no second read piles up behind it, and
    # the node answers meanwhile.
    release = threading.Event()
    real_read = fake.read
    reads = []

    def stuck() -> list:  # type: ignore[type-arg]
        reads.append(1)
        release.wait(30)
        return real_read()

    fake.read = stuck  # type: ignore[method-assign]

    async def stuck_seen() -> bool:
        return "has not returned" in str((await status_on_b()).get("error"))

    await wait_for(stuck_seen, what="a stuck read reported")
    assert len(reads) == 1
    assert (await mesh.client.get(a.url + "/health")).status_code == 200
    release.set()
    fake.read = real_read  # type: ignore[method-assign]
    await wait_for(fresh, what="reads working after the stuck one returned")
    assert a.node.mesh is not None and a.node.mesh.get("node1", GPUS_KEY) is not None
