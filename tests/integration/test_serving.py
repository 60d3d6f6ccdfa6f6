"""Serving on real daemons with fake GPUs and the test engine
(``tests/engine/fake_engine.py`` through the ``command`` template): started on
the GPU asked for and probed until healthy, shown on every node, restarted
after a crash or a hang, given up after repeated crashes, stopped with
nothing left; bad requests refused before anything starts; a pipeline's
serve and stop_serve; orphans of a killed earlier run stopped."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

import meshnode
import meshnode.daemon
from meshnode.serving import proc_stat
from protocol.serving import LifePolicy
from tests.engine.fake_engine import write_model

from .conftest import Handle, Mesh, all_alive, run_pipeline, wait_for

ROOT = Path(__file__).resolve().parents[2]
ENGINE = str(ROOT / "tests" / "engine" / "fake_engine.py")
GiB = 2**30
COMMAND = [sys.executable, ENGINE, "--model-dir", "{model_dir}", "--port", "{port}", "--host", "{host}",
           "--served-model-name", "{model_name}"]


def engine_config(*extra: str) -> dict[str, Any]:
    return {"engine": "command", "command": COMMAND + list(extra)}


def free_port_range(n: int = 8) -> str:
    """A run of ports free now (tests on one machine must not collide)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        base = s.getsockname()[1]
    base = min(base, 65535 - n)
    return f"{base}-{base + n - 1}"


@pytest.fixture(autouse=True)
def quick_life(monkeypatch: pytest.MonkeyPatch) -> None:
    """Probe, back off and give up on a test's time scale (the defaults are 3 s, 10 s, 5 in 600 s)."""
    monkeypatch.setattr(meshnode.daemon, "LifePolicy", functools.partial(
        LifePolicy, probe_interval_s=0.3, probe_timeout_s=0.5, failure_threshold=3, backoff_initial_s=0.5,
        backoff_max_s=2.0, crash_limit=3, crash_window_s=60.0))


async def start(mesh: Mesh, name: str, *extra: str, join: list[Handle] | None = None) -> Handle:
    return await mesh.start(name, "--fake-gpus", "2x24GiB", "--gpu-interval", "0.2", "--engines", "command",
                            "--service-ports", free_port_range(), "--engine-drain", "2", *extra, join=join)


async def put_model(mesh: Mesh, h: Handle, tmp_path: Path, name: str = "org/e", **reg: Any) -> str:
    src = tmp_path / f"src-{name.replace('/', '-')}"
    src.mkdir()
    digest = write_model(src, size=64 * 1024)
    if reg:
        r = await mesh.client.post(h.url + f"/models/{name}/register", json=reg)
        assert r.status_code in (200, 201), r.text
    r = await mesh.client.post(h.url + f"/models/{name}/download",
                               json={"source_url": src.as_uri(), "target_device": f"{h.node.cfg.node_id}:disk"})
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/transfers/{r.json()['transfer_id']}"
    await wait_for(lambda: h.node.store.get(name, "disk") is not None, what=f"{name} on {h.node.cfg.node_id}")
    return digest


async def known(*hs: Handle, model: str = "org/e") -> None:
    for h in hs:
        await wait_for(lambda h=h: h.node.registry is not None and bool(
            (m := h.node.registry.find(model)) and m.locations), what=f"{model} known to {h.node.cfg.node_id}")


async def services(mesh: Mesh, h: Handle) -> list[dict[str, Any]]:
    return list((await mesh.client.get(h.url + "/services")).json()["services"])


