"""What a node logs: with ``--log-format json`` every line is one JSON object;
at INFO, what an operator needs to know (seeds, members, models, transfers,
jobs); and never a secret it was given."""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from .conftest import Mesh, all_alive, run_pipeline, wait_for
from .fakehub import FakeHub
from .test_ingest import REPO, download, finished
from .test_ingest import hub as hub  # the fake hub fixture
from .test_process import free_port

EXE = str(Path(sys.executable).parent / "meshnode")
TOKEN = "tok-" + "Zq8" * 16
SECRET = "sec-" + "Wv3" * 16


def test_a_node_logs_json_lines_and_no_secret(tmp_path: Path) -> None:
    p = subprocess.Popen([EXE, "start", "--node-id", "j1", "--port", "0", "--data-dir", str(tmp_path / "d"),
                          "--dram-dir", str(tmp_path / "shm"), "--api-tokens", TOKEN, "--cluster-secret", SECRET,
                          "--log-format", "json"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert p.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "listening on" in line:
                break
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=20)
        lines += out.splitlines()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    records = [json.loads(x) for x in lines if x.strip()]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any("listening on" in r["message"] for r in records)
    assert any("stopped" in r["message"] for r in records)
    text = "".join(lines)
    assert TOKEN not in text and SECRET not in text


HF_TOKEN = "hf_" + "Kp5" * 12


async def test_info_lines_tell_an_operator_what_happened(mesh: Mesh, hub: FakeHub, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """At INFO, and never with a token, a secret or the hub token: a join
    seed answering or not, members joining, a model registered and
    unregistered, a transfer's start and its end with size and rate, a job's
    steps and its end."""
    caplog.set_level(logging.INFO)
    hub.token = HF_TOKEN
    (tmp_path / "hf-token").write_text(HF_TOKEN)
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "hf-token"))
    dead = f"127.0.0.1:{free_port()}"
    a = await mesh.start("a", "--api-tokens", TOKEN, "--cluster-secret", SECRET)
    auth = {"authorization": f"Bearer {TOKEN}"}
    mesh.client.headers.update(auth)
    b = await mesh.start("b", "--api-tokens", TOKEN, "--cluster-secret", SECRET, "--join", f"{a.address},{dead}")
    with trio.fail_after(10):
        await b.node.ready.wait()
    await all_alive(mesh, [a, b])
    t = await finished(mesh, a, await download(mesh, a, REPO, {}))
    assert t["status"] == "done", t

    async def b_knows_it() -> bool:
        return (await mesh.client.get(b.url + f"/models/{REPO}")).status_code == 200

    await wait_for(b_knows_it, what="the registration on b")
    job = await run_pipeline(mesh, b, {"name": "stage", "actions": [
        {"action_id": "to_b", "action_type": "copy", "model_name": REPO, "devices": ["a:disk", "b:disk"]},
        {"action_id": "check", "action_type": "health_check", "target_url": f"{a.url}/health",
         "dependencies": ["to_b"]}]})
    assert job["status"] == "completed", job

    async def a_knows_bs_copy() -> bool:  # the purge names the copies its node has heard of
        r = await mesh.client.get(a.url + f"/models/{REPO}")
        return "b:disk" in r.json().get("locations", [])

    await wait_for(a_knows_bs_copy, what="b's copy known to a")
    r = await mesh.client.delete(a.url + f"/models/{REPO}", params={"purge": "true"})
    assert r.status_code == 200, r.text

    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    text = "\n".join(lines)

    def has(pattern: str) -> None:
        assert any(re.search(pattern, ln) for ln in lines), f"no line matches {pattern!r}:\n{text[-4000:]}"

    has(rf"join seed {re.escape(a.address)} answered")
    has(rf"join seed {re.escape(dead)} unreachable \(ConnectError")
    has(r"member b joined")
    has(rf"model {REPO} registered \(type 'llama'\)")
    has(rf"transfer \w+ started: {REPO} to a:disk from hf://{REPO}")
    has(rf"transfer \w+ done: {REPO} on a:disk, [\d.]+ MB in [\d.]+ s \([\d.]+ MB/s")
    has(rf"transfer \w+ done: {REPO} on b:disk, .* from a\)")
    has(r"job \w+: to_b \(copy\) part 0 started here")
    has(r"job \w+ \('stage'\) completed in [\d.]+ s: to_b completed, check completed")
    has(rf"model {REPO} unregistered and purged \(copies to delete: a:disk, b:disk\)")
    everything = text + "\n".join(str(r.args) for r in caplog.records)
    for secret in (TOKEN, SECRET, HF_TOKEN):
        assert secret not in everything
