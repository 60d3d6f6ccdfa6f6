"""S3 as a source: one node fetching an object against ``aws s3 cp``'s way
with the same client, and three nodes asked at once.

    .venv/bin/python bench/s3.py [--size-mib 1024]

A real S3 API on loopback (moto's server, ``bench/s3server.py``, which
counts the object bytes it sends) holds two objects of ``--size-mib``,
uploaded in 8 MiB parts.

1. Reference: boto3's ``download_file`` (s3transfer: 10 threads, 8 MiB
   ranges, what ``aws s3 cp`` runs), then an fsync, as a copy is fsynced.
2. One node (``meshnode start`` on loopback) downloads the first object
   into its disk tier: listing, ranged fetch, every part's MD5 against the
   ETag, the copy's manifest (xxh3 of every chunk) and its publish.
3. Three nodes asked for the second object at once: the time until all
   three hold it, and the bytes the server sent (target about 1x the
   object: one node fetches it, the others pull it peer to peer).

Every process shares this machine's cores, the S3 server included (it is
Python: it bounds both sides alike).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.jobs import mesh

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent


def wait_done(c: httpx.Client, url: str, tid: str, timeout_s: float = 1800) -> dict[str, Any]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        t: dict[str, Any] = c.get(f"{url}/transfers/{tid}").json()
        if t.get("status") in ("done", "failed"):
            if t["status"] != "done":
                raise SystemExit(f"transfer failed: {t.get('error')}")
            return t
        time.sleep(0.05)
    raise SystemExit("transfer timed out")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    args = ap.parse_args()
    if not 1 <= args.size_mib <= 16384:
        ap.error("--size-mib 1 to 16384")
    size = args.size_mib * MiB
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret", AWS_DEFAULT_REGION="us-east-1")
    import boto3
    from boto3.s3.transfer import TransferConfig

    server = subprocess.Popen([sys.executable, "-m", "bench.s3server", "--port", "0"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    nodes = []
    try:
        assert server.stdout is not None
        endpoint = server.stdout.readline().split()[-1]
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory(prefix="meshnode-s3-") as tmp:
            root = Path(tmp)
            src = root / "object.bin"
            with open(src, "wb") as f:
                for _ in range(args.size_mib):
                    f.write(os.urandom(MiB))
            cfg = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB)
            for key in ("one/weights.bin", "three/weights.bin"):
                s3.upload_file(str(src), "bench", key, Config=cfg)
            src.unlink()
            c = httpx.Client(timeout=30)

            def served() -> int:
                return int(c.get(endpoint + "/__meshnode/stats").json()["object_bytes"])

            # 1. The reference: aws s3 cp's way, the same client.
            before = served()
            t0 = time.perf_counter()
            out = root / "ref.bin"
            s3.download_file("bench", "one/weights.bin", str(out), Config=TransferConfig())
            fd = os.open(out, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            ref_s = time.perf_counter() - t0
            ref_bytes = served() - before
            out.unlink()

            # 2. One node.
            nodes = mesh(root / "mesh", 3, c, extra={f"node{i}": ["--s3-endpoint-url", endpoint] for i in (1, 2, 3)})
            before = served()
            t0 = time.perf_counter()
            r = c.post(nodes[0].url + "/models/one/download",
                       json={"source_url": "s3://bench/one/weights.bin", "target_device": "node1:disk"})
            wait_done(c, nodes[0].url, r.json()["transfer_id"])
            one_s = time.perf_counter() - t0
            one_bytes = served() - before

            # 3. Three nodes at once.
            before = served()
            t0 = time.perf_counter()
            tids = []
            for n in nodes:
                r = c.post(n.url + "/models/three/download",
                           json={"source_url": "s3://bench/three/weights.bin", "target_device": f"{n.name}:disk"})
                tids.append((n.url, r.json()["transfer_id"]))
            for url, tid in tids:
                wait_done(c, url, tid)
            three_s = time.perf_counter() - t0
            three_bytes = served() - before
            c.close()
            for n in nodes:  # before their directories go
                n.stop()
    finally:
        for n in nodes:
            n.stop()
        server.kill()
        server.wait()
        if server.stdout is not None:
            server.stdout.close()
    mb = size / 1e6
    print(f"bench s3: objects of {args.size_mib} MiB in 8 MiB parts on a local S3 API (moto's server)")
    print(f"  {'what':<58} {'time':>8} {'MB/s':>8} {'bytes from S3':>16}")
    for label, secs, nbytes in (("boto3 download_file + fsync (aws s3 cp's way)", ref_s, ref_bytes),
                                ("one node: fetch, check ETag, manifest, publish", one_s, one_bytes),
                                ("three nodes asked at once (all three hold it)", three_s, three_bytes)):
        print(f"  {label:<58} {secs:>7.2f}s {mb / secs:>8.0f} {nbytes:>16,}")
    print(f"one node / boto3 download_file: {one_s / ref_s:.2f}x the time")
    print(f"three nodes: bytes served by S3 = {three_bytes / size:.2f}x the object")
    return 0


if __name__ == "__main__":
    sys.exit(main())
