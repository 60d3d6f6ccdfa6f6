"""Fairness under a flood (issue 25): while one node takes thousands of
registrations as fast as it can, a single write on another node is seen on a
third within seconds (``bench/flood.py`` holds the 2 s p99 target on a quiet
machine; this test's bound is looser so that a loaded CI machine passes it,
and still far below the 34 s measured before the fix)."""

from __future__ import annotations

import trio

from meshnode.mesh import wall_ms
from protocol.keys import REG_PREFIX
from protocol.registry import Registration, register_write

from .conftest import Handle, Mesh, all_alive, wait_for

FLOOD_MAX = 20_000  # the flood runs until the trials are done, never past this
BATCH = 2  # about the API's pace: each write fsynced on its own
TRIALS = 8
BOUND_S = 8.0


async def test_a_single_write_is_not_held_up_by_another_nodes_flood(mesh: Mesh) -> None:
    default = ("--gossip-interval", "0.5", "--probe-interval", "1.0")  # the daemon's defaults
    reader = await mesh.start("reader", *default)
    flood = await mesh.start("flood", *default, "--write-rate", "0", join=[reader])
    writer = await mesh.start("writer", *default, join=[reader])
    await all_alive(mesh, [reader, flood, writer])
    pad = "x" * 3000  # near the registration's description limit (4,096)
    flooding, flooded = trio.Event(), trio.Event()

    async def flooder(h: Handle) -> None:
        """Registrations in batches as fast as the node takes them (each batch
        one fsynced append, as the API does per write)."""
        assert h.node.saver is not None
        for start in range(0, FLOOD_MAX, BATCH):
            writes = []
            for i in range(start, start + BATCH):
                w, _ = register_write(f"flood/m{i:05d}", Registration("llm", None, {"description": pad}), None,
                                      h.node.hlc, wall_ms())
                writes += w
            await h.node.saver.commit(writes)
            flooding.set()
        flooded.set()

    times: list[float] = []
    async with trio.open_nursery() as n:
        n.start_soon(flooder, flood)
        await flooding.wait()
        for t in range(TRIALS):
            during = not flooded.is_set()
            name = f"fair/one-{t}"
            r = await mesh.client.post(writer.url + f"/models/{name}/register", json={"model_type": "llm"})
            assert r.status_code == 201, r.text
            t0 = trio.current_time()

            async def seen(name: str = name) -> bool:
                return (await mesh.client.get(reader.url + f"/models/{name}")).status_code == 200

            await wait_for(seen, 30, what=f"{name} on the reader")
            times.append(trio.current_time() - t0)
            if not during:
                break
            await trio.sleep(0.1)
        n.cancel_scope.cancel()  # the trials are done: the rest of the flood is not needed
    assert reader.node.mesh is not None
    held = sum(1 for nid, _, _ in reader.node.mesh.items(REG_PREFIX) if nid == "flood")
    assert held > 0, "the flood reached the reader meanwhile"
    assert max(times) <= BOUND_S, [round(x, 2) for x in times]
    assert len(times) == TRIALS, f"the flood was over after {len(times)} trials"
