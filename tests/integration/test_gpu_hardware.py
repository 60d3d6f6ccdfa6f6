"""NVML on real hardware (issue 12): README's ``bench/gpu_proof.py`` line, run as written where
an NVIDIA GPU is at hand.

The node's ``gpus`` record beside nvidia-smi's figures, and a serve on gpu0 whose engine
holds real device memory (the test engine's ``--cuda-mib``) shown in the record and
given back by stop_serve.  Skipped where there is no GPU (CI has none); README.md gives
the figures of the run on an H200.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def readme_line() -> str:
    (line,) = re.findall(r"```sh\n(python3 bench/gpu_proof\.py[^\n]*)\n```", (ROOT / "README.md").read_text())
    return line


def test_readme_shows_the_proof_line() -> None:
    assert readme_line().startswith("python3 bench/gpu_proof.py --vram-mib ")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="no NVIDIA GPU here (nvidia-smi is missing)")
def test_nvml_beside_nvidia_smi_and_a_serve_on_gpu0() -> None:
    r = subprocess.run(readme_line(), shell=True, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "every check passed" in r.stdout
