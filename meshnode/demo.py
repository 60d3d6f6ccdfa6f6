"""A local mesh doing real work, on loopback: ``python -m meshnode.demo``.

Starts three ``meshnode start`` processes in their own data dirs, makes a
small model on disk (safetensors-style shards and a config), registers it
on one node and adds the files there as a copy (hashed into a chunk
manifest), copies it peer to peer into another node's RAM tier and checks it
is byte-identical, shows it from a third node, kills a node with SIGKILL and shows the mesh mark it dead, restarts it and shows it
back at a higher generation with its state intact, then stops every node
(they leave cleanly) and removes what it made.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

FAST = ["--gossip-interval", "0.2", "--probe-interval", "0.5"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "meshnode", *args]
    print("$ meshnode " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def wait_until(what: str, check: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"demo: timed out waiting for {what}")


def make_model(root: Path) -> Path:
    """A small model directory: two shards and a config (real bytes, not a stub)."""
    d = root / "tiny-llm"
    d.mkdir(parents=True)
    for i in range(2):
        (d / f"model-0000{i + 1}-of-00002.safetensors").write_bytes(os.urandom(4 * 1024 * 1024))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    return d


class Node:
    def __init__(self, node_id: str, root: Path, port: int, join: list[str]) -> None:
        self.node_id, self.port, self.data = node_id, port, root / node_id
        self.join = join
        self.url = f"http://127.0.0.1:{port}"
        self.log = root / f"{node_id}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "meshnode", "start", "--node-id", self.node_id, "--port", str(self.port),
               "--data-port", str(free_port()),
               "--data-dir", str(self.data), "--dram-dir", str(self.data.parent / f"{self.node_id}-shm"), *FAST]
        if self.join:
            cmd += ["--join", ",".join(self.join)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        wait_until(f"{self.node_id} to start", lambda: httpx.get(self.url + "/health", timeout=1).status_code == 200)

    def generation(self) -> int:
        return int(httpx.get(self.url + "/health", timeout=2).json()["generation"])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def transfer(url: str, path: str, body: dict[str, Any], on: str | None = None) -> dict[str, Any]:
    """POST a copy or download and wait for it (on the target node ``on``)."""
    r = httpx.post(url + path, json=body, timeout=10)
    if r.status_code != 202:
        raise SystemExit(f"demo: {path} failed: {r.text}")
    tid = r.json()["transfer_id"]
    out: dict[str, Any] = {}

    def done() -> bool:
        out.update(httpx.get((on or url) + f"/transfers/{tid}", timeout=2).json())
        return out.get("status") in ("done", "failed")

    wait_until(f"transfer {tid}", done)
    if out["status"] != "done":
        raise SystemExit(f"demo: transfer failed: {out.get('error')}")
    return out


def states(url: str) -> dict[str, str]:
    return {n["node_id"]: n["state"] for n in httpx.get(url + "/nodes", timeout=2).json()["nodes"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m meshnode.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the demo's data dirs and logs")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="meshnode-demo-"))
    ports = [free_port() for _ in range(3)]
    nodes: list[Node] = []
    try:
        say("starting three nodes on loopback")
        first = f"127.0.0.1:{ports[0]}"
        for i, port in enumerate(ports):
            n = Node(f"node{i + 1}", root, port, [] if i == 0 else [first])
            n.start()
            nodes.append(n)
        a, b, c = nodes
        wait_until("all three to see each other", lambda: all(
            list(states(n.url).values()) == ["alive"] * 3 for n in nodes))
        cli("nodes", "--peer", a.url)

        say("making a small model in node1's import directory and registering it there")
        model = make_model(a.data / "import")  # the directory a node ingests from by default
        size = sum(f.stat().st_size for f in model.iterdir())
        cli("register", "demo/tiny-llm", "--type", "llm", "--url", model.as_uri(),
            "--desc", f"a {size // (1024 * 1024)} MiB demo model", "--tags", "demo,tiny", "--peer", a.url)

        say("adding the files on node1 as a copy: hashed once into a chunk manifest")
        transfer(a.url, "/models/demo/tiny-llm/download", {"source_url": model.as_uri(), "target_device": "node1:disk"})

        say("copying it to node3's RAM tier, asked on node2: chunks pulled and verified peer to peer")
        # node2 may not know the model yet (404 until gossip brings the registration): not yet, then.
        wait_until("node2 to see node1's copy",
                   lambda: len(httpx.get(b.url + "/models/demo/tiny-llm", timeout=2).json().get("copies", [])) == 1)
        t = transfer(b.url, "/models/demo/tiny-llm/copy", {"from_device": "node1:disk", "to_device": "node3:dram"}, on=c.url)
        print(f"{t['chunks_fetched']} chunks of {t['chunks_total']} fetched from {', '.join(t['sources'])}, every one verified")
        copy = next((root / "node3-shm").rglob("model-00001-of-00002.safetensors"))
        same = all(
            sha256(next((root / "node3-shm").rglob(f.name))) == sha256(f) for f in model.iterdir()
        )
        print(f"node3:dram holds {copy.parent} ({'byte-identical' if same else 'DIFFERENT'})")
        if not same:
            raise SystemExit("demo: the copy differs from its source")

        say("node3 answers for the whole mesh")
        wait_until("node3 to see both copies",
                   lambda: len(httpx.get(c.url + "/models/demo/tiny-llm", timeout=2).json().get("copies", [])) == 2)
        cli("list", "--peer", c.url)
        cli("info", "demo/tiny-llm", "--peer", c.url)

        say("killing node2 with SIGKILL: the mesh suspects it, then marks it dead")
        gen = b.generation()
        assert b.proc is not None
        b.proc.send_signal(signal.SIGKILL)
        b.proc.wait()
        t0 = time.monotonic()
        wait_until("node2 to be marked dead", lambda: states(a.url)["node2"] == "dead" and states(c.url)["node2"] == "dead")
        print(f"node2 marked dead on node1 and node3 after {time.monotonic() - t0:.1f} s")
        cli("nodes", "--peer", a.url)

        say("restarting node2 from its data dir: back at a higher generation")
        b.start()
        wait_until("node2 to be alive again", lambda: states(a.url)["node2"] == "alive")
        print(f"node2 generation {gen} -> {b.generation()}")
        cli("nodes", "--peer", c.url)
        cli("availability", "--peer", b.url)

        say("stopping every node with SIGTERM: they leave the mesh cleanly")
        for n in (c, b):
            assert n.proc is not None
            n.proc.send_signal(signal.SIGTERM)
            n.proc.wait(timeout=15)
        wait_until("node1 to see the others leave", lambda: states(a.url) == {"node1": "alive", "node2": "left", "node3": "left"})
        cli("nodes", "--peer", a.url)
        say("demo finished")
        return 0
    finally:
        for n in nodes:
            if n.proc is not None and n.proc.poll() is None:
                n.proc.send_signal(signal.SIGTERM)
                try:
                    n.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    n.proc.kill()
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