async def state_on(mesh: Mesh, h: Handle, model: str = "org/e") -> str | None:
    s = [x for x in await services(mesh, h) if x["model_name"] == model]
    return s[0]["state"] if s else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_serve_shows_everywhere_and_stop_leaves_nothing(mesh: Mesh, tmp_path: Path) -> None:
    a = await start(mesh, "node1")
    b = await start(mesh, "node2", join=[a])
    await all_alive(mesh, [a, b])
    digest = await put_model(mesh, a, tmp_path)
    await known(b)
    r = await mesh.client.post(b.url + "/models/org/e/services",  # asked through node2, runs on node1
                               json={"device": "node1:gpu1", "config": engine_config()})
    assert r.status_code == 202, r.text
    assert r.json()["state"] == "starting" and r.json()["gpus"] == [1]
    assert r.headers["location"] == "/models/org/e/services"

    async def healthy() -> bool:
        return await state_on(mesh, b) == "healthy"

    await wait_for(healthy, what="the service healthy, seen from node2")
    (svc,) = await services(mesh, b)
    assert svc["node"] == "node1" and svc["device"] == "node1:gpu1" and svc["engine"] == "command"
    assert svc["node_state"] == "alive"
    env = (await mesh.client.get(svc["url"] + "/debug/env")).json()
    assert env["cuda_visible_devices"] == "1" and env["digest"] == digest  # its weights: node1's own copy
    assert env["pgid"] == env["pid"]  # its own process group
    info = (await mesh.client.get(b.url + "/models/org/e")).json()
    assert "node1:gpu1" in info["locations"] and info["services"][0]["state"] == "healthy"
    assert (await mesh.client.get(b.url + "/status")).json()["services"] == {"total": 1, "healthy": 1}
    # /metrics, read with Prometheus's own parser: every state listed, zeros included.
    text = (await mesh.client.get(a.url + "/metrics")).text
    samples = {(x.name, tuple(sorted(x.labels.items()))): x.value
               for fam in text_string_to_metric_families(text) for x in fam.samples}
    assert samples[("meshnode_services", (("state", "healthy"),))] == 1
    assert samples[("meshnode_services", (("state", "error"),))] == 0
    assert samples[("meshnode_members", (("state", "alive"),))] == 2
    assert samples[("meshnode_members", (("state", "dead"),))] == 0
    assert samples[("meshnode_transfers", (("state", "done"),))] >= 1  # the download that put the model here
    # llama-orch's view: a pool per GPU, ready where a healthy engine serves, from any node.
    av = (await mesh.client.get(b.url + "/v2/catalog/availability")).json()
    assert av["nodes"]["node1"]["pools"] == [
        {"pool_id": "pool-gpu0", "gpu": 0, "ready": False, "models": [], "engines": []},
        {"pool_id": "pool-gpu1", "gpu": 1, "ready": True, "models": ["org/e"], "engines": ["command"]}]
    v2 = {n["node_id"]: n for n in (await mesh.client.get(b.url + "/v2/nodes")).json()["nodes"]}
    assert v2["node1"]["pools"] == av["nodes"]["node1"]["pools"] and v2["node1"]["online"] is True
    assert [g["index"] for g in v2["node1"]["capabilities"]["gpus"]] == [0, 1]
    assert not any(p["ready"] for p in v2["node2"]["pools"])
    assert samples[("meshnode_jobs", (("state", "failed"),))] == 0
    assert samples[("meshnode_storage_free_bytes", (("tier", "disk"),))] > 0
    assert ("meshnode_build_info", (("version", meshnode.__version__),)) in samples
    assert samples[("process_open_fds", ())] > 0

    async def vram_shown() -> bool:
        g1 = (await mesh.client.get(b.url + "/nodes")).json()["nodes"][0]["gpus"][1]
        return bool(g1["processes"] and g1["processes"][0][0] == svc["pid"])

    await wait_for(vram_shown, what="the engine's process on node1's gpu1, seen from node2")

    r = await mesh.client.delete(b.url + "/models/org/e/services/node1")
    assert r.status_code == 200, r.text
    assert [s["port"] for s in r.json()["stopped"]] == [svc["port"]]
    assert not alive(svc["pid"])
    assert await services(mesh, a) == []

    async def vram_freed() -> bool:
        g1 = (await mesh.client.get(b.url + "/nodes")).json()["nodes"][0]["gpus"][1]
        return bool(g1["processes"] == [] and g1["free_bytes"] == g1["total_bytes"])

    await wait_for(vram_freed, what="gpu1's memory free again, seen from node2")
    with socket.socket() as s:  # its port is free again (for a server: closed connections may linger)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", svc["port"]))
        s.listen()
    r = await mesh.client.delete(b.url + "/models/org/e/services/node1")
    assert r.status_code == 404 and r.json()["error"]["code"] == "SERVICE_NOT_FOUND"


