"""Bundles against tar: export and import of a model, as an operator runs them,
beside ``tar cf - DIR | tar xf -`` of the same files on this machine.

    .venv/bin/python bench/bundles.py [--size-mib 256] [--runs 3]

A model of ``--size-mib`` in four files sits in one node's disk tier (two
``meshnode start`` processes on loopback, each a mesh of its own: the second
is the air-gapped side).  Timed, each the median of ``--runs``:

1. the reference: ``tar cf - SRC | tar xf - -C DST`` (tar reads the files,
   writes the copy; no hash, no fsync), and the same followed by ``sync``
   (the copy on disk, as an import leaves it: tar's own time ends while its
   bytes are still in the page cache);
2. ``meshnode export m -o - | meshnode import - --to b:disk``: the first node
   reads its copy and checks every chunk (xxh3) and hashes every file
   (sha256) as it streams; the second checks every chunk and every file again
   as they land, writes, fsyncs and publishes the copy, registers it and
   gossips it;
3. the two halves alone: ``export -o FILE`` against ``tar cf FILE SRC``, and
   ``import FILE`` against ``tar xf FILE``.

The ratio printed is tar's time over ours (1.0: as fast as tar; target 0.8
or more).  The page cache holds the source throughout (it is read once
before timing); the copy that an import made is deleted between runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.jobs import EXE, Node

MiB = 1024 * 1024
MODEL = "bench/bundle"


def sh(cmd: str, cwd: Path | None = None) -> None:
    r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"failed: {cmd}\n{r.stdout[-2000:]}{r.stderr[-2000:]}")


def timed(fn: Callable[[], None], before: Callable[[], None], runs: int) -> float:
    """The median wall time of ``runs`` calls of ``fn``, each after ``before``."""
    times = []
    for _ in range(runs):
        before()
        os.sync()  # each run starts with nothing of the others' left to write back (an fsync would wait for it)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    if os.environ.get("BENCH_VERBOSE"):
        print("   ", " ".join(f"{t:.2f}" for t in times), file=sys.stderr)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if not 1 <= args.size_mib <= 65536 or not 1 <= args.runs <= 20:
        ap.error("--size-mib 1 to 65536, --runs 1 to 20")
    for tool in ("tar", "bash"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    work = Path(tempfile.mkdtemp(prefix="bench-bundles-"))
    nodes: list[Node] = []
    try:
        src = work / "src"
        src.mkdir()
        sizes = {"model-00001-of-00003.safetensors": 0.45, "model-00002-of-00003.safetensors": 0.45,
                 "model-00003-of-00003.safetensors": 0.0999, "config.json": 0.0001}
        for name, share in sizes.items():
            with open(src / name, "wb") as f:
                left = max(1, int(args.size_mib * MiB * share))
                while left:
                    n = min(left, 16 * MiB)
                    f.write(os.urandom(n))
                    left -= n
        total = sum(p.stat().st_size for p in src.iterdir())
        root = work / "nodes"
        root.mkdir()
        c = httpx.Client(timeout=60)
        a = Node(root, "a", None)
        nodes.append(a)
        a.wait_up(c)
        b = Node(root, "b", None)
        nodes.append(b)
        b.wait_up(c)
        r = c.post(a.url + f"/models/{MODEL}/download", json={"source_url": src.as_uri(), "target_device": "a:disk"})
        r.raise_for_status()
        tid = r.json()["transfer_id"]
        while (t := c.get(a.url + f"/transfers/{tid}").json())["status"] not in ("done", "failed"):
            time.sleep(0.05)
        if t["status"] != "done":
            raise SystemExit(f"the model did not get into node a: {t.get('error')}")
        sh(f"cat {src}/* > /dev/null")  # the page cache holds the source, for tar and for us alike

        dst = work / "dst"
        bundle = work / "m.bundle"
        tarball = work / "m.tar"

        def fresh_dst() -> None:
            shutil.rmtree(dst, ignore_errors=True)
            dst.mkdir()

        def no_copy_on_b() -> None:
            c.delete(b.url + f"/models/{MODEL}", params={"device": "b:disk"})
            c.delete(b.url + f"/models/{MODEL}")

        def both() -> None:
            fresh_dst()
            no_copy_on_b()

        peer = ["--log-level", "WARNING"]
        tar_pipe = timed(lambda: sh(f"tar cf - -C {work} src | tar xf - -C {dst}"), fresh_dst, args.runs)
        tar_sync = timed(lambda: sh(f"tar cf - -C {work} src | tar xf - -C {dst} && sync"), fresh_dst, args.runs)
        ours_pipe = timed(lambda: sh(f"{EXE} export {MODEL} -o - --peer {a.url} {' '.join(peer)} | "
                                     f"{EXE} import - --to b:disk --peer {b.url} {' '.join(peer)}"), both, args.runs)
        tar_c = timed(lambda: sh(f"tar cf {tarball} -C {work} src"), lambda: tarball.unlink(missing_ok=True),
                      args.runs)
        ours_c = timed(lambda: sh(f"{EXE} export {MODEL} -o {bundle} --peer {a.url} {' '.join(peer)}"),
                       lambda: bundle.unlink(missing_ok=True), args.runs)
        tar_x = timed(lambda: sh(f"tar xf {tarball} -C {dst}"), fresh_dst, args.runs)
        ours_x = timed(lambda: sh(f"{EXE} import {bundle} --to b:disk --peer {b.url} {' '.join(peer)}"),
                       no_copy_on_b, args.runs)
        got = c.get(b.url + f"/models/{MODEL}").json()
        if got.get("locations") != ["b:disk"]:
            raise SystemExit(f"the import did not leave the copy on b: {got}")

        def row(label: str, ours: float, ref: float) -> None:
            print(f"  {label:<44} ours {ours:7.2f} s ({total / ours / 1e6:7.0f} MB/s)   tar {ref:7.2f} s"
                  f" ({total / ref / 1e6:7.0f} MB/s)   ratio {ref / ours:.2f}x")

        print(f"bundles vs tar: {total / MiB:.0f} MiB in {len(sizes)} files, median of {args.runs} run(s)")
        row("export | import  vs  tar cf - | tar xf -", ours_pipe, tar_pipe)
        row("export | import  vs  the same, then sync", ours_pipe, tar_sync)
        row("export -o FILE  vs  tar cf FILE", ours_c, tar_c)
        row("import FILE  vs  tar xf FILE", ours_x, tar_x)
        ratio = tar_pipe / ours_pipe
        print(f"export | import over tar cf - | tar xf -: {ratio:.2f}x (target 0.8x: "
              f"{'MET' if ratio >= 0.8 else 'MISSED'}); over tar, then sync (the copy on disk, as an import "
              f"leaves it): {tar_sync / ours_pipe:.2f}x")
        return 0
    finally:
        for node in nodes:
            node.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
