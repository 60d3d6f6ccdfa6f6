"""A local mesh doing real work, on loopback: ``python -m meshnode.demo``.

Starts three ``meshnode start`` processes with pretend GPUs in their own data
dirs and makes a small model (a tiny GGUF that llama.cpp's server runs, when
llama-cpp-python is installed; else the test engine's weights).  Then
gswarm's deployment pipeline, adapted to these nodes and submitted to node3:
download on node1, copy to node2, serve on node2:gpu0, health check.  node3,
the job's coordinator, is killed with SIGKILL in the middle of the copy; the
job still completes (another node takes it over) and the copy is checked
byte-identical.  A chat completion asked of node1 is answered by node2's
engine; ``meshnode top`` shows the mesh and the dashboard's address is
printed; node3 comes back at a higher generation; every node leaves cleanly
and what the demo made is removed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
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
import yaml

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


ROOT = Path(__file__).resolve().parents[1]  # the repository: the demo's engines live in tests/engine
EXTRA_MIB = 24  # weights beside the engine's own file, so that the copy takes a few seconds


def real_engine() -> bool:
    """llama.cpp's server through llama-cpp-python, and gguf to write a tiny model, are installed."""
    return importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("gguf") is not None


def make_model(root: Path, real: bool) -> Path:
    """A small model directory (real bytes, not a stub): a tiny random-weight
    GGUF that llama.cpp serves, or the test engine's weights; and a shard of
    extra weights so that copying it takes a few seconds on a capped link."""
    d = root / "tiny-llm"
    d.mkdir(parents=True)
    if real:
        subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                        "from tests.engine.tiny_gguf import write_tiny_gguf; write_tiny_gguf(Path(sys.argv[1]))",
                        str(d / "tiny.gguf")], check=True, cwd=ROOT)
    else:
        subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                        "from tests.engine.fake_engine import write_model; write_model(Path(sys.argv[1]))",
                        str(d)], check=True, cwd=ROOT)
    (d / "extra-weights.bin").write_bytes(os.urandom(EXTRA_MIB * 1024 * 1024))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    return d


def engine_command(real: bool) -> list[str]:
    if real:
        return [sys.executable, "-m", "llama_cpp.server", "--model", "{model_dir}/tiny.gguf", "--host", "{host}",
                "--port", "{port}", "--model_alias", "{model_name}", "--n_ctx", "128"]
    return [sys.executable, str(ROOT / "tests" / "engine" / "fake_engine.py"), "--model-dir", "{model_dir}",
            "--port", "{port}", "--host", "{host}", "--served-model-name", "{model_name}"]


def pipeline(model: Path, port: int, real: bool) -> str:
    """gswarm's "simple deployment" pipeline (seed 001), adapted to the demo's nodes."""
    return yaml.safe_dump({
        "name": "demo-deployment-pipeline",
        "description": "download on node1, copy to node2, serve on node2:gpu0, check it",
        "actions": [
            {"action_id": "download_model", "action_type": "download", "model_name": "demo/tiny-llm",
             "source_url": model.as_uri(), "devices": ["node1:disk"], "dependencies": []},
            {"action_id": "copy_to_node2", "action_type": "copy", "model_name": "demo/tiny-llm",
             "devices": ["node1:disk", "node2:disk"], "dependencies": ["download_model"]},
            {"action_id": "serve_model", "action_type": "serve", "model_name": "demo/tiny-llm", "port": port,
             "devices": ["node2:gpu0"], "config": {"engine": "command", "command": engine_command(real),
                                                   "startup_timeout_s": 120},
             "dependencies": ["copy_to_node2"]},
            {"action_id": "health_check", "action_type": "health_check", "model_name": "demo/tiny-llm",
             "timeout_s": 120, "dependencies": ["serve_model"]},
        ]}, sort_keys=False)


