"""``meshnode top`` on a terminal (a pseudo-terminal here) against a real
node: it draws a frame, then redraws it in place (rich's live display)."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

from .test_process import Proc

EXE = str(Path(sys.executable).parent / "meshnode")


def test_top_redraws_in_place_on_a_terminal(tmp_path: Path) -> None:
    node = Proc("top-a", tmp_path).start()
    try:
        main, sub = pty.openpty()
        env = {**os.environ, "COLUMNS": "140", "LINES": "60", "TERM": "xterm-256color",
               "XDG_STATE_HOME": str(tmp_path / "state")}  # no last write of another test's mesh
        p = subprocess.Popen([EXE, "--peer", node.url, "top", "--count", "3", "--interval", "0.2"],
                             stdin=sub, stdout=sub, stderr=sub, env=env, close_fds=True)
        os.close(sub)
        out = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(main, 65536)
                except OSError:  # the terminal closed: the program ended
                    break
                if not chunk:
                    break
                out += chunk
            elif p.poll() is not None:  # ended, and nothing more to read
                break
        assert p.wait(timeout=10) == 0, out[-2000:]
        os.close(main)
        text = out.decode(errors="replace")
        assert "nodes (1)" in text and "top-a" in text
        assert "\x1b[2K" in text or "\x1b[1A" in text  # the frame was redrawn, not printed again below
    finally:
        node.kill()
