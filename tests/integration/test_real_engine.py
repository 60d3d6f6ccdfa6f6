"""A real engine once: llama.cpp's server (through llama-cpp-python) serving a
tiny random-weight GGUF model built by the test, started and stopped by
pipelines, answering a completion through another node's proxy."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from tests.engine.tiny_gguf import write_tiny_gguf
from tests.needs import unavailable

from .conftest import Mesh, all_alive, run_pipeline, wait_for

pytestmark = pytest.mark.slow

LLAMA_SERVER = [sys.executable, "-m", "llama_cpp.server", "--model", "{model_dir}/tiny.gguf", "--host", "{host}",
                "--port", "{port}", "--model_alias", "{model_name}", "--n_ctx", "128"]


async def test_llama_cpp_serves_a_tiny_gguf_through_a_pipeline_and_any_node(mesh: Mesh, tmp_path: Path) -> None:
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("gguf") is None:
        unavailable("llama-cpp-python and gguf are not installed (pip install -e '.[test,real-engine]')")
    src = tmp_path / "tiny"
    src.mkdir()
    write_tiny_gguf(src / "tiny.gguf")
    a = await mesh.start("node1", "--fake-gpus", "1x24GiB", "--engines", "command", "--engine-startup", "120")
    b = await mesh.start("node2", join=[a])
    await all_alive(mesh, [a, b])
    r = await mesh.client.post(a.url + "/models/org/tiny/download",
                               json={"source_url": src.as_uri(), "target_device": "node1:disk"})
    assert r.status_code == 202, r.text
    await wait_for(lambda: a.node.store.get("org/tiny", "disk") is not None, what="the GGUF on node1")
    job = await run_pipeline(mesh, a, {"name": "serve-tiny", "actions": [
        {"action_id": "serve", "action_type": "serve", "model_name": "org/tiny", "devices": ["node1:gpu0"],
         "config": {"engine": "command", "command": LLAMA_SERVER, "health_path": "/v1/models"}},
        {"action_id": "check", "action_type": "health_check", "model_name": "org/tiny", "dependencies": ["serve"]},
    ]}, timeout_s=150)
    assert job["status"] == "completed", json.dumps(job, indent=1)[:3000]

    async def served_seen() -> bool:
        return bool((await mesh.client.get(b.url + "/v1/models")).json()["data"])

    await wait_for(served_seen, what="org/tiny in node2's /v1/models")
    r = await mesh.client.post(b.url + "/v1/completions", json={"model": "org/tiny", "prompt": "hello", "max_tokens": 4},
                               timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "org/tiny" and body["usage"]["completion_tokens"] == 4
    assert r.headers["x-mesh-service"].startswith("node1:")
    (svc,) = (await mesh.client.get(b.url + "/services")).json()["services"]
    job = await run_pipeline(mesh, b, {"name": "stop-tiny", "actions": [
        {"action_id": "stop", "action_type": "stop_serve", "model_name": "org/tiny", "devices": ["node1:gpu0"]}]})
    assert job["status"] == "completed", job
    with pytest.raises(ProcessLookupError):
        os.kill(svc["pid"], 0)
