"""README.md's benchmark commands, each run exactly as written.

A benchmark's figures are its own business (wall-clock targets are not
asserted here): the test checks that the command runs to the end and prints
the table README quotes, so a flag or an output that README names cannot
rot.  The simulator's targets are in simulated time, so ``sim bench`` must
meet them; the network-namespace swarm needs root, and nginx for the HTTP
reference is installed by the benchmark itself when missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from bench.swarm_netns import netns_usable
from tests.needs import unavailable

ROOT = Path(__file__).resolve().parents[2]

# The start of each README line, what its output must show, and the exit codes it may end with
# (converge.py exits 1 when the wall-clock rounds miss its target: a figure, not a failure here).
EXPECT: dict[str, tuple[str, tuple[int, ...]]] = {
    ".venv/bin/python -m sim bench": (r"targets missed: 0", (0,)),
    ".venv/bin/python -m sim sweep": (r"runs with violations: 0;", (0,)),
    ".venv/bin/python -m sim jobs": (r"runs with violations +\| 0 ", (0,)),
    ".venv/bin/python -m sim gpus": (r"engine change late: 0\n", (0,)),
    ".venv/bin/python -m sim serving": (r"violations: 0\n", (0,)),
    ".venv/bin/python -m sim replicas": (r"flaps \(add, drop, add\) +\| 0 [\s\S]*violations: 0\n", (0,)),
    ".venv/bin/python -m sim eviction": (r"fetched, LRU / random +\| [\d.]+x[\s\S]*violations: 0\n", (0,)),
    ".venv/bin/python bench/converge.py": (r"intervals to converge, median +[\d.]+", (0, 1)),
    ".venv/bin/python bench/p2p_vs_nginx.py": (r"ours over TLS / nginx \+ curl over TLS: [\d.]+x", (0,)),
    ".venv/bin/python bench/registry.py": (r"\n +1000 +[\d.]+ +\d+", (0,)),
    ".venv/bin/python bench/swarm_netns.py": (r"all copies identical +yes", (0,)),
    ".venv/bin/python bench/jobs.py": (r"job status +completed[\s\S]*parts run twice +0 ", (0,)),
    ".venv/bin/python bench/s3.py": (r"three nodes: bytes served by S3 = 1\.00x the object", (0,)),
    ".venv/bin/python bench/proxy.py": (r"through node2 \(one more hop\) +p50 [\d.]+ ms", (0,)),
    ".venv/bin/python bench/affinity.py": (r"time to first token, round-robin / affinity +p50 [\d.]+x", (0,)),
    ".venv/bin/python bench/bundles.py": (r"export \| import over tar cf - \| tar xf -: [\d.]+x", (0,)),
    ".venv/bin/python bench/catalog_sync.py": (r"seconds until in sync +[\d.]+ ", (0, 1)),
    ".venv/bin/python bench/flood.py": (r"one write seen on a third node, p99 s +[\d.]+ ", (0, 1)),
    # A restart must never hide a key: 0 404s whatever the timing.
    ".venv/bin/python bench/restart.py": (r"404s for a model the restarted node holds +0 ", (0, 1)),
    ".venv/bin/python bench/large_catalog.py": (r"models listed \(total_count\) +5000 ", (0, 1)),
    ".venv/bin/python bench/mesh_scale.py": (r"targets missed: 0", (0,)),
}


def bench_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```sh\n(\.venv/bin/python -m sim bench.*?)```", text, re.S)
    assert block is not None, "README's benchmark block"
    return [ln.split("#")[0].strip() for ln in block.group(1).splitlines() if ln.strip()]


def test_every_benchmark_line_is_covered() -> None:
    lines = bench_lines()
    swarm = [ln for ln in lines if ln.startswith(".venv/bin/python -m sim swarm")]
    assert len(swarm) == 1  # run by tests/sim/test_sim.py::test_the_readme_swarm_command_runs_as_written
    assert sorted(k for k in EXPECT if any(ln.startswith(k) for ln in lines)) == sorted(EXPECT)
    assert len(lines) == len(EXPECT) + 1


@pytest.mark.parametrize("start", sorted(EXPECT))
def test_the_benchmark_runs_as_written(start: str) -> None:
    (line,) = [ln for ln in bench_lines() if ln.startswith(start)]
    if "swarm_netns" in line:
        why = netns_usable()
        if why is not None:
            unavailable(why)
    if "p2p_vs_nginx" in line and shutil.which("nginx") is None and os.geteuid() != 0:
        pytest.skip("nginx is not installed, and only root may install it")
    r = subprocess.run(line, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    pattern, codes = EXPECT[start]
    assert r.returncode in codes, out[-3000:]
    assert re.search(pattern, out), out[-3000:]
