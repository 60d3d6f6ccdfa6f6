"""Anti-entropy throughput: two real daemons on loopback, one holding
``--keys`` registrations of its own, the other empty; seconds until the empty
one holds them all.

    .venv/bin/python bench/catalog_sync.py [--keys 100000] [--target-s 10]

The full node's keys are synthesised into its data dir (a state snapshot, as
the node itself writes one) before it starts, so the figure is the sync
alone, not the writes.  Each node is a separate ``meshnode start`` process
with the default gossip intervals.  The empty node joins, and the bench polls
both nodes' ``meshnode_catalog_keys`` (``GET /metrics``) until they agree.
It prints the time, keys per second, and the peer bytes sent, against the
target (MET / MISSED); every message stays under the per-message budget
(``GossipConfig.delta_budget_bytes``), whatever the key count.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

from meshnode.persist import SavedState, StateFile
from protocol.catalog import Catalog
from protocol.hlc import HLC
from protocol.registry import Registration, register_write

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.procs import free_port, stop_all

KEYS_RE = re.compile(r"^meshnode_catalog_keys (\S+)$", re.M)
SENT_RE = re.compile(r"^meshnode_gossip_sent_bytes(?:_total)? (\S+)$", re.M)



def synthesise(data_dir: Path, node_id: str, keys: int) -> None:
    """A data dir whose saved state holds ``keys`` registrations written by ``node_id``."""
    data_dir.mkdir(parents=True, mode=0o750)
    cat = Catalog(node_id, 1)
    hlc = HLC(node_id)
    now_ms = int(time.time() * 1000)
    for i in range(keys):
        writes, _ = register_write(f"bench/sync-{i:06d}", Registration("llm", None, {"description": f"model {i}"}),
                                   None, hlc, now_ms)
        for k, v in writes:
            cat.set(k, v, 0.0)
    StateFile(data_dir).save(SavedState(node_id=node_id, generation=1, hlc_wall_ms=hlc.high_water_ms,
                                        catalog=cat.snapshot([node_id])))


async def metric(client: httpx.AsyncClient, url: str, rx: re.Pattern[str]) -> float:
    try:
        m = rx.search((await client.get(url + "/metrics")).text)
    except httpx.HTTPError:
        return -1.0
    return float(m.group(1)) if m else -1.0


async def run(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="meshnode-sync-"))
    t = time.monotonic()
    synthesise(root / "full", "full", args.keys)
    print(f"synthesised {args.keys} registrations into a data dir in {time.monotonic() - t:.1f} s")
    ports = {"full": free_port(), "empty": free_port()}
    procs: list[subprocess.Popen[bytes]] = []

    def start(node: str, *extra: str) -> None:
        cmd = [sys.executable, "-m", "meshnode", "--log-level", "WARNING", "start", "--node-id", node,
               "--port", str(ports[node]), "--data-port", str(free_port()), "--data-dir", str(root / node), *extra]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(root / f"{node}.log", "wb")))

    urls = {n: f"http://127.0.0.1:{p}" for n, p in ports.items()}
    try:
        start("full")
        async with httpx.AsyncClient(timeout=10) as client:
            with trio.fail_after(120):
                while await metric(client, urls["full"], KEYS_RE) < args.keys:
                    await trio.sleep(0.2)
            start("empty", "--join", f"127.0.0.1:{ports['full']}")
            t0 = time.monotonic()
            with trio.fail_after(60):
                while await metric(client, urls["empty"], KEYS_RE) < 0:
                    await trio.sleep(0.05)
            ready = time.monotonic() - t0
            t0 = time.monotonic()
            took = None
            last = 0.0
            with trio.move_on_after(args.timeout):
                while True:
                    want = await metric(client, urls["full"], KEYS_RE)
                    have = await metric(client, urls["empty"], KEYS_RE)
                    if have != last:
                        last = have
                    if have >= want > 0:
                        took = time.monotonic() - t0
                        break
                    await trio.sleep(0.1)
            sent = await metric(client, urls["full"], SENT_RE)
            models = (await client.get(urls["empty"] + "/models", params={"limit": 1})).json().get("total_count")
        print(f"empty node up in {ready:.1f} s; then:")
        print(f"{'figure':<44} {'measured':>10} {'target':>8}")
        if took is None:
            print(f"{'seconds until in sync':<44} {'>' + format(args.timeout, '.0f'):>10} {args.target_s:>8.1f}  MISSED"
                  f" ({int(last)} keys after {args.timeout:.0f} s)")
        else:
            verdict = "MET" if took <= args.target_s else "MISSED"
            print(f"{'seconds until in sync':<44} {took:>10.2f} {args.target_s:>8.1f}  {verdict}")
            print(f"{'keys per second':<44} {args.keys / took:>10.0f}")
        print(f"{'models listed by the empty node':<44} {models!s:>10}")
        print(f"{'peer bytes sent by the full node':<44} {sent:>10.0f}")
        return 0 if took is not None and took <= args.target_s else 1
    finally:
        stop_all(procs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--target-s", type=float, default=10.0)
    ap.add_argument("--timeout", type=float, default=120.0, help="give up after this many seconds")
    return trio.run(run, ap.parse_args())


if __name__ == "__main__":
    sys.exit(main())
