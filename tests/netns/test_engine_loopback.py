"""Engines listen on their node's loopback only: from another host an
engine's port refuses the connection, while inference asked of another node
reaches it through the signed peer hop.

Two hosts in network namespaces this test makes (``h1``, ``h2``, one veth
pair), each running a real ``meshnode start`` bound to its own address with
an API token and a cluster secret.  Every request is sent from inside a
namespace (``ip netns exec``).  Needs root and ``ip``: skipped otherwise,
failed as root (``tests.needs``).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bench.swarm_netns import netns_usable, sh
from tests.engine.fake_engine import write_model
from tests.needs import unavailable

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]
ENGINE = str(ROOT / "tests" / "engine" / "fake_engine.py")
SUBNET = "10.79.0"
PORT = 7420
ENGINE_PORT = 8500

# Runs inside a namespace: one HTTP request, its outcome as JSON on stdout.
REQUEST = """
import json, sys, time, httpx
method, url, token, body, until = sys.argv[1:6]
deadline = time.monotonic() + float(until)
while True:
    try:
        r = httpx.request(method, url, headers={"Authorization": "Bearer " + token} if token else {},
                          json=json.loads(body) if body else None, timeout=5)
        out = {"status": r.status_code, "body": r.text[:2000], "service": r.headers.get("x-mesh-service")}
        if out["status"] < 500 or time.monotonic() > deadline:
            break
    except httpx.HTTPError as e:
        out = {"error": type(e).__name__}
        if time.monotonic() > deadline:
            break
    time.sleep(0.2)
print(json.dumps(out))
"""


def ask(ns: str, method: str, url: str, token: str, body: object = None, until_s: float = 0) -> dict[str, object]:
    r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", REQUEST, method, url, token,
                        json.dumps(body) if body is not None else "", str(until_s)],
                       capture_output=True, text=True, timeout=until_s + 30)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def wait_for(ns: str, url: str, token: str, check: object, what: str, timeout_s: float = 40) -> dict[str, object]:
    import time
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = ask(ns, "GET", url, token)
        if "body" in out and callable(check) and check(json.loads(str(out["body"]))):
            return out
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_an_engine_refuses_other_hosts_yet_serves_the_mesh_through_its_node() -> None:
    why = netns_usable()
    if why is not None:
        unavailable(why)
    prefix = f"el{os.getpid() % 10000}"
    hosts = {1: f"{prefix}h1", 2: f"{prefix}h2"}
    tmp = Path(tempfile.mkdtemp(prefix="engine-loopback-"))
    token, secret = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    env = {**os.environ, "MESHNODE_API_TOKENS": token, "MESHNODE_CLUSTER_SECRET": secret}
    meshnode = str(Path(sys.executable).parent / "meshnode")
    (tmp / "src").mkdir()
    write_model(tmp / "src", size=64 * 1024)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for ns in hosts.values():
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", hosts[1], "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", hosts[2])
        for i, ns in hosts.items():
            sh("ip", "-n", ns, "addr", "add", f"{SUBNET}.{i}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        for i, ns in hosts.items():
            cmd = ["ip", "netns", "exec", ns, meshnode, "start", "--node-id", f"h{i}", "--host", f"{SUBNET}.{i}",
                   "--port", str(PORT), "--data-dir", str(tmp / f"h{i}"), "--dram-dir", str(tmp / f"h{i}-shm"),
                   "--gossip-interval", "0.2", "--probe-interval", "0.5", "--fake-gpus", "1x24GiB",
                   "--engines", "command", "--service-ports", f"{ENGINE_PORT}-{ENGINE_PORT + 4}",
                   "--ingest-roots", str(tmp / "src"), "--engine-drain", "2"]
            if i == 2:
                cmd += ["--join", f"{SUBNET}.1:{PORT}"]
            with open(tmp / f"h{i}.log", "wb") as logf:
                procs.append(subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, start_new_session=True))
        a, b = f"http://{SUBNET}.1:{PORT}", f"http://{SUBNET}.2:{PORT}"
        out = ask(hosts[1], "POST", a + "/models/org/e/download", token,
                  {"source_url": (tmp / "src").as_uri(), "target_device": "h1:disk"}, until_s=20)
        assert out.get("status") == 202, out
        wait_for(hosts[1], a + "/models/org/e", token, lambda m: m.get("locations") == ["h1:disk"], "the copy")
        command = [sys.executable, ENGINE, "--model-dir", "{model_dir}", "--port", "{port}", "--host", "{host}",
                   "--served-model-name", "{model_name}"]
        out = ask(hosts[1], "POST", a + "/models/org/e/services", token,
                  {"device": "h1:gpu0", "config": {"engine": "command", "command": command}})
        assert out.get("status") == 202, out
        wait_for(hosts[2], b + "/services", token,
                 lambda s: [x["state"] for x in s["services"]] == ["healthy"], "the service healthy, seen from h2")
        # The engine's own port, from the other host: refused (it listens on h1's loopback only).
        assert ask(hosts[2], "GET", f"http://{SUBNET}.1:{ENGINE_PORT}/health", "") == {"error": "ConnectError"}
        # Inference asked of h2 is answered by h1's engine, through h1's signed peer route.
        out = ask(hosts[2], "POST", b + "/v1/completions", token,
                  {"model": "org/e", "prompt": "hello", "max_tokens": 4}, until_s=15)
        assert out.get("status") == 200, out
        assert out.get("service") == f"h1:{ENGINE_PORT}"
        assert json.loads(str(out["body"]))["choices"]
        # The peer route itself wants the cluster secret: a bare request is refused.
        out = ask(hosts[2], "POST", f"{a}/mesh/v1/infer/{ENGINE_PORT}/v1/completions", token,
                  {"model": "org/e", "prompt": "x"})
        assert out.get("status") == 401, out
    finally:
        # SIGTERM first: a node stops its engines as it goes (a kill -9 would leave h1's
        # engine running in its namespace until that node's next start, which never comes).
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        for ns in hosts.values():
            sh("ip", "netns", "del", ns, check=False)