async def test_lazy_pull_then_crash_hang_restart_and_give_up(mesh: Mesh, tmp_path: Path) -> None:
    a = await start(mesh, "node1")
    b = await start(mesh, "node2", join=[a])
    await all_alive(mesh, [a, b])
    digest = await put_model(mesh, a, tmp_path)
    await known(b)
    assert b.node.store.get("org/e", "disk") is None
    r = await mesh.client.post(a.url + "/models/org/e/services", json={"device": "node2:gpu0", "config": engine_config()})
    assert r.status_code == 202, r.text
    assert b.node.store.get("org/e", "disk") is not None  # pulled from node1 first

    async def healthy() -> bool:
        return await state_on(mesh, a) == "healthy"

    await wait_for(healthy, what="healthy on node2")
    (svc,) = await services(mesh, a)
    assert (await mesh.client.get(svc["url"] + "/debug/env")).json()["digest"] == digest

    # Killed: restarted after its backoff, healthy again with a new pid.
    os.kill(svc["pid"], signal.SIGKILL)

    async def restarted() -> bool:
        s = (await services(mesh, a))[0]
        return bool(s["state"] == "healthy" and s["pid"] != svc["pid"] and s["restarts"] == 1)

    await wait_for(restarted, what="restarted after a kill")
    # Hung (SIGSTOP): its probes time out, it is killed and restarted.
    pid2 = (await services(mesh, a))[0]["pid"]
    os.kill(pid2, signal.SIGSTOP)

    async def unstuck() -> bool:
        s = (await services(mesh, a))[0]
        return bool(s["state"] == "healthy" and s["pid"] not in (svc["pid"], pid2))

    await wait_for(unstuck, timeout_s=30, what="a hung engine replaced")
    assert not alive(pid2)
    # A third crash within the window: error, and it stays down, its log tail kept.
    os.kill((await services(mesh, a))[0]["pid"], signal.SIGKILL)

    async def given_up() -> bool:
        return await state_on(mesh, a) == "error"

    await wait_for(given_up, what="given up after 3 crashes")
    s = (await services(mesh, a))[0]
    assert "exited" in s["error"] and "fake-engine: ready" in s["log_tail"]
    await trio.sleep(1.0)
    assert (await services(mesh, a))[0]["state"] == "error"  # no restart
    r = await mesh.client.delete(a.url + "/models/org/e/services/node2")
    assert r.status_code == 200 and await services(mesh, b) == []

    async def gone() -> bool:
        return await services(mesh, a) == []

    await wait_for(gone, what="the stopped service gone from node1's view")


