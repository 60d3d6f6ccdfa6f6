"""The data plane against nginx (sendfile on) + curl on loopback, one 2 GiB file.

    .venv/bin/python bench/p2p_vs_nginx.py [--size-gib 2] [--chunks-mib auto,1,64] [--conns 4]

Reference: nginx with ``sendfile on`` serves the file and ``curl -s -o OUT``
fetches it (best and median of ``--runs``).  Ours: a DataServer in its own
process (a peer is another host; on one machine it is at least another
process) and a DataClient with ``--conns`` parallel connections that fetches
every chunk, verifies its xxh3-128, ``os.pwrite``s it into a temp file, then
fsyncs and renames it to its final name (the published copy); all of it timed.
The file is real bytes (a 64 MiB random block repeated), read once beforehand
so it is in the page cache; everything lives in one temp dir on one
filesystem and is removed at the end.  nginx is started with its own minimal
config, prefix and pid file in that temp dir (``daemon off``), and stopped.

Also printed: the cost of xxh3-128 (CPU seconds per GB, and the share of one
core it takes at 100 MB/s; the target is under 5%), and the TLS path (at the
chunk size a manifest of this size picks: 8 MiB for 2 GiB) against the plain
one in alternating runs, and against nginx serving the file over TLS to curl.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import trio
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshnode.copies.dataplane import DataClient, DataServer
from protocol.manifest import choose_chunk_bytes

MiB = 1024 * 1024
GB = 1e9
BLOCK = 64 * MiB


# --- the server process -------------------------------------------------------------------


class OneFileResolver:
    """Serves one file; the manifest hash carries the chunk size (a bench-only shortcut)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.size = os.path.getsize(path)

    def locate(self, manifest_hash_hex: str, index: int) -> tuple[str, int, int] | None:
        chunk = int(manifest_hash_hex, 16)
        offset = index * chunk
        if chunk <= 0 or offset >= self.size:
            return None
        return self.path, offset, min(chunk, self.size - offset)

    def have(self, manifest_hash_hex: str) -> bytes | None:
        return None


def manifest_for(chunk_bytes: int) -> str:
    return f"{chunk_bytes:032x}"


def serve_main(path: str, tls_dir: str | None) -> None:
    ctx = None
    if tls_dir:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(os.path.join(tls_dir, "server.pem"))

    async def main() -> None:
        server = DataServer(OneFileResolver(path), ("bench-secret",), ssl_context=ctx)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(server.serve, "127.0.0.1", 0)
                print(port, flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(main)


@contextlib.contextmanager
def data_server(path: Path, tls_dir: Path | None = None) -> Iterator[int]:
    argv = [sys.executable, __file__, "--serve", str(path)]
    if tls_dir is not None:
        argv += ["--tls-dir", str(tls_dir)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- nginx + curl ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def ensure_nginx() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
    )
    if found:
        return found
    print("nginx missing: apt-get install nginx-light", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "nginx-light"], check=True, env=env)
    return shutil.which("nginx") or "/usr/sbin/nginx"


@contextlib.contextmanager
def nginx(root: Path, work: Path, tls_dir: Path | None = None) -> Iterator[tuple[int, int | None]]:
    """nginx serving ``root``: (plain port, TLS port or None)."""
    port = free_port()
    tls_port = free_port() if tls_dir is not None else None
    tls_server = (
        f"""
    server {{
        listen 127.0.0.1:{tls_port} ssl;
        ssl_certificate {tls_dir / "cert.pem"};
        ssl_certificate_key {tls_dir / "key.pem"};
        root {root};
        location / {{ }}
    }}"""
        if tls_dir is not None
        else ""
    )
    prefix = work / "nginx"
    (prefix / "logs").mkdir(parents=True)
    temps = "\n".join(
        f"    {name}_temp_path {prefix / name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user root;" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"""{user}
daemon off;
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "logs" / "error.log"} warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
{temps}
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}{tls_server}
}}
"""
    )
    proc = subprocess.Popen(
        [
            ensure_nginx(),
            "-p",
            str(prefix),
            "-c",
            str(conf),
            "-e",
            str(prefix / "logs" / "error.log"),
        ]
    )
    try:
        wait_listening(port)
        if tls_port is not None:
            wait_listening(tls_port)
        yield port, tls_port
    finally:
        stop(proc)


