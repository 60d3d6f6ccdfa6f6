"""Inference answers pass through any node untouched and streamed: an
engine's 4xx passes as it was, server-sent events byte for byte, a 200 MB
answer in bounded memory; what is not an answer is 502
``ENGINE_BAD_ANSWER``, and an answer cut short reaches the client cut, never
a hang.  Two real ``meshnode start`` processes; the engine
(``tests/engine/odd_engine.py``) runs on the first and is asked through both."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from .test_process import NO_HUB, Proc, free_port, wait

ROOT = Path(__file__).resolve().parents[2]
ODD = str(ROOT / "tests" / "engine" / "odd_engine.py")
MiB = 1024 * 1024


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.fixture
def two(tmp_path: Path):  # type: ignore[no-untyped-def]
    port = free_port()
    extra = ("--fake-gpus", "1x24GiB", "--engines", "command", "--service-ports", f"{port}-{port}",
             "--engine-drain", "2")
    a = Proc("pa", tmp_path, None, extra, env=NO_HUB).start()
    b = Proc("pb", tmp_path, a.address, env=NO_HUB).start()
    try:
        (tmp_path / "w").mkdir()
        (tmp_path / "w" / "weights.bin").write_bytes(os.urandom(4096))
        r = httpx.post(a.url + "/models/org/odd/download", timeout=10,
                       json={"source_url": (tmp_path / "w").as_uri(), "target_device": "pa:disk"})
        assert r.status_code == 202, r.text
        wait(lambda: httpx.get(a.url + "/models/org/odd", timeout=5).json().get("locations") == ["pa:disk"],
             what="the copy")
        r = httpx.post(a.url + "/models/org/odd/services", timeout=10, json={"device": "pa:gpu0", "config": {
            "engine": "command", "command": [sys.executable, ODD, "--port", "{port}", "--host", "{host}",
                                             "--served-model-name", "{model_name}"]}})
        assert r.status_code == 202, r.text
        wait(lambda: [s["state"] for s in httpx.get(b.url + "/services", timeout=5).json()["services"]]
             == ["healthy"], what="the engine healthy, seen from pb")
        yield a, b, port
    finally:
        for p in (b, a):
            if p.p is not None and p.p.poll() is None:
                p.term()


def ask(url: str, prompt: str, timeout_s: float = 20) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"model": "org/odd", "prompt": prompt}, timeout=timeout_s)


@pytest.mark.slow
def test_answers_pass_through_untouched_or_as_a_clean_error(two) -> None:  # type: ignore[no-untyped-def]
    a, b, port = two
    direct = f"http://127.0.0.1:{port}"
    for node in (a, b):  # the engine's own node, and another one (the signed peer hop)
        r = ask(node.url, "teapot")
        assert r.status_code == 418 and r.content == ask(direct, "teapot").content
        for prompt in ("garbage", "not-http"):
            r = ask(node.url, prompt)
            assert r.status_code == 502 and r.json()["error"]["code"] == "ENGINE_BAD_ANSWER", (prompt, r.text)
        started = time.monotonic()
        with pytest.raises(httpx.HTTPError):  # cut short: the client sees the cut
            ask(node.url, "cut").read()
        assert time.monotonic() - started < 15
        with httpx.stream("POST", node.url + "/v1/completions", json={"model": "org/odd", "prompt": "sse:300"},
                          timeout=20) as s:
            through = b"".join(s.iter_raw())
            assert s.headers["content-type"] == "text/event-stream"
        with httpx.stream("POST", direct + "/v1/completions", json={"model": "org/odd", "prompt": "sse:300"},
                          timeout=20) as s:
            assert through == b"".join(s.iter_raw())  # byte for byte
        assert ask(node.url, "hello").json()["choices"] == [{"text": "ok"}]
        assert "mesh_token" not in ask(node.url, "hello").text  # the engine's answer, not re-written


@pytest.mark.slow
def test_a_200_mb_answer_passes_in_bounded_memory(two) -> None:  # type: ignore[no-untyped-def]
    a, b, _port = two
    assert a.p is not None and b.p is not None
    pids = {"pa": a.p.pid, "pb": b.p.pid}
    before = {k: rss_bytes(p) for k, p in pids.items()}
    peak = dict(before)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for k, p in pids.items():
                peak[k] = max(peak[k], rss_bytes(p))
            time.sleep(0.02)

    t = threading.Thread(target=sample)
    t.start()
    size = 200 * MiB
    got = 0
    try:
        with httpx.stream("POST", b.url + "/v1/completions", json={"model": "org/odd", "prompt": f"big:{size}"},
                          timeout=60) as s:
            assert s.status_code == 200 and int(s.headers["content-length"]) == size
            for chunk in s.iter_raw():
                got += len(chunk)
    finally:
        done.set()
        t.join()
    assert got == size
    for k in pids:
        assert peak[k] - before[k] < 64 * MiB, f"{k}: RSS grew {(peak[k] - before[k]) / MiB:.0f} MiB"
