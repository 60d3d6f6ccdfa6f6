"""Restarts hide nothing (issue 25): a node killed and restarted keeps every
registration it held visible at its peers, and they hold its new
generation's whole state within seconds."""

from __future__ import annotations

from typing import Any

import trio

from meshnode.mesh import wall_ms
from protocol.catalog import Catalog
from protocol.keys import REG_PREFIX
from protocol.registry import Registration, register_write

from .conftest import Handle, Mesh, wait_for

MODELS = 3000
FULL_STATE_S = 5.0


class Hidden:
    """A catalog listener on a peer: every moment one of ``node``'s
    registrations left the peer's view."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.gone: list[str] = []

    def key_changed(self, node_id: str, key: str, value: Any | None) -> None:
        if node_id == self.node and value is None and key.startswith(REG_PREFIX):
            self.gone.append(key)

    def node_cleared(self, node_id: str) -> None:
        if node_id == self.node:
            self.gone.append("* every key *")


def catalog(h: Handle) -> Catalog:
    assert h.node.mesh is not None
    return h.node.mesh.gossip.catalog


async def test_a_restarted_node_never_hides_its_registrations(mesh: Mesh) -> None:
    a = await mesh.start("a")
    peers = [await mesh.start("b", join=[a]), await mesh.start("c", join=[a])]
    names = [f"restart/m{i:05d}" for i in range(MODELS)]
    writes = []
    for name in names:
        w, _ = register_write(name, Registration("llm"), None, a.node.hlc, wall_ms())
        writes += w
    assert a.node.saver is not None
    await a.node.saver.commit(writes)  # on disk (fsynced) and in the catalog, as the API does it
    own = catalog(a).own

    def all_held() -> bool:
        return all(
            (st := catalog(p).nodes.get("a")) is not None and st.max_version >= own.max_version for p in peers
        )

    await wait_for(all_held, 30, what=f"{MODELS} registrations on every peer")
    watch = {p.node.cfg.node_id: Hidden("a") for p in peers}
    for p in peers:
        catalog(p).subscribe(watch[p.node.cfg.node_id])

    a.kill()  # no goodbye, like kill -9: what it held comes back from its data dir
    await a.done.wait()
    statuses: dict[int, int] = {}
    sample = names[:: MODELS // 25]

    async def ask(stop: trio.Event) -> None:
        """GET /models/<name> on every peer, round after round, for a sample."""
        while not stop.is_set():
            for name in sample:
                for p in peers:
                    r = await mesh.client.get(p.url + f"/models/{name}")
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

    stop = trio.Event()
    async with trio.open_nursery() as n:
        n.start_soon(ask, stop)
        await trio.sleep(0.5)  # the peers see it gone (suspect) while they are asked
        a2 = await mesh.start("a", join=peers, data_dir=mesh.root / "a")
        t0 = trio.current_time()
        new = catalog(a2).own
        ready_version = new.max_version
        assert new.generation > own.generation

        def whole() -> bool:
            for p in peers:
                st = catalog(p).nodes.get("a")
                if st is None or st.generation != new.generation or st.max_version < ready_version or st.shadow:
                    return False
            return True

        await wait_for(whole, 30, what="the new generation's whole state on every peer")
        took = trio.current_time() - t0
        await trio.sleep(0.3)  # a few more rounds of asking, after the old keys went
        stop.set()
    assert statuses.get(404, 0) == 0 and statuses.get(200, 0) > 0, statuses
    assert {nid: w.gone for nid, w in watch.items()} == {p.node.cfg.node_id: [] for p in peers}
    for p in peers:
        held = {k for nid, k, _ in catalog(p).items(REG_PREFIX) if nid == "a"}
        assert len(held) == MODELS
    assert took <= FULL_STATE_S, f"the peers held the new generation's whole state after {took:.1f} s"
