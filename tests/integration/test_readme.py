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
    """`./scripts/demo`: three nodes with pretend GPUs on loopback run gswarm's
    deployment pipeline submitted to node3 (download, copy to node2, serve on
    node2:gpu0, health check); node3 is killed mid-copy and the job still
    completes, byte-identical; a chat completion asked of node1 is answered by
    node2's engine; top and the dashboard's address; node3 back at a higher
    generation; all leave cleanly."""
    first, second = _first_block()
    assert (first, second) == ("./scripts/demo", "./scripts/test")
    r = subprocess.run(first, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "job deploy.yaml --peer" in out and "taken by node3" in out, out[-3000:]
    assert re.search(r"node3 killed with SIGKILL while node2 was copying \(\d+\.\d MiB in\)", out), out[-3000:]
    assert re.search(r"completed [\d.]+ s after its coordinator died, now coordinated by node[12]", out), out[-3000:]
    assert "node2:disk holds demo/tiny-llm (byte-identical)" in out, out[-3000:]
    assert re.search(r"/v1/chat/completions -> 200, answered by node2:\d+", out), out[-3000:]
    assert "meshnode top --count 1" in out and re.search(r"the dashboard: open http://127\.0\.0\.1:\d+/", out)
    gens = re.search(r"node3 generation (\d+) -> (\d+)", out)
    assert gens is not None and int(gens.group(2)) > int(gens.group(1))
    assert out.count(" left ") >= 2 and "demo finished" in out


def test_the_secret_recipe_runs_as_written() -> None:
    """README's Security table tells how to make a token or a cluster secret."""
    (cmd,) = re.findall(r"`(python3 -c '[^`]*')`", (ROOT / "README.md").read_text())
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=30, check=True)
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}\n", r.stdout)  # 32 random bytes: 256 bits
