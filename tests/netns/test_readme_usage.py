"""README.md's usage examples, run exactly as written, on three hosts.

Every command README.md shows runs in a test; the first block (the demo) in
``tests/integration/test_readme.py``, the benchmarks in ``test_readme_bench``,
and these here.  They name hosts (``gpu1``, ``gpu2``, ``gpu3``), paths
(``/var/lib/meshnode``, ``/srv/models``) and the outside world (the Hugging
Face hub, ``https://example.org``), so the test builds those:

- one network namespace per host on a bridge; ``ip netns exec`` gives each
  its own ``/etc/hosts`` (from ``/etc/netns/<ns>/``) naming the others,
  the hub mirror (``HF_ENDPOINT=http://hub``) and example.org;
- a private mount namespace per daemon with tmpfs on ``/var/lib/meshnode``,
  ``/srv/models`` (gpu2's holds a small ``gpt2``) and ``/dev/shm``;
- a namespace for the outside world (``readme_web.py``): the fake hub, and
  example.org's HTTPS at a public address under a test CA that the hosts
  trust (``SSL_CERT_FILE``, as a CA in the system store would be);
- the secrets in the environment, as the systemd unit's environment file
  gives them.

The start lines of the first block run on their hosts (gpu3 is started as
gpu2 is); every other line runs as one ``bash -e`` script on gpu1.  Then the
mesh is checked through the API: what each command should have left.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from bench.swarm_netns import netns_usable, sh
from tests.needs import unavailable
from tests.netns.readme_web import TINY

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]
SUBNET = "10.79.0"
HOSTS = {"gpu1": 1, "gpu2": 2, "gpu3": 3}
WEB = 10
EXAMPLE_ORG = "93.184.215.14"  # a public address, so the daemons' private-source guard lets it through
MOUNTS = ("/var/lib/meshnode", "/srv/models")


def blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def commands(block: str) -> list[str]:
    """The block's commands: comments and blank lines dropped, ``\\`` lines joined."""
    out: list[str] = []
    cur = ""
    for line in block.splitlines():
        cur += line
        if cur.endswith("\\"):
            cur = cur[:-1]
            continue
        if cur.strip() and not cur.lstrip().startswith("#"):
            out.append(cur)
        cur = ""
    return out


@dataclass
class World:
    prefix: str
    tmp: Path
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]]

    def ns(self, host: str) -> str:
        return f"{self.prefix}{host}"

    def run(self, host: str, script: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.ns(host), "bash", "-e", "-x", "-c", script],
                              env=self.env, capture_output=True, text=True, timeout=timeout_s)

    def api(self, host: str, *args: str) -> Any:
        r = self.run(host, " ".join(["meshnode", "--json", *args]))
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout)

    def get(self, host: str, path: str) -> Any:
        """``GET http://<host>:7420<path>`` from gpu1, for what the CLI has no verb for."""
        code = ("import httpx, os, sys; t = open(os.environ['MESHNODE_TOKEN_FILE']).read().strip(); "
                "r = httpx.get(sys.argv[1], headers={'Authorization': 'Bearer ' + t}, timeout=5); "
                "r.raise_for_status(); print(r.text)")
        r = subprocess.run(["ip", "netns", "exec", self.ns("gpu1"), sys.executable, "-c", code,
                            f"http://{host}:7420{path}"], env=self.env, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout)

    def start(self, host: str, line: str) -> None:
        """``line`` on ``host``, in a mount namespace of its own."""
        stage = self.tmp / "stage" if host == "gpu2" else self.tmp / "empty"
        wrapper = (
            "set -e; for d in /var/lib/meshnode /srv/models /dev/shm; do mount -t tmpfs tmpfs $d; done; "
            'cp -r "$STAGE"/. /srv/models/; exec bash -c "$LINE"'
        )
        with open(self.tmp / f"{host}.log", "wb") as log:
            self.procs.append(subprocess.Popen(
                ["ip", "netns", "exec", self.ns(host), "unshare", "-m", "--propagation", "private",
                 "sh", "-c", wrapper],
                env={**self.env, "STAGE": str(stage), "LINE": line}, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True))

    def wait_up(self, host: str, timeout_s: float = 30.0) -> None:
        t0 = time.monotonic()
        while True:
            r = self.run(host, f"meshnode --peer http://{host}:7420 --timeout 2 status")
            if r.returncode == 0:
                return
            if time.monotonic() - t0 > timeout_s:
                log = (self.tmp / f"{host}.log").read_text(errors="replace")[-3000:]
                raise AssertionError(f"{host} did not come up: {r.stderr[-500:]}\n{log}")
            time.sleep(0.2)


