"""gswarm's four pipelines (seed 001: deployment, multi-model, distributed 70B,
migration) run end to end on two real daemons with fake GPUs: downloads from
a local hub standing in for huggingface.co (``HF_ENDPOINT``), moves to GPUs
(staged on the fastest tier, VRAM reserved), serves by the vLLM template
(answered by the test engine through ``--engine-binaries``), health checks,
stops and deletes.  One change to the documents: the health check's
``http://node1:8080`` becomes ``http://127.0.0.1:8080`` (loopback has no host
named node1)."""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import meshnode.daemon
from protocol.serving import LifePolicy

from .conftest import Handle, Mesh, all_alive, run_pipeline, wait_for
from .fakehub import FakeFile, FakeHub, FakeRepo, run_fakehub

ROOT = Path(__file__).resolve().parents[2]
FAKE_VLLM = str(ROOT / "tests" / "engine" / "fake_vllm")
REPOS = ("meta-llama/Llama-2-7b-chat-hf", "meta-llama/Llama-2-7b-hf", "stabilityai/stable-diffusion-xl-base-1.0",
         "meta-llama/Llama-2-70b-hf")
PORTS = (8080, 8081)


def engine_files(seed: int) -> dict[str, FakeFile]:
    data = hashlib.sha256(f"seed-model-{seed}".encode()).digest() * 2048  # 64 KiB
    return {"model.bin": FakeFile(data, lfs=True),
            "engine.json": FakeFile(json.dumps({"weights": {"model.bin": hashlib.sha256(data).hexdigest()}}).encode()),
            "config.json": FakeFile(b'{"model_type": "llama"}')}


@pytest.fixture
async def hub(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeHub]:
    for port in PORTS:  # the documents name these ports: they must be free here
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                pytest.skip(f"port {port}, which the seed pipelines name, is in use on this machine")
    monkeypatch.setattr(meshnode.daemon, "LifePolicy", lambda **kw: LifePolicy(probe_interval_s=0.3, **kw))
    async with run_fakehub() as h:
        for i, repo_id in enumerate(REPOS):
            repo = FakeRepo(repo_id)
            repo.add_commit(engine_files(i), "main")
            h.add_repo(repo)
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
        yield h


def document(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())
    for a in doc["actions"]:
        if a.get("target_url"):
            a["target_url"] = a["target_url"].replace("//node1:", "//127.0.0.1:").replace("//node2:", "//127.0.0.1:")
    return dict(doc)


async def run(mesh: Mesh, h: Handle, doc: dict[str, Any]) -> dict[str, Any]:
    out = await run_pipeline(mesh, h, doc)
    assert out["status"] == "completed", json.dumps(out, indent=1)[:4000]
    return out


async def services(mesh: Mesh, h: Handle) -> list[dict[str, Any]]:
    return list((await mesh.client.get(h.url + "/services")).json()["services"])


async def stop_all(mesh: Mesh, h: Handle) -> None:
    for s in await services(mesh, h):
        r = await mesh.client.delete(h.url + f"/models/{s['model_name']}/services/{s['node']}")
        assert r.status_code in (200, 404), r.text

    async def none_left() -> bool:
        return await services(mesh, h) == []

    await wait_for(none_left, what="every service stopped")


async def test_the_four_seed_pipelines_run_end_to_end(mesh: Mesh, hub: FakeHub) -> None:
    common = ["--engine-binaries", f"vllm={FAKE_VLLM}", "--gpu-interval", "0.2", "--engine-drain", "2"]
    a = await mesh.start("node1", "--fake-gpus", "4x24GiB", *common)
    b = await mesh.start("node2", "--fake-gpus", "1x24GiB", *common, join=[a])
    await all_alive(mesh, [a, b])

    # Deployment: download, move to gpu0 keeping the source, serve on 8080, check it.
    job = await run(mesh, a, document("deployment"))
    (svc,) = await services(mesh, a)
    assert (svc["model_name"], svc["device"], svc["port"], svc["engine"], svc["state"]) == \
        ("llama-7b-chat", "node1:gpu0", 8080, "vllm", "healthy")
    steps = {x["action_id"]: x for x in job["actions"]}
    assert "loaded for gpu0" in steps["move_to_gpu"]["parts"][0]["note"]
    assert a.node.store.get("llama-7b-chat", "disk") is not None  # keep_source: true
    assert a.node.store.get("llama-7b-chat", "dram") is not None  # staged on the fastest tier
    info = (await mesh.client.get(b.url + "/models/llama-7b-chat")).json()
    assert "node1:gpu0" in info["locations"]
    r = await mesh.client.post("http://127.0.0.1:8080/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == "llama-7b-chat"
    await stop_all(mesh, a)

    # Multi-model: two downloads, two moves to GPUs (sources dropped), two serves on two nodes.
    await run(mesh, b, document("multi-model"))
    got = {(s["model_name"], s["device"], s["port"]) for s in await services(mesh, a)}
    assert got == {("llama-7b", "node1:gpu0", 8080), ("stable-diffusion-xl", "node2:gpu0", 8081)}
    assert a.node.store.get("llama-7b", "disk") is None  # a move: the disk copy is gone
    await stop_all(mesh, a)

    # Distributed 70B: one move to three GPUs, one engine on all three.
    await run(mesh, a, document("distributed-70b"))
    (svc,) = await services(mesh, a)
    assert svc["gpus"] == [0, 1, 2] and svc["state"] == "healthy"
    assert (await mesh.client.get(svc["url"] + "/debug/env")).json()["cuda_visible_devices"] == "0,1,2"
    await stop_all(mesh, a)

    # Migration: llama-7b served on node1:gpu0 moves to node2: copied, the old engine stopped,
    # the new one started, the old copy and GPU freed.
    await run(mesh, a, {"name": "pre", "actions": [
        {"action_id": "s", "action_type": "serve", "model_name": "llama-7b", "port": 8081, "devices": ["node1:gpu0"]}]})
    a_copy = a.node.store.get("llama-7b", "dram") or a.node.store.get("llama-7b", "disk")
    assert a_copy is not None
    if a.node.store.get("llama-7b", "disk") is None:  # the document copies from node1:disk
        r = await mesh.client.post(a.url + "/models/llama-7b/copy", json={"from_device": "node1:dram",
                                                                           "to_device": "node1:disk"})
        assert r.status_code == 202
        await wait_for(lambda: a.node.store.get("llama-7b", "disk") is not None, what="llama-7b on node1:disk")
    await wait_for(lambda: b.node.registry is not None and any(
        c.device == "node1:disk" for c in b.node.registry.model("llama-7b").copies), what="node1:disk known to node2")
    job = await run(mesh, b, document("migration"))
    svcs = await services(mesh, a)
    assert [(s["node"], s["port"]) for s in svcs] == [("node2", 8080)]
    assert a.node.store.get("llama-7b", "disk") is None and b.node.store.get("llama-7b", "disk") is not None
    steps = {x["action_id"]: x for x in job["actions"]}
    assert steps["stop_old_service"]["parts"][0]["note"] == "stopped port 8081"
    await stop_all(mesh, a)
