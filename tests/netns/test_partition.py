"""A real partition: five daemons in network namespaces, the link between
two groups cut and restored.

Hosts h1..h3 hang on one bridge, h4 and h5 on another, and one veth pair
joins the bridges: the link the test takes down.  The test itself talks to
both sides through two veths of its own (host routes to h4 and h5 on the
second), so it can write on either side while they cannot hear each other.
Every write made on both sides during the cut survives, and once the link
is back every node converges: each lists every model, and sees all five
alive.  Needs root and ``ip``: skipped otherwise, failed as root
(``tests.needs``).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from bench.swarm_netns import netns_usable, remove_leftovers, sh
from tests.needs import unavailable

pytestmark = pytest.mark.netns

SUBNET = "10.78.0"
PORT = 7420
GOSSIP_S = 0.2
MODEL_BYTES = 24 * 1024 * 1024
SOURCE_WAIT = os.environ.get("PARTITION_SOURCE_WAIT", "60")  # 3 shows the old behaviour: the copy fails
WEST, EAST = (1, 2, 3), (4, 5)


def ip(i: int) -> str:
    return f"{SUBNET}.{i}"


class Cut:
    """The two-bridge topology; ``cut()`` and ``heal()`` the link between them."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.sw = f"{prefix}sw"
        self.hosts = {i: f"{prefix}h{i}" for i in (*WEST, *EAST)}
        self.links = (f"{prefix}ta", f"{prefix}tb")  # our veths in the root namespace

    def up(self) -> None:
        remove_leftovers(self.prefix)
        sh("ip", "netns", "add", self.sw)
        for br in ("br0", "br1"):
            sh("ip", "-n", self.sw, "link", "add", br, "type", "bridge")
            sh("ip", "-n", self.sw, "link", "set", br, "up")
        sh("ip", "-n", self.sw, "link", "add", "la", "type", "veth", "peer", "name", "lb")
        for end, br in (("la", "br0"), ("lb", "br1")):
            sh("ip", "-n", self.sw, "link", "set", end, "master", br)
            sh("ip", "-n", self.sw, "link", "set", end, "up")
        for i, ns in self.hosts.items():
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", self.sw, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", self.sw, "link", "set", f"p{i}", "master", "br0" if i in WEST else "br1")
            sh("ip", "-n", self.sw, "link", "set", f"p{i}", "up")
            sh("ip", "-n", ns, "addr", "add", f"{ip(i)}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        for ours, br, addr in ((self.links[0], "br0", 250), (self.links[1], "br1", 251)):
            sh("ip", "link", "add", ours, "type", "veth", "peer", "name", f"d{br}", "netns", self.sw)
            sh("ip", "-n", self.sw, "link", "set", f"d{br}", "master", br)
            sh("ip", "-n", self.sw, "link", "set", f"d{br}", "up")
            sh("ip", "addr", "add", f"{ip(addr)}/32", "dev", ours)
            sh("ip", "link", "set", ours, "up")
        for i in WEST:
            sh("ip", "route", "add", f"{ip(i)}/32", "dev", self.links[0], "src", ip(250))
        for i in EAST:
            sh("ip", "route", "add", f"{ip(i)}/32", "dev", self.links[1], "src", ip(251))

    def cut(self) -> None:
        sh("ip", "-n", self.sw, "link", "set", "la", "down")

    def heal(self) -> None:
        sh("ip", "-n", self.sw, "link", "set", "la", "up")

    def down(self) -> None:
        for ours in self.links:
            sh("ip", "link", "del", ours, check=False)
        remove_leftovers(self.prefix)
        for ns in (*self.hosts.values(), self.sw):
            sh("ip", "netns", "del", ns, check=False)


@pytest.fixture
def cut_mesh() -> Iterator[tuple[Cut, httpx.Client, dict[int, str], Path]]:
    why = netns_usable()
    if why is not None:
        unavailable(why)
    topo = Cut(f"mp{os.getpid() % 10000}")
    tmp = Path(tempfile.mkdtemp(prefix="partition-"))
    token, secret = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    env = {**os.environ, "MESHNODE_API_TOKENS": token, "MESHNODE_CLUSTER_SECRET": secret}
    meshnode = str(Path(sys.executable).parent / "meshnode")
    procs: list[subprocess.Popen[bytes]] = []
    (tmp / "src").mkdir()
    (tmp / "src" / "weights.bin").write_bytes(os.urandom(MODEL_BYTES))
    try:
        topo.up()
        for i, ns in topo.hosts.items():
            cmd = ["ip", "netns", "exec", ns, meshnode, "start", "--node-id", f"h{i}", "--host", ip(i),
                   "--port", str(PORT), "--data-dir", str(tmp / f"h{i}"), "--dram-dir", str(tmp / f"h{i}-shm"),
                   "--gossip-interval", str(GOSSIP_S), "--probe-interval", "0.5"]
            cmd += ["--ingest-roots", str(tmp / "src"), "--chunk-stall", "2", "--source-wait", SOURCE_WAIT]
            if i == 1:
                cmd += ["--max-egress", "4M"]  # so that the transfer is under way when the link goes
            else:
                cmd += ["--join", f"{ip(1)}:{PORT}"]
            with open(tmp / f"h{i}.log", "wb") as logf:
                procs.append(subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, start_new_session=True))
        client = httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=5)
        yield topo, client, {i: f"http://{ip(i)}:{PORT}" for i in topo.hosts}, tmp
        client.close()
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)
        topo.down()