def _remove(prefix: str) -> None:
    for line in sh("ip", "netns", "list", check=False).splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(prefix):
            for pid in sh("ip", "netns", "pids", name, check=False).split():
                sh("kill", "-9", pid, check=False)
            sh("ip", "netns", "del", name, check=False)
        shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)


@pytest.fixture
def world() -> Iterator[World]:
    why = netns_usable() or (None if shutil.which("unshare") else "unshare (util-linux) is not installed")
    if why is not None:
        unavailable(why)
    prefix = f"rm{os.getpid() % 10000}"
    tmp = Path(tempfile.mkdtemp(prefix="readme-usage-"))
    made = [d for d in MOUNTS if not os.path.exists(d)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for d in made:
            os.makedirs(d)
        # -- secrets, as the unit's environment file gives them ---------------------------
        (tmp / "api-tokens").write_text(secrets.token_urlsafe(32) + "\n")
        (tmp / "cluster-secret").write_text(secrets.token_urlsafe(32) + "\n")
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
        leaf = ca.issue_cert("example.org")
        leaf.cert_chain_pems[0].write_to_path(str(tmp / "example.org.pem"))
        leaf.private_key_pem.write_to_path(str(tmp / "example.org.key"))
        # -- gpt2 on gpu2's /srv/models ---------------------------------------------------
        gpt2 = tmp / "stage" / "gpt2"
        gpt2.mkdir(parents=True)
        (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
        (gpt2 / "model.safetensors").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
        (tmp / "empty").mkdir()
        # -- the network ----------------------------------------------------------------
        _remove(prefix)
        sw = f"{prefix}sw"
        sh("ip", "netns", "add", sw)
        sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", sw, "link", "set", "br0", "up")
        hosts_file = "127.0.0.1 localhost\n" + "".join(f"{SUBNET}.{i} {h}\n" for h, i in HOSTS.items())
        hosts_file += f"{SUBNET}.{WEB} hub\n{EXAMPLE_ORG} example.org\n"
        for name, i in (*HOSTS.items(), ("web", WEB)):
            ns = f"{prefix}{name}"
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", sw, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", sw, "link", "set", f"p{i}", "master", "br0")
            sh("ip", "-n", sw, "link", "set", f"p{i}", "up")
            sh("ip", "-n", ns, "addr", "add", f"{SUBNET}.{i}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            if name == "web":
                sh("ip", "-n", ns, "addr", "add", f"{EXAMPLE_ORG}/32", "dev", "eth0")
            else:
                sh("ip", "-n", ns, "route", "add", f"{EXAMPLE_ORG}/32", "dev", "eth0")
            os.makedirs(f"/etc/netns/{ns}", exist_ok=True)
            Path(f"/etc/netns/{ns}/hosts").write_text(hosts_file)
        env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(tmp / "home"),
            "XDG_STATE_HOME": str(tmp / "state"),
            "PYTHONPATH": str(ROOT),
            "MESHNODE_API_TOKENS_FILE": str(tmp / "api-tokens"),
            "MESHNODE_CLUSTER_SECRET_FILE": str(tmp / "cluster-secret"),
            "MESHNODE_TOKEN_FILE": str(tmp / "api-tokens"),
            "HF_ENDPOINT": "http://hub",
            "SSL_CERT_FILE": str(tmp / "ca.pem"),
            "LANG": "C.UTF-8",
        }
        w = World(prefix, tmp, env, procs)
        web = subprocess.Popen(
            ["ip", "netns", "exec", w.ns("web"), sys.executable, "-m", "tests.netns.readme_web",
             "--cert", str(tmp / "example.org.pem"), "--key", str(tmp / "example.org.key")],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(web)  # type: ignore[arg-type]
        assert web.stdout is not None and web.stdout.readline().strip() == b"ready"
        yield w
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, 9)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)
            if p.stdout is not None:
                p.stdout.close()
        _remove(prefix)
        for d in made:
            os.rmdir(d)
        shutil.rmtree(tmp, ignore_errors=True)


