"""A large catalog on one node: 100,000 models with copies on 1,000 nodes.

    .venv/bin/python bench/large_catalog.py [--models 100000] [--nodes 1000] [--gets 300]

Two parts, each against issue 25's targets (MET / MISSED):

1. **Held.**  A child process runs the daemon (``MeshNode``, as ``meshnode
   start`` does) on a data dir whose saved state holds ``--models``
   registrations of its own (synthesised, as ``bench/catalog_sync.py`` does).
   Once it is ready, the child feeds its catalog the states of ``--nodes``
   other nodes as gossip would (one reset delta each, through the same
   ``Catalog.apply_delta``), holding one copy record of every model between
   them, and the members as dead (on a closed loopback port: nothing leaves
   this machine).  The bench then reads the child's RSS (target 1 GiB) and
   times ``GET /models?limit=100`` ``--gets`` times, one after another
   (target p99 50 ms), and a page further in with ``offset``.
2. **Restart.**  The child is killed with SIGKILL; ``meshnode start`` on the
   same data dir until ``/ready`` answers (target 10 s), and the size of the
   snapshot and log it keeps is printed.  (The other nodes' records are not
   kept on disk: peers send them again.)
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.catalog_sync import synthesise
from bench.procs import free_port

MiB = 1024 * 1024


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def child(args: argparse.Namespace) -> None:
    """The daemon in this process, its catalog fed ``--nodes`` nodes' copies."""
    import logging

    import trio

    logging.basicConfig(level=logging.WARNING)

    from meshnode.config import add_start_arguments, config_from_args
    from meshnode.daemon import MeshNode
    from protocol.keys import CopyRecord, copy_key
    from protocol.wire import DeltaEntry, MemberRecord, MemberState, MemberUpdate, NodeDelta

    p = argparse.ArgumentParser()
    add_start_arguments(p)
    cfg = config_from_args(p.parse_args(["--node-id", "big", "--port", str(args.port), "--data-port",
                                         str(free_port()), "--data-dir", args.data_dir, "--dram-dir",
                                         args.data_dir + "-shm"]), env={})
    node = MeshNode(cfg)

    async def main() -> None:
        async with trio.open_nursery() as n:
            await n.start(node.run)
            assert node.mesh is not None
            g = node.mesh.gossip
            now = trio.current_time()
            ms = int(time.time() * 1000)
            per = -(-args.models // args.nodes)
            for j in range(args.nodes):
                nid = f"n{j:04d}"
                g.members.merge(MemberUpdate(MemberRecord(nid, "127.0.0.1:9", 1, 0, MemberState.DEAD)), now)
                entries = tuple(
                    DeltaEntry(copy_key(f"bench/sync-{i:06d}", "disk"), v + 1,
                               CopyRecord(f"{i:016x}{j:016x}", 1 << 30, 4, 64 * MiB, ms).to_value(), False)
                    for v, i in enumerate(range(j * per, min((j + 1) * per, args.models)))
                )
                g.catalog.apply_delta(NodeDelta(nid, 1, 0, len(entries), 0, True, entries), now)
            print("fed", flush=True)
            await trio.sleep_forever()

    trio.run(main)


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise SystemExit(f"the node exited ({proc.returncode}) before it was ready")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    return float("inf")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=100_000)
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--gets", type=int, default=300)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    root = Path(tempfile.mkdtemp(prefix="meshnode-large-"))
    data = root / "big"
    t = time.monotonic()
    synthesise(data, "big", args.models)
    print(f"synthesised {args.models} registrations into a data dir in {time.monotonic() - t:.1f} s", flush=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    rows: list[tuple[str, str, str, bool | None]] = []
    proc = subprocess.Popen([sys.executable, __file__, "--child", "--port", str(port), "--data-dir", str(data),
                             "--models", str(args.models), "--nodes", str(args.nodes)],
                            stdout=subprocess.PIPE, stderr=open(root / "child.log", "wb"))
    try:
        assert proc.stdout is not None
        t = time.monotonic()
        if proc.stdout.readline().strip() != b"fed":
            raise SystemExit(f"the child failed: see {root / 'child.log'}")
        print(f"daemon up and fed {args.nodes} nodes' copies in {time.monotonic() - t:.1f} s", flush=True)
        with httpx.Client(timeout=10) as client:
            first = client.get(url + "/models", params={"limit": 100}).json()
            total = first.get("total_count")
            with_copies = sum(1 for m in first["models"] if m.get("copies") or m.get("locations"))
            times = []
            for i in range(args.gets):
                params = {"limit": 100} if i % 2 == 0 else {"limit": 100, "offset": (i * 997) % args.models}
                t = time.perf_counter()
                r = client.get(url + "/models", params=params)
                times.append(time.perf_counter() - t)
                r.raise_for_status()
        rss = rss_bytes(proc.pid)
        rows.append(("models listed (total_count)", str(total), str(args.models), total == args.models))
        rows.append(("of the first page, models showing a copy", str(with_copies), "printed", None))
        rows.append(("RSS of the daemon holding it", f"{rss / MiB:.0f} MiB", "1024 MiB", rss <= 1024 * MiB))
        rows.append((f"GET /models?limit=100 p99 over {args.gets} (p50)",
                     f"{1000 * pct(times, 99):.1f} ms ({1000 * pct(times, 50):.1f})", "50 ms", pct(times, 99) < 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc = subprocess.Popen([sys.executable, "-m", "meshnode", "--log-level", "WARNING", "start", "--node-id",
                                 "big", "--port", str(port), "--data-port", str(free_port()), "--data-dir", str(data),
                                 "--dram-dir", str(data) + "-shm"], stdout=subprocess.DEVNULL,
                                stderr=open(root / "restart.log", "wb"))
        ready = wait_ready(url, proc, 60)
        rows.append(("restart after SIGKILL until /ready", f"{ready:.2f} s", "10 s", ready < 10))
        snap = sum(f.stat().st_size for f in data.glob("state.msgpack"))
        logb = sum(f.stat().st_size for f in data.glob("state.log"))
        rows.append(("snapshot + log on disk", f"{snap / MiB:.1f} + {logb / MiB:.1f} MiB", "printed", None))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(f"{'figure':<52} {'measured':<20} {'target':<10}")
    for what, value, target, ok in rows:
        print(f"{what:<52} {value:<20} {target:<10} {'' if ok is None else ('MET' if ok else 'MISSED')}")
    print(f"({os.cpu_count()} CPUs, shared with other work: timings are rough)")
    return 1 if any(ok is False for *_, ok in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