def until(what: str, cond: Callable[[], bool], timeout_s: float = 60.0) -> float:
    """Wait for ``cond`` (a hang guard, not a bound under test); how long it took."""
    t0 = time.monotonic()
    while True:
        try:
            if cond():
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.05)


def states(client: httpx.Client, url: str) -> dict[str, str]:
    return {n["node_id"]: n["state"] for n in client.get(url + "/nodes").json()["nodes"]}

HEAL_BOUND_S = 3.0  # the 2 s target with a loaded machine's margin


def models(client: httpx.Client, url: str) -> set[str]:
    return {m["model_name"] for m in client.get(url + "/models").json()["models"]}


def test_writes_on_both_sides_of_a_cut_survive_and_every_node_converges(
    cut_mesh: tuple[Cut, httpx.Client, dict[int, str], Path],
) -> None:
    topo, client, urls, tmp = cut_mesh
    everyone = {f"h{i}": "alive" for i in urls}
    for u in urls.values():
        until("all five alive", lambda u=u: states(client, u) == everyone)
    # A model on h1 (west), copied to h4 (east) when the link goes.
    src = tmp / "src" / "weights.bin"
    r = client.post(urls[1] + "/models/before/download", json={"source_url": src.as_uri(), "target_device": "h1:disk"})
    until("h1's ingest", lambda: client.get(urls[1] + f"/transfers/{r.json()['transfer_id']}").json()["status"] == "done")
    until("h4 knows h1's copy", lambda: bool(client.get(urls[4] + "/models/before").json().get("copies")))
    r = client.post(urls[4] + "/models/before/copy", json={"from_device": "h1:disk", "to_device": "h4:disk"})
    tid = r.json()["transfer_id"]

    def copied() -> int:
        return int(client.get(urls[4] + f"/transfers/{tid}").json()["bytes_done"])

    until("the copy under way", lambda: copied() > 0)

    topo.cut()
    # Each side comes to see the other as gone.
    until("the west sees the east dead", lambda: states(client, urls[1])["h4"] == "dead")
    until("the east sees the west dead", lambda: states(client, urls[5])["h1"] == "dead")
    written = {"before"}
    for k in range(3):
        for side, i in (("west", 2), ("east", 5)):
            client.post(urls[i] + f"/models/{side}-{k}/register", json={"model_type": side}).raise_for_status()
            written.add(f"{side}-{k}")
    until("the west has its writes", lambda: models(client, urls[1]) >= {"west-0", "west-1", "west-2"})
    assert not models(client, urls[1]) & {"east-0", "east-1", "east-2"}  # really cut
    time.sleep(4.0)  # longer than the 3 s after which a transfer with no holder used to fail
    stalled = client.get(urls[4] + f"/transfers/{tid}").json()
    assert stalled["status"] == "running" and stalled["bytes_done"] < MODEL_BYTES, stalled  # waiting, not failed

    topo.heal()
    took = until("every node lists every write and sees all five alive",
                 lambda: all(models(client, u) == written and states(client, u) == everyone for u in urls.values()))
    print(f"converged {took:.1f} s after the heal ({took / GOSSIP_S:.0f} gossip intervals)")
    # Issue 25's target is 2 s (0.3 to 0.4 s here); the protocol test of the fix
    # (a member that hears from a node it holds dead tells it and dials the other
    # dead at once) is test_protocol_lifeguard's partition of forty.
    assert took <= HEAL_BOUND_S, f"the mesh agreed {took:.1f} s after the heal"
    # The transfer across the cut went on from where it was once the link was back.
    until("the copy across the cut", lambda: client.get(urls[4] + f"/transfers/{tid}").json()["status"] != "running")
    done = client.get(urls[4] + f"/transfers/{tid}").json()
    assert done["status"] == "done", done
    copies = list((tmp / "h4" / "copies").rglob("weights.bin"))
    assert len(copies) == 1 and copies[0].read_bytes() == src.read_bytes()
    # The side that wrote each model is the one every node names.
    for u in urls.values():
        for m in client.get(u + "/models").json()["models"]:
            if m["model_name"] != "before":
                assert m["model_type"] == m["model_name"].split("-")[0]