async def test_bad_requests_start_nothing(mesh: Mesh, tmp_path: Path) -> None:
    a = await start(mesh, "node1")
    await put_model(mesh, a, tmp_path, model_type="llm", metadata={"requirements": {"min_vram": 30 * GiB}})
    lo, hi = a.node.cfg.service_ports

    async def serve(body: dict[str, Any], model: str = "org/e") -> tuple[int, str]:
        r = await mesh.client.post(a.url + f"/models/{model}/services", json=body)
        return r.status_code, r.json()["error"]["code"] if r.status_code >= 400 else ""

    assert await serve({"device": "node1:gpu0", "config": engine_config()}) == (409, "NO_CAPACITY")  # 30 > 24 GiB
    assert await serve({"devices": ["node1:gpu0", "node1:gpu1"], "config": engine_config()}) == (202, "")  # 15 + 15
    # The same again: the service it is already (idempotent), no second engine.
    assert await serve({"devices": ["node1:gpu1", "node1:gpu0"], "config": engine_config()}) == (202, "")
    await put_model(mesh, a, tmp_path, "org/f")
    assert await serve({"device": "node1:gpu0", "engine": "tensorrt"}, "org/f") == (400, "UNKNOWN_ENGINE")
    assert await serve({"device": "node1:gpu0", "engine": "vllm"}, "org/f") == (403, "ENGINE_NOT_ALLOWED")
    assert await serve({"device": "node1:gpu0", "port": 80, "config": engine_config()}, "org/f") == \
        (400, "PORT_OUT_OF_RANGE")
    with socket.socket() as held:
        held.bind(("127.0.0.1", hi))
        held.listen()
        assert await serve({"device": "node1:gpu0", "port": hi, "config": engine_config()}, "org/f") == \
            (409, "PORT_IN_USE")
    assert await serve({"device": "node1:gpu0", "config": {"engine": "command", "command": ["no-such-engine"]}},
                       "org/f") == (424, "ENGINE_NOT_FOUND")
    assert await serve({"device": "node1:disk", "config": engine_config()}, "org/f") == (400, "INVALID_DEVICE")
    assert await serve({"device": "node1:gpu0", "config": {"shell": "x"}}, "org/f") == (400, "INVALID_CONFIG")
    assert lo <= hi
    # Only org/e runs (one service on two GPUs); the refused ones left nothing.
    (only,) = await services(mesh, a)
    assert only["model_name"] == "org/e" and only["gpus"] == [0, 1]
    # An engine that fails at start: the error and its log, nothing left running.
    assert await serve({"device": "node1:gpu0", "config": engine_config("--fail-start")}, "org/f") == (202, "")

    async def failed() -> bool:
        return await state_on(mesh, a, "org/f") == "error"

    await wait_for(failed, what="org/f's engine given up")
    f = next(s for s in await services(mesh, a) if s["model_name"] == "org/f")
    assert "told to fail" in f["log_tail"] and not alive(f["pid"])


async def test_a_pipeline_serves_checks_and_stops(mesh: Mesh, tmp_path: Path) -> None:
    """The engine comes from the registration's metadata; the step passes its command only.
    One health check names the URL, the other the model (its service's health)."""
    a = await start(mesh, "node1")
    await put_model(mesh, a, tmp_path, model_type="llm", metadata={"engine": "command"})
    port = a.node.cfg.service_ports[0]
    doc = {"name": "serve-it", "actions": [
        {"action_id": "serve", "action_type": "serve", "model_name": "org/e", "port": port,
         "devices": ["node1:gpu0"], "config": {"command": COMMAND}},
        {"action_id": "check", "action_type": "health_check", "target_url": f"http://127.0.0.1:{port}/health",
         "dependencies": ["serve"]},
        {"action_id": "check_model", "action_type": "health_check", "model_name": "org/e", "dependencies": ["serve"]},
        {"action_id": "stop", "action_type": "stop_serve", "model_name": "org/e", "devices": ["node1:gpu0"],
         "dependencies": ["check", "check_model"]},
    ]}
    job = await run_pipeline(mesh, a, doc, timeout_s=40)
    assert job["status"] == "completed", json.dumps(job, indent=1)[:2000]
    notes = {x["action_id"]: x["parts"][0]["note"] for x in job["actions"]}
    assert f"healthy on port {port}" in notes["serve"] and notes["stop"] == f"stopped port {port}"
    assert await services(mesh, a) == []


