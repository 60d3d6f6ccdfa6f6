"""The fake inference engine (tests/engine/fake_engine.py) does what tests of serving rely on."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx

from tests.engine.fake_engine import write_model

ENGINE = pathlib.Path(__file__).resolve().parents[1] / "engine" / "fake_engine.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Engine:
    def __init__(self, proc: subprocess.Popen[str], port: int) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.stdout = ""
        self.stderr = ""

    def finish(self, timeout: float = 5.0) -> int:
        """Wait for the process to exit; keep its output."""
        out, err = self.proc.communicate(timeout=timeout)
        self.stdout += out
        self.stderr += err
        return self.proc.returncode


@contextlib.contextmanager
def engine(model_dir: pathlib.Path, *flags: str, env: dict[str, str] | None = None) -> Iterator[Engine]:
    port = free_port()
    cmd = [sys.executable, str(ENGINE), "--model-dir", str(model_dir), "--port", str(port), *flags]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    e = Engine(proc, port)
    try:
        yield e
    finally:
        if proc.poll() is None:
            proc.kill()
        e.finish()


def wait_healthy(client: httpx.Client, e: Engine, bound: float = 10.0) -> list[int]:
    """Poll /health until 200; return the statuses seen."""
    seen: list[int] = []
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        assert e.proc.poll() is None, "engine exited before it was healthy"
        try:
            r = client.get(e.url + "/health")
        except httpx.TransportError:
            time.sleep(0.02)
            continue
        seen.append(r.status_code)
        if r.status_code == 200:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"engine not healthy within {bound} s; saw {seen}")


def sse(client: httpx.Client, url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """POST with stream=True and collect the SSE events up to [DONE]."""
    events: list[dict[str, Any]] = []
    with client.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        done = False
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                done = True
                break
            events.append(json.loads(data))
        assert done, "stream ended without [DONE]"
    return events


def test_serves_the_openai_api(tmp_path: pathlib.Path) -> None:
    digest = write_model(tmp_path / "tiny")
    with (
        engine(tmp_path / "tiny", "--stream-delay", "0", "--tensor-parallel-size", "2",
               env={"CUDA_VISIBLE_DEVICES": "3,5"}) as e,
        httpx.Client(timeout=5) as c,
    ):
        wait_healthy(c, e)
        toks = [f"t{i}-{digest[:4]}" for i in range(8)]

        r = c.get(e.url + "/v1/models")
        assert r.json()["data"] == [{"id": "tiny", "object": "model", "owned_by": "fake-engine"}]

        r = c.post(e.url + "/v1/completions", json={"model": "tiny", "prompt": "a b c", "max_tokens": 3})
        j = r.json()
        assert r.status_code == 200 and j["object"] == "text_completion" and j["id"].startswith("cmpl-")
        assert j["choices"][0]["text"] == " ".join(toks[:3])
        assert j["choices"][0]["finish_reason"] == "length"
        assert j["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}

        events = sse(c, e.url + "/v1/completions", {"prompt": ["x"], "stream": True})
        assert "".join(ev["choices"][0]["text"] for ev in events) == "".join(t + " " for t in toks)

        chat = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 2}
        r = c.post(e.url + "/v1/chat/completions", json=chat)
        j = r.json()
        assert j["object"] == "chat.completion" and j["model"] == "tiny"
        assert j["choices"][0]["message"] == {"role": "assistant", "content": " ".join(toks[:2])}
        events = sse(c, e.url + "/v1/chat/completions", chat | {"stream": True})
        assert [ev["object"] for ev in events] == ["chat.completion.chunk"] * 2
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert "".join(ev["choices"][0]["delta"]["content"] for ev in events) == f"{toks[0]} {toks[1]} "

        r = c.post(e.url + "/v1/embeddings", json={"input": ["one", "two words"]})
        j = r.json()
        assert [d["index"] for d in j["data"]] == [0, 1]
        assert all(len(d["embedding"]) == 8 for d in j["data"])
        assert j["data"][0]["embedding"] != j["data"][1]["embedding"]
        again = c.post(e.url + "/v1/embeddings", json={"input": "one"}).json()
        assert again["data"][0]["embedding"] == j["data"][0]["embedding"]
        assert j["usage"] == {"prompt_tokens": 3, "total_tokens": 3}

        r = c.post(e.url + "/v1/completions", json={"model": "other", "prompt": "x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = c.post(e.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        assert c.get(e.url + "/nowhere").status_code == 404
        assert c.post(e.url + "/v1/embeddings", content=b"x" * ((1 << 20) + 1)).status_code == 413

        env = c.get(e.url + "/debug/env").json()
        assert env["cuda_visible_devices"] == "3,5" and env["digest"] == digest
        assert env["pid"] == e.proc.pid and "--tensor-parallel-size" in env["argv"]
        assert env["requests"] == 9  # the /v1 requests above but the 413

        e.proc.send_signal(signal.SIGTERM)
        assert e.finish() == 0
    assert f"ready on 127.0.0.1:{e.port} model tiny digest {digest}" in e.stdout
    assert "ignoring flags: --tensor-parallel-size 2" in e.stdout
    assert "SIGTERM, draining" in e.stdout


def test_control_slow_and_crash(tmp_path: pathlib.Path) -> None:
    write_model(tmp_path / "m")
    with engine(tmp_path / "m", "--served-model-name", "named") as e, httpx.Client(timeout=5) as c:
        wait_healthy(c, e)
        assert c.post(e.url + "/control/slow", json={"seconds": 0.3}).json() == {"ok": True}
        t0 = time.monotonic()
        assert c.get(e.url + "/v1/models").json()["data"][0]["id"] == "named"
        assert time.monotonic() - t0 >= 0.3
        c.post(e.url + "/control/slow", json={"seconds": 0})
        try:
            c.post(e.url + "/control/crash")
        except httpx.TransportError:
            pass
        assert e.finish() == 1


def test_corrupt_weights_exit_3(tmp_path: pathlib.Path) -> None:
    write_model(tmp_path / "m")
    blob = bytearray((tmp_path / "m" / "model.bin").read_bytes())
    blob[100] ^= 0xFF
    (tmp_path / "m" / "model.bin").write_bytes(bytes(blob))
    with engine(tmp_path / "m") as e:
        assert e.finish() == 3
    assert "weights check failed: model.bin sha256 mismatch" in e.stderr


def test_fail_start_exit_4(tmp_path: pathlib.Path) -> None:
    write_model(tmp_path / "m")
    with engine(tmp_path / "m", "--fail-start") as e:
        assert e.finish() == 4
    assert "cannot start: told to fail" in e.stderr


def test_cuda_mib_without_a_driver_exit_6(tmp_path: pathlib.Path) -> None:
    """Where no CUDA driver is (CI), --cuda-mib is a clear refusal before listening, not a
    pretend hold; where one is, bench/gpu_proof.py shows the memory in NVML."""
    import ctypes.util

    if ctypes.util.find_library("cuda"):
        import pytest

        pytest.skip("a CUDA driver is here: bench/gpu_proof.py covers the hold")
    write_model(tmp_path / "m")
    with engine(tmp_path / "m", "--cuda-mib", "64") as e:
        assert e.finish() == 6
    assert "cannot hold 64 MiB of GPU memory: no CUDA driver" in e.stderr


def test_startup_delay(tmp_path: pathlib.Path) -> None:
    write_model(tmp_path / "m")
    with engine(tmp_path / "m", "--startup-delay", "1") as e, httpx.Client(timeout=5) as c:
        deadline = time.monotonic() + 10
        while True:  # listening at once, but loading
            assert time.monotonic() < deadline
            try:
                r = c.get(e.url + "/health")
                break
            except httpx.TransportError:
                time.sleep(0.02)
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        assert c.get(e.url + "/v1/models").status_code == 503
        seen = wait_healthy(c, e)
        assert seen[-1] == 200
        assert c.get(e.url + "/v1/models").status_code == 200
        e.proc.send_signal(signal.SIGTERM)
        assert e.finish() == 0


def test_crash_after(tmp_path: pathlib.Path) -> None:
    write_model(tmp_path / "m")
    with engine(tmp_path / "m", "--crash-after", "0.5") as e:
        assert e.finish() == 1
    assert "crashing as told" in e.stderr


def test_ignore_sigterm(tmp_path: pathlib.Path) -> None:
    write_model(tmp_path / "m")
    with engine(tmp_path / "m", "--ignore-sigterm") as e, httpx.Client(timeout=5) as c:
        wait_healthy(c, e)
        e.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert e.proc.poll() is None
        e.proc.kill()
        assert e.finish() == -signal.SIGKILL
