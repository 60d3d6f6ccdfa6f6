"""30 real daemons on loopback: gossip intervals from a registration's
acknowledgement until every node shows it.

    .venv/bin/python bench/converge.py [--nodes 30] [--trials 10] [--interval 0.5]

Each node is a separate ``meshnode start`` process.  After the mesh has
settled (every node sees every other alive), the benchmark registers a model
on a random node and polls every node (every ``--poll`` seconds, in parallel)
until all of them show it.  It prints, per trial and in summary, the time and
the number of gossip intervals it took, beside the target (5 intervals) and
the push-pull epidemic estimate for N nodes, log3(N) + ln(ln(N)) rounds
(Karp et al.), as the reference.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.procs import free_port, stop_all


async def wait_all(client: httpx.AsyncClient, urls: list[str], path: str, poll_s: float, timeout_s: float) -> float:
    t0 = trio.current_time()
    pending = set(urls)
    with trio.fail_after(timeout_s):
        while pending:
            done: set[str] = set()

            async def check(u: str, done: set[str] = done) -> None:
                try:
                    if (await client.get(u + path)).status_code == 200:
                        done.add(u)
                except httpx.HTTPError:
                    pass

            async with trio.open_nursery() as n:
                for u in pending:
                    n.start_soon(check, u)
            pending -= done
            if pending:
                await trio.sleep(poll_s)
    return trio.current_time() - t0


async def settled(client: httpx.AsyncClient, urls: list[str], n: int) -> bool:
    views: dict[str, int] = {}
    for u in urls:
        try:
            nodes = (await client.get(u + "/nodes")).json()["nodes"]
        except (httpx.HTTPError, ValueError, KeyError):
            views["unreachable"] = views.get("unreachable", 0) + 1
            continue
        for x in nodes:
            views[x["state"]] = views.get(x["state"], 0) + 1
    print("  member views:", dict(sorted(views.items())), flush=True)
    return views.get("alive", 0) == n * n


async def run(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="meshnode-bench-"))
    ports = [free_port() for _ in range(args.nodes)]
    procs: list[subprocess.Popen[bytes]] = []
    seeds = ",".join(f"127.0.0.1:{p}" for p in ports[:3])
    try:
        for i, port in enumerate(ports):
            cmd = [sys.executable, "-m", "meshnode", "--log-level", "WARNING", "start", "--node-id", f"n{i:02d}",
                   "--port", str(port), "--data-port", str(free_port()), "--data-dir", str(root / f"n{i:02d}"),
                   "--gossip-interval", str(args.interval), "--join", seeds]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(root / f"n{i:02d}.log", "wb")))
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        async with httpx.AsyncClient(timeout=5, limits=httpx.Limits(max_connections=200)) as client:
            t0 = time.monotonic()
            with trio.fail_after(120):
                while not await settled(client, urls, args.nodes):
                    await trio.sleep(0.5)
            print(f"{args.nodes} daemons settled (all alive everywhere) in {time.monotonic() - t0:.1f} s")
            rng = random.Random(args.seed)
            rounds = []
            print(f"{'trial':>5} {'origin':>6} {'seconds':>8} {'intervals':>9}")
            for t in range(args.trials):
                origin = rng.randrange(args.nodes)
                name = f"bench-{t}-{rng.getrandbits(32):08x}"
                r = await client.post(urls[origin] + f"/models/{name}/register", json={"model_type": "llm"})
                r.raise_for_status()
                secs = await wait_all(client, urls, f"/models/{name}", args.poll, 60)
                rounds.append(secs / args.interval)
                print(f"{t:>5} {f'n{origin:02d}':>6} {secs:>8.2f} {secs / args.interval:>9.1f}")
                await trio.sleep(args.interval * 2)
        n = args.nodes
        epidemic = math.log(n, 3) + math.log(math.log(n))
        print()
        print(f"{'figure':<44} {'measured':>9} {'reference':>10} {'ratio':>6}")
        for label, v in (("intervals to converge, median", statistics.median(rounds)), ("intervals to converge, max", max(rounds))):
            print(f"{label:<44} {v:>9.1f} {5.0:>10.1f} {v / 5.0:>6.2f}  (target 5)")
        print(f"{'push-pull epidemic estimate log3 N + ln ln N':<44} {'':>9} {epidemic:>10.1f}")
        print(f"(poll resolution {args.poll / args.interval:.1f} interval; figures include it)")
        return 0 if max(rounds) <= 5 else 1
    finally:
        stop_all(procs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=30)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--interval", type=float, default=0.5, help="gossip interval, seconds (the default)")
    ap.add_argument("--poll", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=1)
    return trio.run(run, ap.parse_args())


if __name__ == "__main__":
    sys.exit(main())