async def test_a_restarted_node_stops_the_engines_its_earlier_run_left(mesh: Mesh, tmp_path: Path) -> None:
    """kill -9 of a node leaves its engines running; the next start finds them by their pid files."""
    model = tmp_path / "orphan-model"
    model.mkdir()
    write_model(model)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, ENGINE, "--model-dir", str(model), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        run_dir = tmp_path / "node1" / "services"
        run_dir.mkdir(parents=True)
        (run_dir / "org--e_node1_8100.json").write_text(json.dumps(
            {"pid": proc.pid, "pgid": proc.pid, "port": port, "model": "org/e",
             "start_ticks": proc_stat(proc.pid)[1]}))  # type: ignore[index]
        a = await start(mesh, "node1")
        assert proc.wait(timeout=15) is not None  # stopped by the node at start
        assert not list(run_dir.glob("*.json"))
        assert a.node.services is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_the_cli_serves_lists_and_stops(mesh: Mesh, tmp_path: Path) -> None:
    a = await start(mesh, "node1")
    await put_model(mesh, a, tmp_path)
    exe = str(Path(sys.executable).parent / "meshnode")
    command = " ".join(COMMAND)

    async def cli(*argv: str) -> subprocess.CompletedProcess[bytes]:
        return await trio.run_process([exe, "--peer", a.url, *argv], capture_stdout=True, capture_stderr=True,
                                      check=False, env={**os.environ, "COLUMNS": "200"})

    r = await cli("serve", "org/e", "--on", "node1:gpu1", "--engine", "command", "--command", command, "--wait")
    assert r.returncode == 0, r.stderr.decode()
    assert "org/e on node1:gpu1" in r.stdout.decode() and "healthy" in r.stdout.decode()
    r = await cli("ps")
    assert r.returncode == 0 and "healthy" in r.stdout.decode() and "node1:gpu1" in r.stdout.decode()
    assert a.node.keeper is not None
    why = a.node.keeper.keep_reason("org/e", "disk")  # what the evictor asks before it takes a copy
    assert why is not None and "an engine serves from it" in why, why
    r = await cli("stop-serve", "org/e", "--on", "node1")
    assert r.returncode == 0 and "stopped org/e on node1:gpu1" in r.stdout.decode(), r.stderr.decode()
    r = await cli("stop-serve", "org/e", "--on", "node1")
    assert r.returncode == 1 and "serves no 'org/e'" in r.stderr.decode(), r.stderr.decode()
    r = await cli("serve", "org/e", "--on", "node1:gpu0", "--engine", "command", "--command",
                  command + " --fail-start", "--wait")
    assert r.returncode == 1 and "told to fail" in r.stderr.decode(), r.stderr.decode()


