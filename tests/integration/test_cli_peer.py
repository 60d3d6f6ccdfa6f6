"""The CLI pointed at a node's data port says it is not an API port and exits 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .test_process import NO_HUB, Proc


def test_the_data_port_is_not_an_api_port(tmp_path: Path) -> None:
    a = Proc("cp", tmp_path, None, env=NO_HUB).start()
    try:
        r = subprocess.run([sys.executable, "-m", "meshnode", "--peer", f"http://127.0.0.1:{a.data_port}", "nodes"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        assert "not a meshnode API port" in r.stderr and "data port" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        ok = subprocess.run([sys.executable, "-m", "meshnode", "--peer", a.url, "nodes"], capture_output=True,
                            text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr
    finally:
        a.term()
