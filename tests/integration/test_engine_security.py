"""An API token chooses which model runs where, never what code runs (issue:
security).  A fake engine binary records the argv and environment it was
started with; every payload an attacker used is refused 403
``ENGINE_CONFIG_NOT_ALLOWED`` on the API and in a pipeline step (on another
node too), and no process starts; what an allowed request starts holds only
what the allow lists hold, and none of the node's secrets.  Engines listen on
loopback only; a node killed with -9 stops its ``#!``-script engines at its
next start."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.engine.fake_engine import write_model
from tests.unit.test_protocol_engines import ATTACKS

from .conftest import Handle, Mesh, all_alive, run_pipeline, wait_for
from .test_process import NO_HUB, Proc, wait
from .test_serving import free_port_range, put_model

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ROOT / "tests" / "engine" / "fake_engine.py"
SECRETS = {"HF_TOKEN": "hf_secret_value", "AWS_SECRET_ACCESS_KEY": "aws-secret-value",
           "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "MESHNODE_API_TOKENS": "node-token-value",
           "MESHNODE_CLUSTER_SECRET": "cluster-secret-value", "LD_PRELOAD": "", "PYTHONPATH": "/nowhere"}


def recorder(tmp_path: Path) -> tuple[Path, Path]:
    """An engine binary that writes its argv and environ to ``calls/`` and exits."""
    calls = tmp_path / "calls"
    calls.mkdir()
    exe = tmp_path / "recorder"
    exe.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                   f"open(os.path.join({str(calls)!r}, str(os.getpid()) + '.json'), 'w').write("
                   "json.dumps({'argv': sys.argv, 'env': dict(os.environ)}))\nsys.exit(3)\n")
    exe.chmod(0o755)
    return exe, calls


async def start(mesh: Mesh, name: str, exe: Path, join: list[Handle] | None = None) -> Handle:
    binaries = ",".join(f"{e}={exe}" for e in ("vllm", "sglang", "tgi"))
    return await mesh.start(name, "--fake-gpus", "2x24GiB", "--gpu-interval", "0.2", "--engines",
                            "vllm,sglang,tgi", "--engine-binaries", binaries, "--service-ports", free_port_range(),
                            "--engine-drain", "2", join=join)


async def test_no_payload_reaches_a_process_and_an_allowed_one_gets_a_clean_environment(
        mesh: Mesh, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in SECRETS.items():  # the node process's own environment
        monkeypatch.setenv(k, v)
    exe, calls = recorder(tmp_path)
    a = await start(mesh, "node1", exe)
    b = await start(mesh, "node2", exe, join=[a])
    await all_alive(mesh, [a, b])
    await put_model(mesh, b, tmp_path)
    for engine in ("sglang", "vllm"):
        for config in ATTACKS:
            r = await mesh.client.post(b.url + "/models/org/e/services",
                                       json={"device": "node2:gpu0", "engine": engine, "config": config})
            assert r.status_code == 403, (config, r.text)
            assert r.json()["error"]["code"] == "ENGINE_CONFIG_NOT_ALLOWED"
    # A pipeline submitted to node1 whose step runs on node2.
    for config in (ATTACKS[0], {"args": ["--trust-remote-code"]}):
        job = await run_pipeline(mesh, a, {"name": "evil", "actions": [
            {"action_id": "s", "action_type": "serve", "model_name": "org/e", "devices": ["node2:gpu0"],
             "config": {"engine": "sglang", **config}}]})
        assert job["status"] == "failed", json.dumps(job)[:1000]
        assert "ENGINE_CONFIG_NOT_ALLOWED" in json.dumps(job), json.dumps(job)[:1000]
    assert list(calls.iterdir()) == []  # no process ever started
    # Allowed: tuning flags and variables only; the environment is built, not inherited.
    r = await mesh.client.post(b.url + "/models/org/e/services", json={
        "device": "node2:gpu1", "engine": "vllm",
        "config": {"env": {"OMP_NUM_THREADS": "2"}, "flags": {"max-model-len": 4096}}})
    assert r.status_code == 202, r.text
    await wait_for(lambda: list(calls.iterdir()), what="the engine started")
    call = json.loads(next(calls.iterdir()).read_text())
    argv, env = call["argv"], call["env"]
    assert argv[argv.index("--host") + 1] == "127.0.0.1"  # loopback only
    assert argv[-2:] == ["--max-model-len", "4096"]
    assert env["OMP_NUM_THREADS"] == "2" and env["CUDA_VISIBLE_DEVICES"] == "1"
    for k, v in SECRETS.items():
        assert k not in env
        assert not v or not any(v in x for x in env.values())
    assert set(env) <= {"PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER", "LOGNAME",
                        "LD_LIBRARY_PATH", "CUDA_HOME", "HF_HOME", "HF_HUB_OFFLINE", "NVIDIA_DRIVER_CAPABILITIES",
                        "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES"}


def test_a_node_killed_with_9_stops_its_script_engines_at_its_next_start(tmp_path: Path) -> None:
    """vLLM's console script is a ``#!`` file: its process shows the interpreter
    as ``cmdline[0]``.  The node knows its engine by process group and start time."""
    script = tmp_path / "engine-script"
    script.write_text(f"#!{sys.executable}\nimport runpy, sys\nsys.argv[0] = {str(ENGINE)!r}\n"
                      f"runpy.run_path({str(ENGINE)!r}, run_name='__main__')\n")
    script.chmod(0o755)
    models = tmp_path / "models"
    models.mkdir()
    write_model(models)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    extra = ("--fake-gpus", "1x24GiB", "--engines", "command", "--service-ports", f"{port}-{port}",
             "--engine-drain", "2")
    a = Proc("k1", tmp_path, None, extra, env=NO_HUB).start()
    pid = None
    try:
        r = httpx.post(a.url + "/models/org/k/download", timeout=10,
                       json={"source_url": models.as_uri(), "target_device": "k1:disk"})
        assert r.status_code == 202, r.text
        wait(lambda: httpx.get(a.url + "/models/org/k", timeout=5).json().get("locations") == ["k1:disk"],
             what="the copy")
        r = httpx.post(a.url + "/models/org/k/services", timeout=10, json={"device": "k1:gpu0", "config": {
            "engine": "command", "command": [str(script), "--model-dir", "{model_dir}", "--port", "{port}",
                                             "--host", "{host}", "--served-model-name", "{model_name}"]}})
        assert r.status_code == 202, r.text
        wait(lambda: httpx.get(a.url + "/services", timeout=5).json()["services"][0]["state"] == "healthy",
             what="the engine healthy")
        pid = httpx.get(a.url + "/services", timeout=5).json()["services"][0]["pid"]
        assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == sys.executable.encode()
        a.kill()
        time.sleep(0.3)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200  # it outlived the node
        a.start()
        wait(lambda: not Path(f"/proc/{pid}").exists() or b"Z" in Path(f"/proc/{pid}/stat").read_bytes().split()[2:3],
             what="the orphan engine stopped")
        wait(lambda: not list((tmp_path / "k1" / "services").glob("*.json")), what="its record removed")
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        if a.p is not None and a.p.poll() is None:
            a.p.send_signal(signal.SIGKILL)
            a.p.wait()
        if pid is not None:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