def curl_once(port: int, out: Path | None, fsync: bool, cacert: Path | None = None) -> float:
    start = time.perf_counter()
    target = "/dev/null" if out is None else str(out)
    if cacert is None:
        url, tls = f"http://127.0.0.1:{port}/file", []
    else:
        url, tls = f"https://127.0.0.1:{port}/file", ["--cacert", str(cacert)]
    subprocess.run(["curl", "-s", "-f", *tls, "-o", target, url], check=True)
    if out is None:
        return time.perf_counter() - start
    if fsync:
        fd = os.open(out, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    elapsed = time.perf_counter() - start
    out.unlink()
    return elapsed


# --- ours ---------------------------------------------------------------------------------------


async def fetch_all(
    port: int,
    size: int,
    chunk_bytes: int,
    digests: list[bytes],
    conns: int,
    work: Path,
    client_ctx: ssl.SSLContext | None,
    buffers: list[bytearray],
    to_disk: bool = True,
) -> float:
    """Fetch, verify, pwrite every chunk, fsync, rename; returns the seconds it took.

    ``to_disk=False`` only fetches and verifies (the data plane alone, no page-cache writes).
    """
    peer = f"127.0.0.1:{port}"
    manifest = manifest_for(chunk_bytes)
    partial = work / "copy.partial"
    final = work / "copy"
    n_chunks = len(digests)
    next_index = 0
    start = time.perf_counter()
    client = DataClient(("bench-secret",), ssl_context=client_ctx)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:

        async def worker(buf: bytearray) -> None:
            nonlocal next_index
            while next_index < n_chunks:
                index = next_index
                next_index += 1
                offset = index * chunk_bytes
                length = min(chunk_bytes, size - offset)
                view = await client.fetch_chunk(peer, manifest, index, length, digests[index], buf)
                # Written only after the digest matched; in a thread, so the next receive overlaps it.
                if to_disk:
                    await trio.to_thread.run_sync(os.pwrite, fd, view, offset)

        async with trio.open_nursery() as nursery:
            for buf in buffers[:conns]:
                nursery.start_soon(worker, buf)
        if to_disk:
            await trio.to_thread.run_sync(os.fsync, fd)
    finally:
        os.close(fd)
        await client.aclose()
    os.rename(partial, final)
    elapsed = time.perf_counter() - start
    final.unlink()
    return elapsed


def chunk_digests(path: Path, chunk_bytes: int) -> list[bytes]:
    out = []
    with open(path, "rb") as f:
        while piece := f.read(chunk_bytes):
            out.append(xxhash.xxh3_128(piece).digest())
    return out


def hash_cost() -> tuple[float, float]:
    """CPU seconds of xxh3-128 per GB, over a 16 MiB buffer as the receiver hashes it."""
    buf = os.urandom(16 * MiB)
    rounds = 64
    xxhash.xxh3_128(buf).digest()
    start = time.process_time()
    h = xxhash.xxh3_128()
    view = memoryview(buf)
    for _ in range(rounds):
        for off in range(0, len(buf), 256 * 1024):  # as reads arrive: 256 KiB pieces
            h.update(view[off : off + 256 * 1024])
    h.digest()
    cpu_s = time.process_time() - start
    per_gb = cpu_s / (rounds * len(buf) / GB)
    return per_gb, per_gb * 0.1  # at 100 MB/s: 0.1 GB per second of wall time


# --- the table -------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    chunk: str
    conns: str
    times: list[float]

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def touched_buffers(count: int, size: int) -> list[bytearray]:
    """Receive buffers, faulted in beforehand: a transfer keeps its buffers for its whole life."""
    out = []
    for _ in range(count):
        buf = bytearray(size)
        buf[:] = b"\x01" * size
        out.append(buf)
    return out


def warm_memory(n_bytes: int) -> None:
    """Touch and free ``n_bytes`` of anonymous memory.

    On a VM whose memory the host backs on first touch (this one: fresh pages
    cost ~200 MB/s, about 10x the cost of reused ones), the first run to write
    new page-cache pages pays for it, whoever it is; touching memory first
    keeps that out of both the reference and ours.
    """
    if n_bytes < BLOCK:
        return
    block = b"\x01" * BLOCK
    m = mmap.mmap(-1, n_bytes)
    try:
        for off in range(0, n_bytes - BLOCK + 1, BLOCK):
            m[off : off + BLOCK] = block
    finally:
        m.close()


def make_file(path: Path, size: int) -> None:
    block = os.urandom(BLOCK)
    with open(path, "wb") as f:
        written = 0
        while written < size:
            n = min(BLOCK, size - written)
            f.write(block[:n])
            written += n
    with open(path, "rb") as f:  # read it once, so it is in the page cache
        while f.read(BLOCK):
            pass


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument(
        "--chunks-mib",
        default="auto,1,64",
        help="comma-separated chunk sizes in MiB; auto: what a manifest of this size picks",
    )
    ap.add_argument("--conns", default="4", help="comma-separated parallel connection counts")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-tls", action="store_true")
    ap.add_argument(
        "--warm-gib", type=float, default=None, help="memory to touch first (default 3x the file)"
    )
    ap.add_argument(
        "--dir", default=None, help="where the temp dir goes (default: the system temp dir)"
    )
    ap.add_argument("--serve", metavar="FILE", help=argparse.SUPPRESS)
    ap.add_argument("--tls-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve_main(args.serve, args.tls_dir)
        return

    size = int(args.size_gib * 1024 * MiB)
    chunks = sorted({
        choose_chunk_bytes(size) if c.strip() == "auto" else int(c) * MiB
        for c in args.chunks_mib.split(",")
    })
    conn_counts = [int(c) for c in args.conns.split(",")]
    warm_bytes = int(
        (args.warm_gib if args.warm_gib is not None else 3 * args.size_gib) * 1024 * MiB
    )
    start = time.perf_counter()
    warm_memory(warm_bytes)
    warm_s = time.perf_counter() - start
    work = Path(tempfile.mkdtemp(prefix="meshnode-bench-", dir=args.dir))
    rows: list[Row] = []
    try:
        root = work / "www"
        root.mkdir()
        src = root / "file"
        make_file(src, size)

        tls_dir: Path | None = None
        if not args.no_tls:
            import trustme

            ca = trustme.CA()
            tls_dir = work / "tls"
            tls_dir.mkdir()
            cert = ca.issue_cert("127.0.0.1")
            cert.private_key_and_cert_chain_pem.write_to_path(str(tls_dir / "server.pem"))
            cert.cert_chain_pems[0].write_to_path(str(tls_dir / "cert.pem"))
            cert.private_key_pem.write_to_path(str(tls_dir / "key.pem"))
            ca.cert_pem.write_to_path(str(tls_dir / "ca.pem"))
        with nginx(root, work, tls_dir) as (port, tls_port):
            for fsync in (False, True):
                times = [curl_once(port, work / "curl.out", fsync) for _ in range(args.runs)]
                rows.append(
                    Row("nginx sendfile + curl -o" + (" + fsync" if fsync else ""), "-", "1", times)
                )
            times = [curl_once(port, None, False) for _ in range(args.runs)]
            rows.append(Row("nginx sendfile + curl -o /dev/null", "-", "1", times))
            if tls_port is not None and tls_dir is not None:
                times = [curl_once(tls_port, work / "curl.out", False, tls_dir / "ca.pem") for _ in range(args.runs)]
                rows.append(Row("nginx + curl -o, over TLS", "-", "1", times))
        reference = rows[0].best

        with data_server(src) as port:
            for chunk in chunks:
                digests = chunk_digests(src, chunk)
                buffers = touched_buffers(max(conn_counts), chunk)
                for conns in conn_counts:
                    times = [
                        trio.run(fetch_all, port, size, chunk, digests, conns, work, None, buffers)
                        for _ in range(args.runs)
                    ]
                    rows.append(
                        Row(
                            "ours: fetch+xxh3+pwrite+fsync+rename",
                            f"{chunk // MiB} MiB",
                            str(conns),
                            times,
                        )
                    )
                    times = [
                        trio.run(
                            fetch_all, port, size, chunk, digests, conns, work, None, buffers, False
                        )
                        for _ in range(args.runs)
                    ]
                    rows.append(
                        Row(
                            "ours: fetch+xxh3 only (no disk)",
                            f"{chunk // MiB} MiB",
                            str(conns),
                            times,
                        )
                    )

        paired: list[float] = []
        if tls_dir is not None:
            client_ctx = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
            chunk = choose_chunk_bytes(size)  # what a manifest of this size picks
            digests = chunk_digests(src, chunk)
            conns = conn_counts[-1]
            buffers = touched_buffers(conns, chunk)
            # Plain and TLS runs alternate, so that the page cache's mood of the
            # moment (it varies a lot on this VM) weighs on both alike.
            tls_disk, tls_net, plain_disk = [], [], []
            with data_server(src) as plain_port, data_server(src, tls_dir) as port:
                for _ in range(args.runs):
                    plain_disk.append(trio.run(fetch_all, plain_port, size, chunk, digests, conns, work, None, buffers))
                    tls_disk.append(trio.run(fetch_all, port, size, chunk, digests, conns, work, client_ctx, buffers))
                    paired.append(plain_disk[-1] / tls_disk[-1])
                    tls_net.append(
                        trio.run(fetch_all, port, size, chunk, digests, conns, work, client_ctx, buffers, False)
                    )
            rows.append(Row("ours, paired with TLS below", f"{chunk // MiB} MiB", str(conns), plain_disk))
            rows.append(Row("ours over TLS (same, plus encryption)", f"{chunk // MiB} MiB", str(conns), tls_disk))
            rows.append(Row("ours over TLS: fetch+xxh3 only", f"{chunk // MiB} MiB", str(conns), tls_net))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    per_gb, share = hash_cost()
    print()
    print(
        f"{size / GB:.2f} GB file in page cache, loopback, {os.cpu_count()} cores, best and median of {args.runs} runs"
    )
    print(
        f"(touched {warm_bytes / GB:.1f} GB of memory first, in {warm_s:.1f} s: {warm_bytes / GB / warm_s:.2f} GB/s)"
    )
    print()
    header = f"{'run':<40} {'chunk':>7} {'conns':>5} {'best s':>7} {'median s':>8} {'GB/s':>6} {'vs nginx':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        gbps = size / GB / r.best
        print(
            f"{r.name:<40} {r.chunk:>7} {r.conns:>5} {r.best:>7.3f} {r.median:>8.3f} {gbps:>6.2f} {reference / r.best:>7.2f}x"
        )
    print()
    if paired:
        print(
            f"TLS / plain, to disk, {len(paired)} paired runs: median {statistics.median(paired):.2f}x the plain "
            f"data plane's rate ({min(paired):.2f} to {max(paired):.2f}; target >= 0.6x)"
        )
    nginx_tls = next((r for r in rows if r.name == "nginx + curl -o, over TLS"), None)
    ours_tls = next((r for r in rows if r.name == "ours over TLS (same, plus encryption)"), None)
    if nginx_tls is not None and ours_tls is not None:
        print(f"ours over TLS / nginx + curl over TLS: {nginx_tls.best / ours_tls.best:.2f}x")
    print(
        f"xxh3-128: {per_gb:.4f} CPU s per GB; at 100 MB/s that is {share * 100:.2f}% of one core (target < 5%)"
    )


if __name__ == "__main__":
    main()
