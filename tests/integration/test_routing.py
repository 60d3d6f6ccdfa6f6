"""Inference is routed by the engines' own load and sticks to a session or a
shared prompt prefix, alike on every node (``protocol.routing``): two
services of one model, each engine telling its load the way vLLM does."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from .conftest import Handle, Mesh, all_alive, wait_for
from .test_serving import ROOT, known, put_model, start

ODD = str(ROOT / "tests" / "engine" / "odd_engine.py")


def odd(load: int) -> dict[str, object]:
    return {"engine": "command", "load_format": "vllm",
            "command": [sys.executable, ODD, "--port", "{port}", "--host", "{host}", "--served-model-name",
                        "{model_name}", "--load", str(load)]}


async def serve_both(mesh: Mesh, tmp_path: Path, loads: tuple[int, int]) -> tuple[Handle, Handle, Handle]:
    a = await start(mesh, "node1")
    b = await start(mesh, "node2", join=[a])
    c = await start(mesh, "node3", join=[a])
    await all_alive(mesh, [a, b, c])
    await put_model(mesh, a, tmp_path)
    await known(b, c)
    for h, load in zip((a, b), loads, strict=True):
        r = await mesh.client.post(h.url + "/models/org/e/services",
                                   json={"device": f"{h.node.cfg.node_id}:gpu0", "config": odd(load)})
        assert r.status_code == 202, r.text

    async def loads_known() -> bool:  # every node has both records, each with its engine's load
        for h in (a, b, c):
            recs = (await mesh.client.get(h.url + "/services")).json()["services"]
            if sorted((s["node"], s["state"], tuple(s["load"] or ())) for s in recs) != [
                    ("node1", "healthy", (loads[0], 0)), ("node2", "healthy", (loads[1], 0))]:
                return False
        return True

    await wait_for(loads_known, 30, what="both services healthy with their loads, on every node")
    return a, b, c


async def ask(mesh: Mesh, h: Handle, prompt: str = "hi", session: str | None = None) -> str:
    r = await mesh.client.post(h.url + "/v1/completions", json={"model": "org/e", "prompt": prompt},
                               headers={"x-session-id": session} if session else {})
    assert r.status_code == 200, r.text
    return str(r.headers["x-mesh-service"]).split(":")[0]


async def test_the_less_loaded_engine_takes_requests_even_from_the_busy_one_s_node(mesh: Mesh, tmp_path: Path) -> None:
    a, b, c = await serve_both(mesh, tmp_path, (40, 0))
    for h in (a, b, c):  # node1's own engine reports 40 running: even node1 sends to node2
        assert {await ask(mesh, h) for _ in range(5)} == {"node2"}


async def test_a_session_or_a_shared_prefix_sticks_to_one_service_on_every_node(mesh: Mesh, tmp_path: Path) -> None:
    a, b, c = await serve_both(mesh, tmp_path, (0, 0))
    for session in ("alice", "bob", "carol", "dave"):
        hits = {await ask(mesh, h, session=session) for h in (a, b, c) for _ in range(3)}
        assert len(hits) == 1, (session, hits)
    system = "You are a careful assistant who answers in French. " * 10
    where = {await ask(mesh, h, prompt=system + f"question {i}") for h in (a, b, c) for i in range(4)}
    assert len(where) == 1  # one prefix, one warm cache, whichever node is asked
    spread = Counter([await ask(mesh, a, session=f"user-{i}") for i in range(40)])
    assert set(spread) == {"node1", "node2"}, spread  # many sessions use both
