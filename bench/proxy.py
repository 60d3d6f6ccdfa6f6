"""Inference through any node against straight to the engine.

    .venv/bin/python bench/proxy.py [--requests 500] [--concurrency 16]

Two ``meshnode start`` processes on loopback with fake GPUs; node1 serves a
small model with the test engine (``tests/engine/fake_engine.py``, through
the ``command`` template).  The same completion request (8 tokens, no
streaming delay) is sent ``--requests`` times one after another, then with
``--concurrency`` at once, three ways: straight to the engine (the
reference), through node1 (the engine's own node), and through node2 (one
more hop).  Printed: p50 and p99 latency, requests per second, and each
against the reference; then 64 at once (errors, p99 against direct); then a
stream of ``--tokens`` tokens sent as fast as the engine can (tokens per
second and the first token's time against direct); with ``--real-engine``
the same against llama.cpp's server (llama-cpp-python, a tiny GGUF).  Each
target of issue 27 is printed MET or MISSED.  Everything shares one
machine's cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.jobs import mesh, row
from tests.engine.fake_engine import write_model

ROOT = Path(__file__).resolve().parent.parent
ENGINE = str(ROOT / "tests" / "engine" / "fake_engine.py")


async def burst(url: str, body: bytes, n: int, concurrency: int) -> tuple[list[float], int]:
    """Latencies of ``n`` requests, ``concurrency`` at once, and how many failed."""
    lat: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits, trust_env=False) as c:
        left = n

        async def worker() -> None:
            nonlocal left, errors
            while left > 0:
                left -= 1
                t = time.perf_counter()
                try:
                    r = await c.post(url, content=body, headers={"content-type": "application/json"})
                    if r.status_code != 200:
                        errors += 1
                except httpx.HTTPError:
                    errors += 1
                lat.append(time.perf_counter() - t)

        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
    return lat, errors


async def stream(url: str, model: str, tokens: int, runs: int) -> tuple[float, float]:
    """Median first-token time (s) and tokens per second of a streamed completion of ``tokens``."""
    body = json.dumps({"model": model, "prompt": "hello", "max_tokens": tokens, "stream": True}).encode()
    firsts, rates = [], []
    async with httpx.AsyncClient(timeout=120, trust_env=False) as c:
        for _ in range(runs + 1):
            t0 = time.perf_counter()
            first = None
            n = 0
            async with c.stream("POST", url, content=body, headers={"content-type": "application/json"}) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        if first is None:
                            first = time.perf_counter() - t0
                        n += 1
            total = time.perf_counter() - t0
            if _ == 0:
                continue  # warm
            firsts.append(first or total)
            rates.append(n / total)
    return statistics.median(firsts), statistics.median(rates)


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


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
    ap.add_argument("--tokens", type=int, default=2000, help="tokens in the streamed completion")
    ap.add_argument("--stream-runs", type=int, default=5)
    ap.add_argument("--real-engine", action="store_true", help="also llama.cpp's server (llama-cpp-python)")
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
            far_lat, far_rps = results[ways[2][0]]
            print("\nTargets (issue 27), through another node:")
            row(">= 0.90x the direct throughput at 16 at once", f"{far_rps / ref_rps:.2f}x",
                verdict(far_rps / ref_rps >= 0.90))
            row("<= +0.5 ms p50", f"+{pct(far_lat, 0.5) - pct(ref_lat, 0.5):.2f} ms",
                verdict(pct(far_lat, 0.5) - pct(ref_lat, 0.5) <= 0.5))
            wide = {label: trio.run(burst, base + "/v1/completions", body, max(args.requests, 256), 64)
                    for label, base in (ways[0], ways[2])}
            (d_lat, d_err), (f_lat, f_err) = wide[ways[0][0]], wide[ways[2][0]]
            row("64 at once: no error, p99 <= 3x direct",
                f"{f_err} errors, p99 {pct(f_lat, 0.99):.1f} ms vs {pct(d_lat, 0.99):.1f} ms",
                verdict(f_err == 0 and d_err == 0 and pct(f_lat, 0.99) <= 3 * pct(d_lat, 0.99)))
            streams = {label: trio.run(stream, base + "/v1/completions", "bench/tiny", args.tokens, args.stream_runs)
                       for label, base in ways}
            (d_first, d_rate), (f_first, f_rate) = streams[ways[0][0]], streams[ways[2][0]]
            print(f"\nStreaming {args.tokens} tokens as fast as the engine sends them (median of {args.stream_runs}):")
            for label, _base in ways:
                first, rate = streams[label]
                row(label, f"first token {first * 1000:.2f} ms  {rate:,.0f} tokens/s",
                    "" if label == ways[0][0] else f"{rate / d_rate:.2f}x the tokens/s")
            row("tokens/s through another node >= 0.95x direct", f"{f_rate / d_rate:.2f}x",
                verdict(f_rate / d_rate >= 0.95))
            row("first token <= +1 ms", f"+{(f_first - d_first) * 1000:.2f} ms", verdict(f_first - d_first <= 0.001))
            if args.real_engine:
                real_engine(c, nodes, root, args.requests)
        finally:
            for n in nodes:
                n.stop()
    return 0


def real_engine(c: httpx.Client, nodes: list[Any], root: Path, requests: int) -> None:
    """The same completions against llama.cpp's server on a tiny GGUF: direct
    and through another node, side by side with the test engine's."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("gguf") is None:
        print("\nllama-cpp-python is not installed: no real engine (pip install -e '.[real-engine]')")
        return
    from tests.engine.tiny_gguf import write_tiny_gguf

    src = root / "import" / "gguf"
    src.mkdir(parents=True)
    write_tiny_gguf(src / "tiny.gguf")
    c.post(nodes[0].url + "/models/bench/gguf/download",
           json={"source_url": src.as_uri(), "target_device": "node1:disk"}).raise_for_status()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", "{model_dir}/tiny.gguf", "--host", "{host}",
               "--port", "{port}", "--model_alias", "{model_name}", "--n_ctx", "128"]
    t0 = time.monotonic()
    while True:
        r = c.post(nodes[0].url + "/models/bench/gguf/services",
                   json={"device": "node1:gpu0", "config": {"engine": "command", "command": command,
                                                            "startup_timeout_s": 120}})
        if r.status_code == 202:
            break
        if time.monotonic() - t0 > 30:
            raise SystemExit(f"the llama.cpp serve was refused: {r.text}")
        time.sleep(0.2)
    port = r.json()["port"]
    while True:
        s = [x for x in c.get(nodes[1].url + "/services").json()["services"] if x["model_name"] == "bench/gguf"]
        if s and s[0]["state"] == "healthy":
            break
        if time.monotonic() - t0 > 150:
            raise SystemExit(f"llama.cpp did not become healthy: {s}")
        time.sleep(0.5)
    body = json.dumps({"model": "bench/gguf", "prompt": "hello", "max_tokens": 8}).encode()
    n = max(requests // 5, 20)
    direct = trio.run(measure, f"http://127.0.0.1:{port}/v1/completions", body, n, 4)
    far = trio.run(measure, nodes[1].url + "/v1/completions", body, n, 4)
    print(f"\nllama.cpp's server (tiny GGUF, 8 tokens), {n} requests one by one, then 4 at once:")
    row("straight to llama.cpp", f"p50 {pct(direct[0], 0.5):.2f} ms  {direct[1]:.0f} req/s")
    row("through node2 (one more hop)", f"p50 {pct(far[0], 0.5):.2f} ms  {far[1]:.0f} req/s",
        f"+{pct(far[0], 0.5) - pct(direct[0], 0.5):.2f} ms p50, {far[1] / direct[1]:.2f}x the throughput")


if __name__ == "__main__":
    sys.exit(main())