async def test_any_node_answers_inference_for_the_mesh(mesh: Mesh, tmp_path: Path) -> None:
    a = await start(mesh, "node1")
    b = await start(mesh, "node2", join=[a])
    await all_alive(mesh, [a, b])
    digest = await put_model(mesh, a, tmp_path)
    await known(b)
    r = await mesh.client.post(b.url + "/v1/chat/completions", json={"model": "org/e", "messages": []})
    assert r.status_code == 503 and r.json()["error"]["code"] == "NO_HEALTHY_SERVICE"  # registered, not served
    r = await mesh.client.post(b.url + "/v1/completions", json={"model": "org/nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "MODEL_NOT_FOUND"
    r = await mesh.client.post(b.url + "/v1/completions", content=b"{not json")
    assert r.status_code == 400
    r = await mesh.client.post(a.url + "/models/org/e/services", json={"device": "node1:gpu0", "config": engine_config()})
    assert r.status_code == 202, r.text

    async def listed() -> bool:
        return (await mesh.client.get(b.url + "/v1/models")).json()["data"] == [
            {"id": "org/e", "object": "model", "owned_by": "meshnode"}]

    await wait_for(listed, what="org/e in node2's /v1/models")
    tok = f"-{digest[:4]}"
    r = await mesh.client.post(b.url + "/v1/chat/completions",
                               json={"model": "org/e", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == f"t0{tok} t1{tok} t2{tok}"
    assert r.headers["x-mesh-service"].startswith("node1:")
    chunks = []
    async with mesh.client.stream("POST", b.url + "/v1/completions",
                                  json={"model": "org/e", "prompt": "hi", "max_tokens": 4, "stream": True}) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        async for line in s.aiter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]" and [json.loads(c)["choices"][0]["text"] for c in chunks[:-1]] == [
        f"t{i}{tok} " for i in range(4)]
    r = await mesh.client.post(b.url + "/v1/embeddings", json={"model": "org/e", "input": ["a", "b"]})
    assert r.status_code == 200 and len(r.json()["data"]) == 2
    assert b.node.proxy is not None and b.node.proxy.inflight == {}  # every forwarded request accounted for
    r = await mesh.client.delete(a.url + "/models/org/e/services/node1")
    assert r.status_code == 200

    async def unserved() -> bool:
        r = await mesh.client.post(b.url + "/v1/completions", json={"model": "org/e", "prompt": "x"})
        return r.status_code == 503

    await wait_for(unserved, what="503 once the only service stopped")


async def test_a_completion_probe_catches_an_engine_that_cannot_generate(mesh: Mesh, tmp_path: Path) -> None:
    """/health answers but completions hang: only the optional one-token probe sees it."""
    a = await start(mesh, "node1")
    await put_model(mesh, a, tmp_path)
    for gpu, probe in ((0, False), (1, True)):
        r = await mesh.client.post(a.url + "/models/org/e/services", json={
            "device": f"node1:gpu{gpu}", "config": {**engine_config(), "completion_probe": probe}})
        assert r.status_code == 202, r.text

    async def both_healthy() -> bool:
        s = await services(mesh, a)
        return len(s) == 2 and all(x["state"] == "healthy" for x in s)

    await wait_for(both_healthy, what="both services healthy")
    first = {x["gpus"][0]: x for x in await services(mesh, a)}
    for x in first.values():
        r = await mesh.client.post(x["url"] + "/control/slow", json={"seconds": 30})
        assert r.status_code == 200

    async def probed_one_replaced() -> bool:
        now = {x["gpus"][0]: x for x in await services(mesh, a)}
        return now[1]["pid"] != first[1]["pid"] and now[1]["state"] == "healthy"

    await wait_for(probed_one_replaced, what="the engine with a completion probe replaced")
    now = {x["gpus"][0]: x for x in await services(mesh, a)}
    assert now[0]["pid"] == first[0]["pid"] and now[0]["state"] == "healthy"  # /health alone cannot tell
    assert "completion" in (now[1]["error"] or "") or now[1]["restarts"] == 1


async def test_a_node_that_stops_stops_its_engines(mesh: Mesh, tmp_path: Path) -> None:
    a = await start(mesh, "node1")
    await put_model(mesh, a, tmp_path)
    r = await mesh.client.post(a.url + "/models/org/e/services", json={"device": "node1:gpu0", "config": engine_config()})
    assert r.status_code == 202

    async def healthy() -> bool:
        return await state_on(mesh, a) == "healthy"

    await wait_for(healthy, what="healthy")
    (svc,) = await services(mesh, a)
    await a.stop()
    assert not alive(svc["pid"])
    assert not list((a.node.cfg.data_dir / "services").glob("*.json"))  # nothing for a restart to find


async def test_a_serve_step_that_times_out_leaves_nothing_running(mesh: Mesh, tmp_path: Path) -> None:
    a = await start(mesh, "node1")
    await put_model(mesh, a, tmp_path)
    job = await run_pipeline(mesh, a, {"name": "too-slow", "actions": [
        {"action_id": "serve", "action_type": "serve", "model_name": "org/e", "devices": ["node1:gpu0"],
         "timeout_s": 1.5, "config": engine_config("--startup-delay", "60")}]})
    step = job["actions"][0]
    assert job["status"] == "failed" and step["error"]["code"] == "TIMEOUT", job
    assert await services(mesh, a) == []
    assert not list((a.node.cfg.data_dir / "services").glob("*.json"))


def test_an_engine_log_is_kept_under_its_bound(tmp_path: Path) -> None:
    from meshnode import serving

    log = tmp_path / "engine.log"
    log.write_bytes(b"x" * (serving.LOG_MAX + 10) + b"the last line\n")
    serving._bound_log(log)
    data = log.read_bytes()
    assert len(data) < serving.LOG_KEEP + 200 and data.endswith(b"the last line\n")
    assert data.startswith(b"[earlier lines dropped")


async def test_an_engine_without_a_health_route_is_ready_once_it_lists_the_model(mesh: Mesh, tmp_path: Path) -> None:
    """llama-cpp-python's server answers 404 on /health: its /v1/models tells
    instead, unless the serve names a health path of its own."""
    a = await start(mesh, "node1")
    await put_model(mesh, a, tmp_path)
    odd = [sys.executable, str(ROOT / "tests" / "engine" / "odd_engine.py"), "--port", "{port}", "--host", "{host}",
           "--served-model-name", "{model_name}", "--no-health"]
    r = await mesh.client.post(a.url + "/models/org/e/services",
                               json={"device": "node1:gpu0", "config": {"engine": "command", "command": odd}})
    assert r.status_code == 202, r.text
    await wait_for(lambda: state_on(mesh, a), what="listed")

    async def healthy() -> bool:
        return await state_on(mesh, a) == "healthy"

    await wait_for(healthy, what="ready by its model list")
    r = await mesh.client.delete(a.url + "/models/org/e/services/node1")
    assert r.status_code == 200, r.text
    # A health path the caller names is taken at its word: its 404 is a failure.
    r = await mesh.client.post(a.url + "/models/org/e/services", json={
        "device": "node1:gpu0", "config": {"engine": "command", "command": odd, "health_path": "/health",
                                          "startup_timeout_s": 2}})
    assert r.status_code == 202, r.text

    async def failed() -> bool:
        return await state_on(mesh, a) == "error"

    await wait_for(failed, what="given up: /health answered 404")


async def test_info_renders_the_apis_own_answer_for_services(mesh: Mesh, tmp_path: Path) -> None:
    """``meshnode info`` reads what ``GET /models/{name}`` really sends: node,
    device, port, engine and state of each service."""
    import argparse

    from rich.console import Console

    from meshnode.cli.render import render_info

    a = await start(mesh, "node1")
    await put_model(mesh, a, tmp_path)
    r = await mesh.client.post(a.url + "/models/org/e/services", json={"device": "node1:gpu1",
                                                                        "config": engine_config()})
    assert r.status_code == 202, r.text
    port = r.json()["port"]

    async def healthy() -> bool:
        return await state_on(mesh, a) == "healthy"

    await wait_for(healthy, what="healthy")
    answer = (await mesh.client.get(a.url + "/models/org/e")).json()
    console = Console(record=True, width=200)
    render_info(console, answer, argparse.Namespace(json=False, name="org/e"))
    text = console.export_text()
    row = next(line for line in text.splitlines() if "node1:gpu1" in line and "healthy" in line)
    assert "node1" in row.split() and str(port) in row.split() and "command" in row.split()


async def test_serve_wait_asked_of_another_node_follows_it_to_healthy(mesh: Mesh, tmp_path: Path) -> None:
    """Asked of node2, the service runs on node1: node2 not having heard of it
    yet is "not yet", not "stopped"; --json prints the record as JSON.  node2
    gossips slowly, so that it surely has not heard of the service at first."""
    a = await start(mesh, "node1")
    b = await start(mesh, "node2", "--gossip-interval", "1.5", join=[a])
    await all_alive(mesh, [a, b])
    await put_model(mesh, a, tmp_path)
    await known(b)
    exe = str(Path(sys.executable).parent / "meshnode")
    r = await trio.run_process([exe, "--peer", b.url, "serve", "org/e", "--on", "node1:gpu0", "--engine", "command",
                                "--command", " ".join(COMMAND), "--wait", "--json"], capture_stdout=True, capture_stderr=True, check=False,
                               env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr.decode()
    out = json.loads(r.stdout.decode())
    assert out["state"] == "healthy" and out["node"] == "node1" and out["device"] == "node1:gpu0", out
    assert "stopped" not in r.stderr.decode()
