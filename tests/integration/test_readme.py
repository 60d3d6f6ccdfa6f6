"""README.md's first command, run exactly as written: the newcomer's demo."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _first_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", text, re.S)
    assert block is not None
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_the_demo_runs_as_written() -> None:
    """`./scripts/demo`: three nodes on loopback copy a model peer to peer
    (byte-identical), one is killed and marked dead, restarts at a higher
    generation, and all leave cleanly."""
    first, second = _first_block()
    assert (first, second) == ("./scripts/demo", "./scripts/test")
    r = subprocess.run(first, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert re.search(r"node3:dram holds .* \(byte-identical\)", out), out[-3000:]
    assert re.search(r"node2 marked dead on node1 and node3 after [\d.]+ s", out), out[-3000:]
    gens = re.search(r"node2 generation (\d+) -> (\d+)", out)
    assert gens is not None and int(gens.group(2)) > int(gens.group(1))
    assert out.count(" left ") >= 2 and "demo finished" in out


def test_the_secret_recipe_runs_as_written() -> None:
    """README's Security table tells how to make a token or a cluster secret."""
    (cmd,) = re.findall(r"`(python3 -c '[^`]*')`", (ROOT / "README.md").read_text())
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=30, check=True)
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}\n", r.stdout)  # 32 random bytes: 256 bits
