"""``--log-format json``: every line a node writes is one JSON object, and no
secret it was given appears in any of them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

EXE = str(Path(sys.executable).parent / "meshnode")
TOKEN = "tok-" + "Zq8" * 16
SECRET = "sec-" + "Wv3" * 16


def test_a_node_logs_json_lines_and_no_secret(tmp_path: Path) -> None:
    p = subprocess.Popen([EXE, "start", "--node-id", "j1", "--port", "0", "--data-dir", str(tmp_path / "d"),
                          "--dram-dir", str(tmp_path / "shm"), "--api-tokens", TOKEN, "--cluster-secret", SECRET,
                          "--log-format", "json"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert p.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "listening on" in line:
                break
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=20)
        lines += out.splitlines()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    records = [json.loads(x) for x in lines if x.strip()]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any("listening on" in r["message"] for r in records)
    assert any("stopped" in r["message"] for r in records)
    text = "".join(lines)
    assert TOKEN not in text and SECRET not in text
