"""Pipelines on real daemons: any node takes one, every node shows it, steps
run in parallel where their devices say, failures end their dependents,
cancel stops what runs, and a coordinator's death loses nothing."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import yaml

from .conftest import Handle, Mesh, all_alive, wait_for
from .test_transfer import make_model, tree_digest

ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


async def submit(mesh: Mesh, h: Handle, doc: dict[str, Any]) -> dict[str, Any]:
    r = await mesh.client.post(h.url + "/jobs", json=doc)
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/jobs/{r.json()['job_id']}"
    assert r.json()["held_by"][0] == h.node.cfg.node_id
    return dict(r.json())


async def job_of(mesh: Mesh, h: Handle, j: dict[str, Any]) -> dict[str, Any]:
    """The job as ``h`` shows it, once ``h`` has seen the write that made it (read your writes)."""
    r = await mesh.client.get(h.url + f"/jobs/{j['job_id']}", headers={"X-Mesh-After": j["mesh_token"]})
    assert r.status_code == 200, r.text
    return dict(r.json())


async def until_ended(mesh: Mesh, h: Handle, j: dict[str, Any], timeout_s: float = 40) -> dict[str, Any]:
    out: dict[str, Any] = {}

    async def ended() -> bool:
        nonlocal out
        out = await job_of(mesh, h, j)
        return out["status"] in ("completed", "failed", "cancelled")

    await wait_for(ended, timeout_s, what=f"job {j['job_id']} to end")
    return out


def actions(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["action_id"]: a for a in job["actions"]}


async def three(mesh: Mesh) -> tuple[Handle, Handle, Handle]:
    a = await mesh.start("node1")
    b = await mesh.start("node2", join=[a])
    c = await mesh.start("node3", join=[a])
    await all_alive(mesh, [a, b, c])
    return a, b, c


async def test_a_pipeline_runs_its_steps_where_they_say_and_every_node_shows_it(mesh: Mesh, tmp_path: Path) -> None:
    src = make_model(tmp_path, 3 * MiB + 5)
    a, b, c = await three(mesh)
    doc = {
        "name": "stage", "description": "download once, spread, move, clean up",
        "actions": [
            {"action_id": "dl", "action_type": "download", "model_name": "org/m", "source_url": src.as_uri(),
             "devices": ["node1:disk"], "dependencies": []},
            {"action_id": "spread", "action_type": "copy", "model_name": "org/m",
             "devices": ["node1:disk", "node2:disk", "node3:disk"], "dependencies": ["dl"]},
            {"action_id": "to_ram", "action_type": "move", "model_name": "org/m",
             "devices": ["node2:disk", "node2:dram"], "dependencies": ["spread"]},
            {"action_id": "free", "action_type": "delete", "model_name": "org/m",
             "devices": ["node3:disk"], "dependencies": ["spread"]},
            {"action_id": "check", "action_type": "health_check", "target_url": c.url + "/health",
             "devices": [], "dependencies": ["to_ram", "free"]},
        ],
    }
    j = await submit(mesh, b, doc)  # taken by node2
    assert j["status"] == "pending" and j["submitted_by"] == "node2"
    done = await until_ended(mesh, a, j)
    assert done["status"] == "completed", json.dumps(done, indent=1)[:3000]
    acts = actions(done)
    assert [p["node"] for p in acts["spread"]["parts"]] == ["node2", "node3"]  # each target ran its own part
    assert all(a_["status"] == "completed" for a_ in acts.values())
    # The work was done, not pretended.
    assert b.node.store.get("org/m", "disk") is None  # moved away
    dram = b.node.store.get("org/m", "dram")
    assert dram is not None and tree_digest(dram.path) == tree_digest(src)
    assert c.node.store.get("org/m", "disk") is None  # deleted
    # Every node answers the same; gswarm's status route too.
    for h in (a, b, c):
        other = await until_ended(mesh, h, j)
        assert [x["status"] for x in other["actions"]] == [x["status"] for x in done["actions"]]
        st = (await mesh.client.get(h.url + f"/jobs/{j['job_id']}/status")).json()
        assert st["status"] == "completed" and st["progress"] == {"completed": 5, "total": 5}
    listed = (await mesh.client.get(c.url + "/jobs")).json()
    assert [x["job_id"] for x in listed["jobs"]] == [j["job_id"]] and listed["total_count"] == 1
    assert (await mesh.client.get(a.url + "/status")).json()["jobs"] == {"total": 1, "completed": 1}


async def test_a_failed_step_ends_its_dependents_and_the_job_names_it(mesh: Mesh, tmp_path: Path) -> None:
    a, _b, c = await three(mesh)
    doc = {"name": "bad", "actions": [
        {"action_id": "dl", "action_type": "download", "model_name": "ghost",
         "source_url": (tmp_path / "nothing-here").as_uri(), "devices": ["node2:disk"]},
        {"action_id": "after", "action_type": "copy", "model_name": "ghost", "devices": ["node2:disk", "node3:disk"],
         "dependencies": ["dl"]},
        {"action_id": "beside", "action_type": "health_check", "target_url": a.url + "/health"},
    ]}
    j = await submit(mesh, a, doc)
    done = await until_ended(mesh, c, j)
    acts = actions(done)
    assert done["status"] == "failed" and done["error"]["action_id"] == "dl", done
    assert acts["dl"]["status"] == "failed" and acts["dl"]["error"]["code"] == "SOURCE_NOT_FOUND"
    assert acts["after"]["status"] == "upstream_failed"
    assert acts["beside"]["status"] in ("completed", "cancelled")  # started with dl, or stopped by fail_fast


async def test_independent_steps_on_three_nodes_start_together(mesh: Mesh) -> None:
    """Three downloads on three nodes, none depending on another.  The source
    holds every answer until all three requests are in, so steps run one after
    another would never end (the source then answers 503 and the job fails);
    and the requests arrive within a second of each other."""
    a, b, c = await three(mesh)
    body = bytes(range(256)) * 256
    arrivals: dict[str, float] = {}
    all_in = trio.Event()

    async def handle(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        with trio.move_on_after(30):
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                    continue
                assert isinstance(ev, h11.Request)
                break
            path = ev.target.decode()
            arrivals.setdefault(path, trio.current_time())
            if len(arrivals) == 3:
                all_in.set()
            with trio.move_on_after(20):
                await all_in.wait()
            status, data = (200, body) if all_in.is_set() else (503, b"")
            headers = [("content-length", str(len(data))), ("connection", "close")]
            for out in (h11.Response(status_code=status, headers=headers), h11.Data(data=data), h11.EndOfMessage()):
                await stream.send_all(conn.send(out) or b"")
        await stream.aclose()

    async with trio.open_nursery() as n:
        (listener,) = await n.start(functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        base = f"http://127.0.0.1:{listener.socket.getsockname()[1]}"
        doc = {"name": "side-by-side", "actions": [
            {"action_id": f"dl{i}", "action_type": "download", "model_name": f"org/side-{i}",
             "source_url": f"{base}/w{i}.bin", "devices": [f"node{i}:disk"]}
            for i in (1, 2, 3)
        ]}
        done = await until_ended(mesh, b, await submit(mesh, a, doc))
        n.cancel_scope.cancel()
    assert done["status"] == "completed", json.dumps(done, indent=1)[:3000]
    assert sorted(arrivals) == ["/w1.bin", "/w2.bin", "/w3.bin"]
    assert max(arrivals.values()) - min(arrivals.values()) < 1.0, arrivals
    starts = [x["started_ms"] for x in done["actions"]]
    assert max(starts) - min(starts) < 1000, starts
    for i, h in enumerate((a, b, c), 1):
        got = h.node.store.get(f"org/side-{i}", "disk")
        assert got is not None and (got.path / f"w{i}.bin").read_bytes() == body


async def test_validation_lists_every_problem_and_runs_nothing(mesh: Mesh) -> None:
    a = await mesh.start("node1")
    doc = {"name": "x", "actions": [
        {"action_id": "a", "action_type": "copy", "model_name": "m", "devices": ["node1:disk", "node9:disk"],
         "dependencies": ["b"]},
        {"action_id": "b", "action_type": "serve", "model_name": "m", "devices": ["node1:gpu0"], "dependencies": ["a"],
         "config": {"engine": "command", "command": ["my-engine"]}},  # takes no {port}: it needs one
        {"action_id": "c", "action_type": "fly", "model_name": "m"},
    ]}
    r = await mesh.client.post(a.url + "/jobs", json=doc)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "INVALID_PIPELINE"
    got = {(p["action_id"], p["field"]) for p in err["problems"]}
    assert {("b", "port"), ("c", "action_type"), ("a", "dependencies")} <= got, got
    # Then what needs the mesh: an unknown node, an unregistered model.
    doc2 = {"name": "y", "actions": [doc["actions"][0] | {"dependencies": []}]}
    r = await mesh.client.post(a.url + "/jobs", json=doc2)
    got = {(p["action_id"], p["field"]) for p in r.json()["error"]["problems"]}
    assert r.status_code == 422 and got == {("a", "devices[1]"), ("a", "model_name")}, r.text
    assert (await mesh.client.get(a.url + "/jobs")).json()["total_count"] == 0


async def test_hostile_documents_get_a_4xx_and_the_node_goes_on(mesh: Mesh) -> None:
    a = await mesh.start("node1")
    url = a.url + "/jobs/from-yaml"
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b, *b]\n"
    cases = {
        "bomb": (bomb.encode(), 422),
        "not utf-8": (b"name: \xff\xfe\n", 422),
        "10 MB": (b"#" * (10 * MiB), 413),
        "many actions": (yaml.safe_dump({"name": "n", "actions": [
            {"action_id": f"a{i}", "action_type": "health_check", "target_url": "http://x/"} for i in range(10_000)]}
        ).encode(), 413),
        "chain 10,000 deep": (json.dumps({"name": "n", "actions": [
            {"action_id": f"a{i}", "action_type": "health_check", "target_url": "http://x/",
             "dependencies": [f"a{i - 1}"] if i else []} for i in range(10_000)]}).encode(), 413),
        "chain 1,000 deep, under the size bound": (json.dumps({"name": "n", "actions": [
            {"action_id": f"a{i}", "action_type": "health_check", "target_url": "http://x/",
             "dependencies": [f"a{i - 1}"] if i else []} for i in range(1000)]}).encode(), 422),
        "not yaml": (b"name: [unclosed\n", 422),
        "an integer of 5,000 digits": (b'{"a": ' + b"9" * 5000 + b"}", 422),
        "nested 40 deep": (b"a: " + b"[" * 40 + b"]" * 40 + b"\n", 422),
        "a list": (b"- 1\n- 2\n", 422),
    }
    for what, (body, status) in cases.items():
        with trio.fail_after(5):
            r = await mesh.client.post(url, content=body, headers={"content-type": "application/yaml"})
        assert r.status_code == status, (what, r.status_code, r.text[:300])
        assert r.json()["error"]["code"], what
    assert (await mesh.client.get(a.url + "/health")).status_code == 200
    assert (await mesh.client.get(a.url + "/jobs")).json()["total_count"] == 0


async def test_the_seed_yaml_is_taken_raw_or_as_a_file(mesh: Mesh) -> None:
    """gswarm's migration pipeline, unchanged, raw or as a multipart file: on
    nodes without a GPU its serve and stop steps name GPUs those nodes do not
    have, so it is refused at submit with every problem, rather than run its
    copy and fail later (tests/integration/test_seed_pipelines.py runs all
    four with fake GPUs)."""
    a = await mesh.start("node1")
    b = await mesh.start("node2", join=[a])
    await wait_for(lambda: a.node.jobs is not None and b.node.jobs is not None and all(
        h.node.jobs._gpu_indexes(n) is not None for h in (a, b) for n in ("node1", "node2")),
        what="each node's GPU record (none) seen by both")
    text = (ROOT / "examples" / "migration.yaml").read_bytes()
    r = await mesh.client.post(a.url + "/jobs/from-yaml", content=text)
    gpus = {("stop_old_service", "devices[0]"), ("start_new_service", "devices[0]"), ("cleanup_old", "devices[1]")}
    assert r.status_code == 422, r.text
    got = {(p["action_id"], p["field"]) for p in r.json()["error"]["problems"]}
    assert gpus < got and {f for _a, f in got - gpus} == {"model_name"}, r.text
    src = make_model(a.node.cfg.data_dir.parent, 1 * MiB)
    r = await mesh.client.post(a.url + "/models/llama-7b/download",
                               json={"source_url": src.as_uri(), "target_device": "node1:disk"})
    assert r.status_code == 202
    await wait_for(lambda: b.node.registry is not None and b.node.registry.find("llama-7b") is not None,
                   what="llama-7b registered on node2")
    r = await mesh.client.post(b.url + "/jobs/from-yaml", files={"file": ("migration.yaml", text)})
    assert r.status_code == 422, r.text
    assert {(p["action_id"], p["field"]) for p in r.json()["error"]["problems"]} == gpus, r.text
    assert "node2 has no GPU 0 (it reports no GPU)" in r.text
    assert (await mesh.client.get(b.url + "/jobs")).json()["jobs"] == []


async def test_cancel_stops_a_running_transfer_and_the_rest(mesh: Mesh, tmp_path: Path) -> None:
    src = make_model(tmp_path, 24 * MiB)
    a = await mesh.start("node1", "--max-egress", "2M")
    b = await mesh.start("node2", join=[a])
    r = await mesh.client.post(a.url + "/models/org/big/download",
                               json={"source_url": src.as_uri(), "target_device": "node1:disk"})
    assert r.status_code == 202
    await wait_for(lambda: b.node.registry is not None and b.node.registry.find("org/big") is not None
                   and a.node.store.get("org/big", "disk") is not None, what="org/big on node1")
    j = await submit(mesh, a, {"name": "slow", "actions": [
        {"action_id": "cp", "action_type": "copy", "model_name": "org/big", "devices": ["node1:disk", "node2:disk"]},
        {"action_id": "then", "action_type": "delete", "model_name": "org/big", "devices": ["node1:disk"],
         "dependencies": ["cp"]}]})

    async def copying() -> bool:
        p = actions(await job_of(mesh, a, j))["cp"]["parts"][0]
        return bool(p["status"] == "running" and p["bytes_done"])

    await wait_for(copying, what="the copy under way")
    r = await mesh.client.post(b.url + f"/jobs/{j['job_id']}/cancel")
    assert r.status_code == 200 and r.json()["cancelled"], r.text
    done = await until_ended(mesh, a, j)
    assert done["status"] == "cancelled", done
    acts = actions(done)
    assert acts["cp"]["status"] == "cancelled" and acts["then"]["status"] == "cancelled"
    assert b.node.store.get("org/big", "disk") is None
    partial = b.node.store.tier_root("disk") / ".partial"
    assert not partial.exists() or not any(partial.iterdir())  # the partial copy removed
    assert a.node.store.get("org/big", "disk") is not None  # the delete never ran


async def test_placement_ranks_nodes_with_reasons(mesh: Mesh, tmp_path: Path) -> None:
    a, _b, c = await three(mesh)
    src = make_model(tmp_path, 2 * MiB)
    r = await mesh.client.post(a.url + "/models/org/p/download",
                               json={"source_url": src.as_uri(), "target_device": "node2:disk"})
    assert r.status_code == 202
    for h in (a, c):  # node3 answers below, node1 places the step: both must have heard
        await wait_for(lambda h=h: h.node.registry is not None and bool(
            (m := h.node.registry.find("org/p")) and m.locations), what=f"org/p on node2, seen by {h.node.cfg.node_id}")
    r = await mesh.client.get(c.url + "/placement", params={"model": "org/p", "device": "disk"})
    body = r.json()
    assert r.status_code == 200 and body["chosen"] == "node2:disk", body  # it holds the model
    gpu = (await mesh.client.get(c.url + "/placement", params={"model": "org/p", "device": "gpu"})).json()
    assert gpu["chosen"] is None and all("no GPU" in n["reasons"] for n in gpu["ranking"])
    # A step with no node is placed: a copy to "any:dram" lands on the best node for it.
    j = await submit(mesh, a, {"name": "placed", "actions": [
        {"action_id": "cp", "action_type": "copy", "model_name": "org/p", "devices": ["node2:disk", "any:dram"]}]})
    done = await until_ended(mesh, a, j)
    assert done["status"] == "completed", done
    (dev,) = actions(done)["cp"]["devices"][1:]
    assert dev.endswith(":dram") and dev != "any:dram"


async def _model_on_node1(mesh: Mesh, a: Handle, others: list[Handle], root: Path, mib: int) -> None:
    src = make_model(root, mib * MiB)
    r = await mesh.client.post(a.url + "/models/org/m/download",
                               json={"source_url": src.as_uri(), "target_device": "node1:disk"})
    assert r.status_code == 202

    async def everywhere() -> bool:
        for h in others:
            m = await mesh.client.get(h.url + "/models/org/m")
            if m.status_code != 200 or m.json()["locations"] != ["node1:disk"]:
                return False
        return True

    await wait_for(everywhere, what="org/m on node1, seen by all")


async def test_the_coordinator_killed_mid_job_loses_nothing_and_nothing_runs_twice(mesh: Mesh, tmp_path: Path) -> None:
    """node3 takes the job and dies (no goodbye) while node2 copies: node2
    finishes its part, node1 (the smallest live id) takes the job over, runs
    the health check the coordinator owes, re-publishes the job record, and
    every step ran once."""
    a = await mesh.start("node1", "--max-egress", "4M", "--job-node-wait", "60")
    b = await mesh.start("node2", join=[a])
    c = await mesh.start("node3", join=[a])
    await _model_on_node1(mesh, a, [b, c], tmp_path, 12)
    j = await submit(mesh, c, {"name": "survive", "actions": [
        {"action_id": "cp", "action_type": "copy", "model_name": "org/m", "devices": ["node1:disk", "node2:disk"]},
        {"action_id": "check", "action_type": "health_check", "target_url": b.url + "/health", "dependencies": ["cp"]},
        {"action_id": "ram", "action_type": "copy", "model_name": "org/m", "devices": ["node2:disk", "node1:dram"],
         "dependencies": ["check"]},
    ]})
    assert len(j["held_by"]) >= 2, j["held_by"]  # another node holds the job before the 202

    async def copying() -> bool:
        p = actions(await job_of(mesh, a, j))["cp"]["parts"][0]
        return bool(p["status"] == "running" and p["bytes_done"])

    await wait_for(copying, what="the copy under way")
    c.kill()
    done = await until_ended(mesh, a, j, timeout_s=60)
    assert done["status"] == "completed", json.dumps(done, indent=1)[:3000]
    assert done["coordinator"] == "node1"
    acts = actions(done)
    assert acts["check"]["parts"][0]["node"] == "node1"  # the new coordinator ran it
    assert all(x["attempts"] == 1 for x in acts.values())
    assert (b.node.jobs and b.node.jobs.started_parts, a.node.jobs and a.node.jobs.started_parts) == (1, 2)
    assert a.node.mesh is not None and a.node.mesh.entry("node1", f"job/{j['job_id']}") is not None  # adopted
    assert a.node.store.get("org/m", "dram") is not None


async def test_an_executor_killed_mid_step_resumes_its_part_on_restart(mesh: Mesh, tmp_path: Path) -> None:
    a = await mesh.start("node1", "--max-egress", "4M")
    b = await mesh.start("node2", join=[a])
    await _model_on_node1(mesh, a, [b], tmp_path, 12)
    j = await submit(mesh, a, {"name": "resume", "actions": [
        {"action_id": "cp", "action_type": "copy", "model_name": "org/m", "devices": ["node1:disk", "node2:disk"]}]})

    async def copying() -> bool:
        p = actions(await job_of(mesh, a, j))["cp"]["parts"][0]
        return bool(p["status"] == "running" and p["bytes_done"])

    await wait_for(copying, what="the copy under way")
    b.kill()
    await b.done.wait()
    mid = actions(await job_of(mesh, a, j))["cp"]
    assert mid["status"] in ("running", "waiting_node"), mid
    b2 = await mesh.start("node2", join=[a], data_dir=tmp_path / "node2")
    done = await until_ended(mesh, a, j, timeout_s=60)
    assert done["status"] == "completed", done
    part = actions(done)["cp"]["parts"][0]
    assert part["node"] == "node2" and part["attempt"] == 1
    c = b2.node.store.get("org/m", "disk")
    assert c is not None and tree_digest(c.path) == tree_digest(tmp_path / "src-model")


async def test_a_step_whose_node_stays_away_fails_node_unavailable(mesh: Mesh, tmp_path: Path) -> None:
    a = await mesh.start("node1", "--job-node-wait", "2")
    b = await mesh.start("node2", join=[a])
    await _model_on_node1(mesh, a, [b], tmp_path, 1)
    b.kill()

    async def b_dead() -> bool:
        nodes = (await mesh.client.get(a.url + "/nodes")).json()["nodes"]
        return {n["node_id"]: n["state"] for n in nodes}.get("node2") == "dead"

    await wait_for(b_dead, what="node2 dead")
    j = await submit(mesh, a, {"name": "away", "actions": [
        {"action_id": "cp", "action_type": "copy", "model_name": "org/m", "devices": ["node1:disk", "node2:disk"]}]})
    first = actions(await job_of(mesh, a, j))["cp"]
    assert first["status"] == "waiting_node", first
    done = await until_ended(mesh, a, j)
    assert done["status"] == "failed" and done["error"]["code"] == "NODE_UNAVAILABLE", done


async def _cli(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    import os
    import sys
    exe = str(Path(sys.executable).parent / "meshnode")
    r = await trio.run_process([exe, *argv], capture_stdout=True, capture_stderr=True, check=False,
                               env={**os.environ, "COLUMNS": "200", **(env or {})})
    return r.returncode, r.stdout.decode(), r.stderr.decode()


async def test_the_cli_runs_a_pipeline_and_shows_jobs(mesh: Mesh, tmp_path: Path) -> None:
    a = await mesh.start("node1")
    b = await mesh.start("node2", join=[a])
    await _model_on_node1(mesh, a, [b], tmp_path, 2)
    env = {"XDG_STATE_HOME": str(tmp_path / "state")}
    doc = tmp_path / "p.yaml"
    doc.write_text(yaml.safe_dump({"name": "cli", "actions": [
        {"action_id": "cp", "action_type": "copy", "model_name": "org/m", "devices": ["node1:disk", "node2:dram"]},
        {"action_id": "ok", "action_type": "health_check", "target_url": b.url + "/health", "dependencies": ["cp"]},
    ]}))
    code, out, err = await _cli("--peer", b.url, "job", str(doc), "--wait", env=env)
    assert code == 0, (out, err)
    assert "cp completed" in err and "ok completed" in err and "completed: cli (2 of 2 steps" in out, (out, err)
    jid = out.split()[1]
    code, out, _ = await _cli("jobs", "--peer", a.url, env=env)
    assert code == 0 and jid in out and "2/2" in out, out
    for verb in (["job", jid], ["job-status", jid]):
        code, out, _ = await _cli("--peer", a.url, *verb, env=env)
        assert code == 0 and "cp" in out and "completed" in out, out
    code, out, _ = await _cli("--peer", a.url, "placement", "org/m", "--device", "disk", env=env)
    assert code == 0 and "org/m on disk: node1:disk" in out, out
    # A bad pipeline: exit 1, every problem on the line, nothing run.
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nactions:\n  - action_id: a\n    action_type: fly\n  - action_id: a\n    action_type: copy\n")
    code, out, err = await _cli("--peer", a.url, "job", str(bad), env=env)
    assert code == 1 and "INVALID_PIPELINE" in err and "[a] action_type" in err, err
    # A failing pipeline with --wait exits 1.
    bad.write_text(yaml.safe_dump({"name": "f", "actions": [
        {"action_id": "no", "action_type": "health_check", "target_url": "http://127.0.0.1:9/", "timeout_s": 1}]}))
    code, out, err = await _cli("--peer", a.url, "job", str(bad), "--wait", env=env)
    assert code == 1 and "UNHEALTHY" in err, (out, err)


async def test_a_retryable_failure_is_tried_again_and_old_jobs_are_forgotten(mesh: Mesh) -> None:
    """A health check whose endpoint comes up late fails UNHEALTHY, is retried
    after its backoff and completes on the second attempt; with --job-keep 1
    the finished job is gone a moment later, on every node."""
    import socket

    a = await mesh.start("node1", "--job-keep", "1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    j = await submit(mesh, a, {"name": "late", "actions": [
        {"action_id": "h", "action_type": "health_check", "target_url": f"http://127.0.0.1:{port}/health",
         "timeout_s": 1.5, "retries": 3, "backoff_s": 0.5}]})

    async def answer(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await stream.aclose()

    async with trio.open_nursery() as n:
        async def up_later() -> None:
            await trio.sleep(2.5)  # after the first attempt's 1.5 s
            await trio.serve_tcp(answer, port, host="127.0.0.1")

        n.start_soon(up_later)
        done = await until_ended(mesh, a, j)
        n.cancel_scope.cancel()
    h = actions(done)["h"]
    assert done["status"] == "completed" and h["attempts"] >= 2, done

    async def forgotten() -> bool:
        return (await mesh.client.get(a.url + "/jobs")).json()["total_count"] == 0

    await wait_for(forgotten, what="the finished job forgotten after --job-keep")


async def test_bounds_on_running_and_kept_jobs(mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    """README: at most 256 jobs run at once (429 beyond), and finished ones past
    1,024 are forgotten, oldest first (the bounds made small here)."""
    import meshnode.jobs as jobs_mod

    monkeypatch.setattr(jobs_mod, "ACTIVE_JOBS_MAX", 1)
    monkeypatch.setattr(jobs_mod, "KEPT_JOBS_MAX", 1)
    a = await mesh.start("node1")
    slow = {"name": "slow", "actions": [{"action_id": "h", "action_type": "health_check",
                                         "target_url": "http://127.0.0.1:9/health", "timeout_s": 30}]}
    j = await submit(mesh, a, slow)
    r = await mesh.client.post(a.url + "/jobs", json=slow)
    assert r.status_code == 429 and r.json()["error"]["code"] == "TOO_MANY_JOBS", r.text
    await mesh.client.post(a.url + f"/jobs/{j['job_id']}/cancel")
    await until_ended(mesh, a, j)
    quick = {"name": "quick", "actions": [{"action_id": "h", "action_type": "health_check",
                                           "target_url": a.url + "/health"}]}
    j2 = await submit(mesh, a, quick)
    await until_ended(mesh, a, j2)

    async def one_kept() -> bool:
        listed = (await mesh.client.get(a.url + "/jobs")).json()
        return [x["job_id"] for x in listed["jobs"]] == [j2["job_id"]]

    await wait_for(one_kept, what="the older finished job forgotten")
