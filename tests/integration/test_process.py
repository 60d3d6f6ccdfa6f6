"""Real ``meshnode start`` processes: kill -9 at any moment, SIGTERM, bad starts."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

FAST = ["--gossip-interval", "0.1", "--probe-interval", "0.4"]


NO_HUB = {"HF_ENDPOINT": "http://127.0.0.1:9"}  # a dead local port: nothing reaches a hub


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    def __init__(self, node_id: str, root: Path, join: str | None = None, extra: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        self.node_id, self.root, self.join, self.extra = node_id, root, join, extra
        self.env = {**os.environ, **env} if env else None
        self.port = free_port()
        self.data_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.address = f"127.0.0.1:{self.port}"
        self.log = root / f"{node_id}.log"
        self.p: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        cmd = [sys.executable, "-m", "meshnode", "start", "--node-id", self.node_id, "--port", str(self.port),
               "--data-port", str(self.data_port),
               "--data-dir", str(self.root / self.node_id), "--dram-dir", str(self.root / f"{self.node_id}-shm"),
               "--ingest-roots", str(self.root), *FAST, *self.extra]
        if self.join:
            cmd += ["--join", self.join]
        with open(self.log, "ab") as log:
            self.p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=0.5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            assert self.p.poll() is None, self.log.read_text()
            time.sleep(0.05)
        raise AssertionError(f"{self.node_id} did not start:\n{self.log.read_text()}")

    def kill(self) -> None:
        assert self.p is not None
        self.p.send_signal(signal.SIGKILL)
        self.p.wait()

    def term(self) -> int:
        assert self.p is not None
        self.p.send_signal(signal.SIGTERM)
        return self.p.wait(timeout=20)

    def generation(self) -> int:
        return int(httpx.get(self.url + "/health", timeout=2).json()["generation"])


@pytest.fixture
def procs(tmp_path: Path):  # type: ignore[no-untyped-def]
    made: list[Proc] = []

    def make(node_id: str, join: str | None = None, *extra: str) -> Proc:
        p = Proc(node_id, tmp_path, join, extra)
        made.append(p)
        return p

    yield make
    for p in made:
        if p.p is not None and p.p.poll() is None:
            p.p.kill()
            p.p.wait()


def wait(check, timeout_s: float = 20.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def states(url: str) -> dict[str, str]:
    return {n["node_id"]: n["state"] for n in httpx.get(url + "/nodes", timeout=2).json()["nodes"]}


@pytest.mark.slow
def test_kill_9_at_any_moment_loses_no_acknowledged_registration(procs) -> None:  # type: ignore[no-untyped-def]
    a = procs("a").start()
    rng = random.Random(7)
    acked: list[str] = []
    gen = a.generation()
    for round_ in range(3):
        # Register as fast as we can, and pull the plug at a random moment.
        kill_at = time.monotonic() + rng.uniform(0.2, 0.8)
        i = 0
        with httpx.Client(timeout=2) as c:
            while time.monotonic() < kill_at:
                name = f"m{round_}-{i}"
                try:
                    if c.post(a.url + f"/models/{name}/register", json={"model_type": "llm"}).status_code == 201:
                        acked.append(name)
                except httpx.HTTPError:
                    pass
                i += 1
        a.kill()
        a.start()
        new_gen = a.generation()
        assert new_gen > gen
        gen = new_gen
        have = {m["model_name"] for m in httpx.get(a.url + "/models", timeout=5).json()["models"]}
        missing = [n for n in acked if n not in have]
        assert not missing, f"lost acknowledged registrations after kill -9: {missing[:5]}"
        assert "corrupt" not in a.log.read_text()
    assert len(acked) > 10


def test_sigterm_leaves_cleanly(procs) -> None:  # type: ignore[no-untyped-def]
    a = procs("a").start()
    b = procs("b", join=a.address).start()
    wait(lambda: states(a.url) == {"a": "alive", "b": "alive"}, what="both alive")
    assert b.term() == 0  # within term()'s 20 s, or it raises
    assert states(a.url)["b"] == "left"
    assert "left the mesh" in b.log.read_text() and "acknowledged by a" in b.log.read_text()


def test_unusable_data_dir_and_busy_port(procs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "file").write_text("x")
    r = subprocess.run(
        [sys.executable, "-m", "meshnode", "start", "--node-id", "x", "--data-dir", str(tmp_path / "file" / "d")],
        capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 2
    assert r.stderr.startswith("meshnode: error: data dir") and "Traceback" not in r.stderr
    a = procs("a").start()
    r = subprocess.run(
        [sys.executable, "-m", "meshnode", "start", "--node-id", "y", "--port", str(a.port), "--data-dir", str(tmp_path / "y")],
        capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 2, r.stderr
    assert "cannot serve on" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "meshnode", "start", "--host", "0.0.0.0", "--advertise", "h:1", "--data-dir", str(tmp_path / "z")],
        capture_output=True, text=True, timeout=30, env={k: v for k, v in os.environ.items() if not k.startswith("MESHNODE_")},
    )
    assert r.returncode == 2 and "refusing to bind 0.0.0.0" in r.stderr