class Node:
    def __init__(self, node_id: str, root: Path, port: int, join: list[str], extra: tuple[str, ...] = ()) -> None:
        self.node_id, self.port, self.data = node_id, port, root / node_id
        self.join, self.extra = join, extra
        self.url = f"http://127.0.0.1:{port}"
        self.log = root / f"{node_id}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "meshnode", "start", "--node-id", self.node_id, "--port", str(self.port),
               "--data-port", str(free_port()),
               "--data-dir", str(self.data), "--dram-dir", str(self.data.parent / f"{self.node_id}-shm"), *FAST,
               *self.extra]
        if self.join:
            cmd += ["--join", ",".join(self.join)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        wait_until(f"{self.node_id} to start", lambda: httpx.get(self.url + "/health", timeout=1).status_code == 200)

    def generation(self) -> int:
        return int(httpx.get(self.url + "/health", timeout=2).json()["generation"])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def states(url: str) -> dict[str, str]:
    return {n["node_id"]: n["state"] for n in httpx.get(url + "/nodes", timeout=2).json()["nodes"]}


def job_of(url: str, jid: str) -> dict[str, Any]:
    return dict(httpx.get(url + f"/jobs/{jid}", timeout=2).json())


def step(job: dict[str, Any], aid: str) -> dict[str, Any]:
    return next(a for a in job["actions"] if a["action_id"] == aid)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m meshnode.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the demo's data dirs and logs")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="meshnode-demo-"))
    ports = [free_port() for _ in range(3)]
    service_port = free_port()
    real = real_engine()
    nodes: list[Node] = []
    try:
        say("starting three nodes on loopback, each with a pretend 24 GiB GPU")
        first = f"127.0.0.1:{ports[0]}"
        for i, port in enumerate(ports):
            # node2 takes weights at 8 MB/s, so that the copy below lasts a few seconds.
            cap = ("--max-ingress", "8M") if i == 1 else ()
            extra = ("--fake-gpus", "1x24GiB", "--engines", "command", "--service-ports",
                     f"{service_port}-{service_port}", "--engine-startup", "120", *cap)
            n = Node(f"node{i + 1}", root, port, [] if i == 0 else [first], extra)
            n.start()
            nodes.append(n)
        a, b, c = nodes
        wait_until("all three to see each other", lambda: all(
            list(states(n.url).values()) == ["alive"] * 3 for n in nodes))
        cli("nodes", "--peer", a.url)

        say("making a small model in node1's import directory")
        model = make_model(a.data / "import", real)  # the directory a node ingests from by default
        size = sum(f.stat().st_size for f in model.iterdir())
        print(f"{model.name}: {', '.join(sorted(f.name for f in model.iterdir()))} ({size / 2**20:.1f} MiB); "
              f"engine: {'llama.cpp server (llama-cpp-python)' if real else 'the test engine (tests/engine)'}")
        cli("register", "demo/tiny-llm", "--type", "llm", "--url", model.as_uri(),
            "--desc", "a demo model", "--tags", "demo,tiny", "--peer", a.url)

        say("gswarm's deployment pipeline, submitted to node3: download, copy to node2, serve, check")
        doc = root / "deploy.yaml"
        doc.write_text(pipeline(model, service_port, real))
        print(doc.read_text(), end="")
        print(f"$ meshnode job {doc.name} --peer {c.url} --json")
        sub = subprocess.run([sys.executable, "-m", "meshnode", "job", str(doc), "--peer", c.url, "--json"],
                             capture_output=True, text=True)
        if sub.returncode != 0:
            raise SystemExit(f"demo: the pipeline was refused: {sub.stderr.strip()}")
        jid = json.loads(sub.stdout)["job_id"]
        print(f"job {jid} taken by node3")

        say("killing node3, the job's coordinator, in the middle of the copy")
        wait_until("the copy under way", lambda: (lambda s: s["status"] == "running" and any(
            p["bytes_done"] > 0 for p in s["parts"]))(step(job_of(a.url, jid), "copy_to_node2")), timeout_s=60)
        gen = c.generation()
        assert c.proc is not None
        c.proc.send_signal(signal.SIGKILL)
        c.proc.wait()
        t0 = time.monotonic()
        print(f"node3 killed with SIGKILL while node2 was copying ({step(job_of(a.url, jid), 'copy_to_node2')['parts'][0]['bytes_done'] / 2**20:.1f} MiB in)")
        wait_until("the job to complete", lambda: job_of(a.url, jid)["status"] in ("completed", "failed"),
                   timeout_s=180)
        job = job_of(a.url, jid)
        if job["status"] != "completed":
            raise SystemExit(f"demo: the job failed: {json.dumps(job)[:2000]}")
        print(f"job {jid} completed {time.monotonic() - t0:.1f} s after its coordinator died, now coordinated "
              f"by {job.get('coordinator')}")
        cli("job-status", jid, "--peer", a.url)
        same = all(sha256(next((b.data / "copies").rglob(f.name))) == sha256(f) for f in model.iterdir())
        print(f"node2:disk holds demo/tiny-llm ({'byte-identical' if same else 'DIFFERENT'})")
        if not same:
            raise SystemExit("demo: the copy differs from its source")

        say("a chat completion asked of node1, answered by node2's engine")
        wait_until("node1 to route to it", lambda: any(
            m["id"] == "demo/tiny-llm" for m in httpx.get(a.url + "/v1/models", timeout=2).json()["data"]))
        r = httpx.post(a.url + "/v1/chat/completions", timeout=60, json={
            "model": "demo/tiny-llm", "max_tokens": 8, "messages": [{"role": "user", "content": "hello"}]})
        if r.status_code != 200:
            raise SystemExit(f"demo: the chat completion failed: {r.status_code} {r.text[:500]}")
        text = r.json()["choices"][0]["message"]["content"]
        print(f"POST {a.url}/v1/chat/completions -> {r.status_code}, answered by {r.headers['x-mesh-service']}: "
              f"{text!r} (random weights: gibberish is right)")

        say("the mesh at a glance")
        cli("top", "--count", "1", "--peer", a.url)
        print(f"the dashboard: open {a.url}/ in a browser (every node serves it)")

        say("restarting node3 from its data dir: back at a higher generation")
        c.start()
        wait_until("node3 to be alive again", lambda: states(a.url)["node3"] == "alive")
        print(f"node3 generation {gen} -> {c.generation()}")

        say("stopping every node with SIGTERM: engines stop, nodes leave the mesh cleanly")
        for n in (c, b):
            assert n.proc is not None
            n.proc.send_signal(signal.SIGTERM)
            n.proc.wait(timeout=40)
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
