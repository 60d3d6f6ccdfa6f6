"""The registry's write and read paths as the catalog grows.

For each size N a fresh ``meshnode start`` process is filled to N models;
then, against that node:

* registrations per second: 300 more registrations from 8 concurrent
  clients (each acknowledged only once durable, so this includes the write to
  disk);
* GET /models/{name} under 200 clients, each asking for a random model twice
  a second (400 requests/s, open loop: latency counts from the moment a
  request was due, so a slow server cannot hide its queue), for 10 s: p50 and
  p99.

The reference is the same run at the smallest N: a write path that does not
grow with the catalog keeps the ratios near 1 (target: within 2x from 100 to
10,000 models, and GET p99 under 50 ms).

    python bench/registry.py [--sizes 100,1000,10000] [--clients 200] [--rate 2]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Node:
    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "node.log"
        cmd = [sys.executable, "-m", "meshnode", "--log-level", "WARNING", "start", "--node-id", "bench",
               "--port", str(self.port), "--data-port", str(free_port()),
               "--data-dir", str(root / "data"), "--dram-dir", str(root / "shm"),
               "--write-rate", "0"]  # it measures the write path: no per-client limit
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"node did not start:\n{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


class RawClient:
    """A bare HTTP/1.1 keep-alive client on one connection: cheap enough that
    hundreds of them in this process measure the server, not themselves (an
    httpx client tops out at a few hundred requests a second here)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.stream: trio.SocketStream | None = None
        self.buf = b""

    reconnects = 0  # keep-alive connections the server had closed, over all clients

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        """One request; on a reused connection the server had closed, one retry on a new one."""
        reused = self.stream is not None
        try:
            return await self._request(method, path, body)
        except (ConnectionError, trio.BrokenResourceError):
            if not reused:
                raise
            RawClient.reconnects += 1
            await self.aclose()
            return await self._request(method, path, body)

    async def _request(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        if self.stream is None:
            self.stream = await trio.open_tcp_stream(self.host, self.port)
            self.buf = b""
        head = f"{method} {path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-length: {len(body)}\r\n"
        if body:
            head += "content-type: application/json\r\n"
        await self.stream.send_all(head.encode() + b"\r\n" + body)
        while b"\r\n\r\n" not in self.buf:
            await self._fill()
        raw_head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = raw_head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = dict(line.lower().split(b": ", 1) for line in lines[1:])
        length = int(headers.get(b"content-length", b"0"))
        while len(self.buf) < length:
            await self._fill()
        data, self.buf = self.buf[:length], self.buf[length:]
        if headers.get(b"connection") == b"close":
            await self.aclose()
        return status, data

    async def _fill(self) -> None:
        assert self.stream is not None
        chunk = await self.stream.receive_some(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buf += chunk

    async def aclose(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()
            self.stream = None


async def register_many(port: int, names: list[str], clients: int) -> float:
    """Register ``names`` from ``clients`` concurrent clients; seconds taken."""
    queue = list(names)

    async def worker() -> None:
        c = RawClient("127.0.0.1", port)
        while queue:
            name = queue.pop()
            body = json.dumps({"model_type": "llm", "metadata": {"description": f"model {name}", "tags": ["bench"]}})
            status, data = await c.request("POST", f"/models/{name}/register", body.encode())
            if status != 201:
                raise RuntimeError(f"register {name}: {status} {data[:200]!r}")
        await c.aclose()

    t0 = time.perf_counter()
    async with trio.open_nursery() as n:
        for _ in range(clients):
            n.start_soon(worker)
    return time.perf_counter() - t0


async def read_latency(port: int, names: list[str], clients: int, rate_hz: float, duration_s: float) -> list[float]:
    """Open-loop GETs: each client asks for a random model every 1/rate s;
    each latency counts from when its request was due."""
    lat: list[float] = []

    start = trio.Event()
    connected = 0

    async def client(i: int) -> None:
        nonlocal connected
        rng = random.Random(i)
        c = RawClient("127.0.0.1", port)
        await c.request("GET", "/health")  # connected before the clock starts: steady-state clients
        connected += 1
        if connected == clients:
            start.set()
        await start.wait()
        due = trio.current_time() + rng.random() / rate_hz  # spread the clients' phases
        end = trio.current_time() + duration_s
        while due < end:
            await trio.sleep_until(due)
            status, data = await c.request("GET", f"/models/{rng.choice(names)}")
            if status != 200:
                raise RuntimeError(f"GET: {status} {data[:200]!r}")
            lat.append(trio.current_time() - due)
            due += 1 / rate_hz
        await c.aclose()

    async with trio.open_nursery() as n:
        for i in range(clients):
            n.start_soon(client, i)
    return lat


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def run_size(n: int, clients: int, rate_hz: float, duration_s: float) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="mn-registry-"))
    node = Node(root)
    try:
        names = [f"org{i % 97}/model-{i}" for i in range(n)]
        fill_s = trio.run(register_many, node.port, names, 8)
        extra = [f"extra/model-{i}" for i in range(300)]
        reg_s = trio.run(register_many, node.port, extra, 8)
        lat = trio.run(read_latency, node.port, names, clients, rate_hz, duration_s)
        return {"n": n, "fill_s": fill_s, "reg_per_s": len(extra) / reg_s, "get_p50_ms": pct(lat, 50) * 1000,
                "get_p99_ms": pct(lat, 99) * 1000, "gets": len(lat), "reconnects": RawClient.reconnects}
    finally:
        node.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--rate", type=float, default=2.0, help="GETs per second per client")
    ap.add_argument("--duration", type=float, default=10.0)
    args = ap.parse_args()
    rows = []
    for size in args.sizes.split(","):
        RawClient.reconnects = 0
        rows.append(run_size(int(size), args.clients, args.rate, args.duration))
    ref = rows[0]
    print(f"\nregistry at N models: {args.clients} readers at {args.rate:g}/s each, 8 writers")
    print(f"{'models':>8} {'fill s':>8} {'reg/s':>8} {'x ref':>6} {'GET p50 ms':>11} {'GET p99 ms':>11} {'x ref':>6} {'reconn':>6}")
    for r in rows:
        print(f"{r['n']:>8} {r['fill_s']:>8.1f} {r['reg_per_s']:>8.0f} {ref['reg_per_s'] / r['reg_per_s']:>6.2f} "
              f"{r['get_p50_ms']:>11.1f} {r['get_p99_ms']:>11.1f} {r['get_p99_ms'] / ref['get_p99_ms']:>6.2f} "
              f"{r['reconnects']:>6}")
    print("(x ref: how many times slower than at the smallest N; the target is within 2x, and GET p99 under 50 ms;")
    print(" reconn: keep-alive connections the server had closed, retried once on a new one)")


if __name__ == "__main__":
    main()
