"""A gswarm user feels at home: seed 004's CLI and seed 001's API forms, as
they are, on real daemons (README's "from gswarm" table, a test per row)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from .conftest import Handle, Mesh, all_alive, wait_for
from .test_serving import COMMAND, put_model, services, start, state_on


async def cli(h: Handle, *argv: str) -> subprocess.CompletedProcess[bytes]:
    exe = str(Path(sys.executable).parent / "meshnode")
    return await trio.run_process([exe, "--peer", h.url, *argv], capture_stdout=True, capture_stderr=True,
                                  check=False, env={**os.environ, "COLUMNS": "250"})


async def healthy(mesh: Mesh, h: Handle, model: str = "org/e") -> None:
    async def check() -> bool:
        return await state_on(mesh, h, model) == "healthy"

    await wait_for(check, what=f"{model} healthy")


async def test_gswarm_serve_forms(mesh: Mesh, tmp_path: Path) -> None:
    """``POST/DELETE /models/{name}/serve``, ``GET .../serve/status``, ``target_nodes``."""
    a = await start(mesh, "node1")
    b = await start(mesh, "node2", join=[a])
    await all_alive(mesh, [a, b])
    await put_model(mesh, a, tmp_path)
    port = a.node.cfg.service_ports[0]
    r = await mesh.client.post(a.url + "/models/org/e/serve", json={
        "port": port, "device": "gpu0", "config": {"framework": "command", "command": COMMAND}})
    assert r.status_code == 202, r.text
    assert r.json()["node"] == "node1" and r.json()["gpus"] == [0] and r.json()["port"] == port
    await healthy(mesh, a)
    st = (await mesh.client.get(b.url + "/models/org/e/serve/status")).json()
    if not st["serving"]:  # node2 learns of it by gossip
        await wait_for(lambda: b.node.services is not None and any(
            s.state.value == "healthy" for s in b.node.services.records()), what="node2 sees it")
        st = (await mesh.client.get(b.url + "/models/org/e/serve/status")).json()
    assert st["serving"] is True and [s["device"] for s in st["services"]] == ["node1:gpu0"]
    r = await mesh.client.delete(b.url + "/models/org/e/serve")  # asked of node2: stops it on node1
    assert r.status_code == 200, r.text
    assert [s["port"] for s in r.json()["stopped"]] == [port]
    assert await services(mesh, a) == []
    r = await mesh.client.post(a.url + "/models/org/e/serve", json={"device": "gpu0",
                                                                    "config": {"framework": "transformers"}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "UNKNOWN_ENGINE"
    # target_nodes: the node's freest GPU that fits.
    r = await mesh.client.post(b.url + "/models/org/e/services", json={
        "target_nodes": ["node1"], "config": {"engine": "command", "command": COMMAND}})
    assert r.status_code == 202, r.text
    (svc,) = r.json()["services"]
    assert svc["node"] == "node1" and len(svc["gpus"]) == 1
    await healthy(mesh, a)
    r = await mesh.client.post(a.url + "/models/org/e/services", json={"target_nodes": ["nope"]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "NODE_NOT_FOUND"


async def test_gswarm_job_create_and_storage(mesh: Mesh, tmp_path: Path) -> None:
    a = await start(mesh, "node1")
    doc: dict[str, Any] = {"name": "probe", "actions": [
        {"action_id": "h", "action_type": "health_check", "target_url": f"{a.url}/health"}]}
    r = await mesh.client.post(a.url + "/jobs/my-job-1/create", json=doc)
    assert r.status_code == 202, r.text
    assert r.json()["job_id"] == "my-job-1"
    r = await mesh.client.post(a.url + "/jobs/my-job-1/create", json=doc)
    assert r.status_code == 409 and r.json()["error"]["code"] == "JOB_ID_TAKEN"
    assert (await mesh.client.get(a.url + "/jobs/my-job-1")).status_code == 200
    disk = (await mesh.client.get(a.url + "/storage")).json()["devices"]["disk"]
    assert disk["available"] == disk["free"] > 0


async def test_gswarm_cli_forms(mesh: Mesh, tmp_path: Path) -> None:
    """Seed 004's commands: register NAME alone, list/nodes/job-status --verbose,
    jobs --status, unregister --force (services stopped, copies purged)."""
    a = await start(mesh, "node1")
    r = await cli(a, "register", "llama-7b")
    assert r.returncode == 0, r.stderr.decode()
    r = await cli(a, "register", "llama-7b-chat", "--type", "llm", "--url", "https://huggingface.co/meta-llama/x",
                  "--desc", "Llama 2 7B")
    assert r.returncode == 0, r.stderr.decode()
    await put_model(mesh, a, tmp_path)
    r = await cli(a, "serve", "org/e", "--on", "node1:gpu1", "--engine", "command", "--command", " ".join(COMMAND),
                  "--wait")
    assert r.returncode == 0, r.stderr.decode()
    r = await cli(a, "list", "--verbose")
    out = r.stdout.decode()
    assert r.returncode == 0 and "llama-7b-chat" in out and "node1:gpu1 port" in out and "healthy" in out, out
    r = await cli(a, "nodes", "--verbose")
    out = r.stdout.decode()
    assert r.returncode == 0 and "generation" in out and "gpu0" in out and "free" in out, out
    job = await mesh.client.post(a.url + "/jobs", json={"name": "probe", "actions": [
        {"action_id": "h", "action_type": "health_check", "target_url": f"{a.url}/health"}]})
    jid = job.json()["job_id"]
    r = await cli(a, "job-status", jid, "--verbose")
    assert r.returncode == 0 and "parts" in r.stdout.decode() and "node1" in r.stdout.decode()

    async def completed() -> bool:
        return (await mesh.client.get(a.url + f"/jobs/{jid}")).json()["status"] == "completed"

    await wait_for(completed, what="the job done")
    r = await cli(a, "jobs", "--status", "completed")
    assert r.returncode == 0 and jid in r.stdout.decode()
    r = await cli(a, "jobs", "--status", "failed")
    assert r.returncode == 0 and jid not in r.stdout.decode()
    r = await cli(a, "unregister", "org/e", "--force")
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr.decode()
    assert "stopped org/e on node1:gpu1" in out and "deleted copies: node1:disk" in out, out
    assert await services(mesh, a) == []
    await wait_for(lambda: a.node.store.get("org/e", "disk") is None, what="the copy purged")


async def test_a_gpu_the_node_lacks_is_refused_at_submit(mesh: Mesh, tmp_path: Path) -> None:
    a = await start(mesh, "node1")  # two pretend GPUs
    await wait_for(lambda: a.node.gpus is not None and a.node.gpus.current is not None, what="its GPUs read")
    r = await mesh.client.post(a.url + "/jobs", json={"name": "bad", "actions": [
        {"action_id": "d", "action_type": "download", "model_name": "org/x", "source_url": "file:///nowhere",
         "devices": ["node1:disk"]},
        {"action_id": "s", "action_type": "serve", "model_name": "org/x", "devices": ["node1:gpu2"],
         "dependencies": ["d"]},
        {"action_id": "t", "action_type": "serve", "model_name": "org/y", "devices": ["node7:gpu0"]}]})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["problem_count"] == 3, err
    assert {(p["action_id"], p["field"]) for p in err["problems"]} == {
        ("s", "devices[0]"), ("t", "devices[0]"), ("t", "model_name")}
    assert (await mesh.client.get(a.url + "/jobs")).json()["jobs"] == []