def test_the_usage_examples_run_as_written(world: World) -> None:
    found = blocks()
    # The GPU proof's block is run by tests/integration/test_gpu_hardware.py (where a GPU is); the
    # bundles block by tests/integration/test_readme_bundles.py, the pod example's by test_deploy_examples.py.
    assert len(found) == 9, ("README's sh blocks: the demo, running a mesh, the command line, the GPU proof, "
                             "bundles, the pod example, install (systemd, Kubernetes), benchmarks")
    assert found[4].startswith("cat > deploy.yaml") and found[5].startswith("kubectl apply -f deploy/kubernetes/examples")
    assert found[3].startswith("python3 bench/gpu_proof.py")
    mesh_lines, cli = commands(found[1]), found[2]
    starts = [c for c in mesh_lines if c.startswith("meshnode start")]
    assert [re.search(r"--node-id (\S+)", c).group(1) for c in starts] == ["gpu1", "gpu2"]  # type: ignore[union-attr]
    world.start("gpu1", starts[0])
    world.wait_up("gpu1")
    world.start("gpu2", starts[1])
    world.start("gpu3", starts[1].replace("gpu2", "gpu3"))  # a third host, started as gpu2 is
    for h in ("gpu2", "gpu3"):
        world.wait_up(h)
    t0 = time.monotonic()
    while {n["node_id"]: n["state"] for n in world.api("gpu1", "nodes")["nodes"]} != dict.fromkeys(HOSTS, "alive"):
        assert time.monotonic() - t0 < 30, world.api("gpu1", "nodes")
        time.sleep(0.2)

    rest = [c for c in mesh_lines if c not in starts]
    assert rest == ["meshnode --peer http://gpu2:7420 nodes                                # any peer answers"]
    r = world.run("gpu1", rest[0])
    assert r.returncode == 0, r.stderr
    assert all(h in r.stdout for h in HOSTS), r.stdout

    r = world.run("gpu1", cli, timeout_s=300)
    trace = r.stderr[-6000:]
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{trace}"

    # What the commands left, seen through the API.
    models = {m["model_name"]: m for m in world.api("gpu3", "list")["models"]}
    assert "gpt2" not in models and "meta-llama/Llama-3.1-8B-Instruct" not in models  # unregistered, purged
    llama = world.api("gpu3", "info", "meta-llama/Llama-3.1-8B")
    assert llama["model_type"] == "llama" and llama["locations"] == ["gpu2:disk"], llama
    files = llama["metadata"]["files"]
    assert files and all(f.endswith((".safetensors", ".json")) for f in files), files  # --include
    tiny = world.api("gpu1", "info", "tiny")
    assert tiny["size"] == len(TINY) and tiny["locations"] == ["gpu2:disk"], tiny
    for h in HOSTS:
        t0 = time.monotonic()
        while True:  # the purge reaches every node's own store
            held = {c["model_name"] for c in world.get(h, "/storage")["copies"]}
            if "gpt2" not in held:
                break
            assert time.monotonic() - t0 < 30, (h, held)
            time.sleep(0.2)
    transfers = world.api("gpu1", "transfers")["transfers"]
    done = [(t["model"], t["target_device"]) for t in transfers if t["status"] == "done"]
    for want in (("gpt2", "gpu3:disk"), ("gpt2", "gpu1:disk"), ("gpt2", "gpu3:dram"), ("gpt2", "gpu1:dram")):
        assert want in done, (want, done)
    again = [t for t in transfers if t["model"] == "gpt2" and t["target_device"] == "gpu2:disk"]
    assert len(again) == 2 and {t["status"] for t in again} == {"done"}, again
    assert [t["note"] for t in again if t["note"]] == ["already present: the files hold the same bytes"], again
    (job,) = world.api("gpu3", "jobs")["jobs"]
    assert job["name"] == "stage-gpt2" and job["status"] == "completed", job
    assert [a["status"] for a in job["actions"]] == ["completed", "completed"]
    moved = [t for t in transfers if t["model"] == "gpt2" and t["target_device"] == "gpu3:dram"]
    assert moved and moved[0].get("sources") == ["gpu2"], moved
