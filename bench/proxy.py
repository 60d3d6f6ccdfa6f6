"""Inference through any node against straight to the engine.

    .venv/bin/python bench/proxy.py [--requests 500] [--concurrency 16]

Two ``meshnode start`` processes on loopback with fake GPUs; node1 serves a
small model with the test engine (``tests/engine/fake_engine.py``, through
the ``command`` template).  The same completion request (8 tokens, no
streaming delay) is sent ``--requests`` times one after another, then with
``--concurrency`` at once, three ways: straight to the engine (the
reference), through node1 (the engine's own node), and through node2 (one
more hop).  Printed: p50 and p99 latency, requests per second, and each
against the reference.  Everything shares one machine's cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.jobs import mesh, row
from tests.engine.fake_engine import write_model

ROOT = Path(__file__).resolve().parent.parent
ENGINE = str(ROOT / "tests" / "engine" / "fake_engine.py")


async def measure(url: str, body: bytes, n: int, concurrency: int) -> tuple[list[float], float]:
    """Latencies of ``n`` requests one by one; requests per second with ``concurrency`` at once."""
    lat = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=30, limits=limits, trust_env=False) as c:
        for _ in range(20):  # warm the connections
            (await c.post(url, content=body, headers={"content-type": "application/json"})).raise_for_status()
        for _ in range(n):
            t = time.perf_counter()
            r = await c.post(url, content=body, headers={"content-type": "application/json"})
            lat.append(time.perf_counter() - t)
            r.raise_for_status()
        left = n

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                (await c.post(url, content=body, headers={"content-type": "application/json"})).raise_for_status()

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
        rps = n / (time.perf_counter() - t0)
    return lat, rps


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(int(q * len(s)), len(s) - 1)] * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    if not 10 <= args.requests <= 100_000 or not 1 <= args.concurrency <= 256:
        ap.error("--requests 10 to 100000, --concurrency 1 to 256")
    extra = ["--fake-gpus", "1x24GiB", "--engines", "command", "--gpu-interval", "0.5"]
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp, httpx.Client(timeout=30) as c:
        root = Path(tmp)
        src = root / "import" / "tiny"
        write_model(src, size=1 << 20)
        nodes = mesh(root / "two", 2, c, {"node1": extra, "node2": extra})
        try:
            r = c.post(nodes[0].url + "/models/bench/tiny/download",
                       json={"source_url": src.as_uri(), "target_device": "node1:disk"})
            r.raise_for_status()
            command = [sys.executable, ENGINE, "--model-dir", "{model_dir}", "--port", "{port}", "--host", "{host}",
                       "--served-model-name", "{model_name}", "--stream-delay", "0"]
            t0 = time.monotonic()
            while True:
                r = c.post(nodes[0].url + "/models/bench/tiny/services",
                           json={"device": "node1:gpu0", "config": {"engine": "command", "command": command}})
                if r.status_code == 202:
                    break
                if time.monotonic() - t0 > 30:
                    raise SystemExit(f"the serve was refused: {r.text}")
                time.sleep(0.2)  # the copy is still arriving
            svc = r.json()
            while True:
                s = c.get(nodes[1].url + "/services").json()["services"]
                if s and s[0]["state"] == "healthy":
                    break
                if time.monotonic() - t0 > 60:
                    raise SystemExit(f"the engine did not become healthy: {s}")
                time.sleep(0.2)
            body = json.dumps({"model": "bench/tiny", "prompt": "hello", "max_tokens": 8}).encode()
            ways = [("straight to the engine", svc["url"]), ("through node1 (the engine's node)", nodes[0].url),
                    ("through node2 (one more hop)", nodes[1].url)]
            results = {}
            for label, base in ways:
                results[label] = trio.run(measure, base + "/v1/completions", body, args.requests, args.concurrency)
            ref_lat, ref_rps = results[ways[0][0]]
            print(f"\nInference: {args.requests} completions one by one, then {args.concurrency} at once")
            for label, _base in ways:
                lat, rps = results[label]
                row(label, f"p50 {pct(lat, 0.5):.2f} ms  p99 {pct(lat, 0.99):.2f} ms  {rps:.0f} req/s",
                    "" if label == ways[0][0] else
                    f"+{pct(lat, 0.5) - pct(ref_lat, 0.5):.2f} ms p50, {rps / ref_rps:.2f}x the throughput")
            print(f"  mean of the reference: {statistics.mean(ref_lat) * 1000:.2f} ms")
        finally:
            for n in nodes:
                n.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
