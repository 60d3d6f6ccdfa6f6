"""What every CLI command shares to print: the exit codes, one error line
(``fail``; JSON with ``--json``), the consoles, and values from a peer shown
defensively (a missing or odd field prints ``-``).
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.text import Text

from protocol import units

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "PROG",
    "STATE_STYLES",
    "UsageError",
    "as_dict",
    "as_number",
    "errors_as_json",
    "fail",
    "human_bytes",
    "human_duration",
    "name_list",
    "stderr_console",
    "stdout_console",
    "styled",
    "when",
]

PROG = "meshnode"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 2
EXIT_INTERRUPTED = 130

# Width for tables when stdout is not a terminal, so names are not folded.
PIPE_WIDTH = 160

STATE_STYLES = {
    "alive": "green",
    "suspect": "yellow",
    "dead": "red",
    "left": "dim",
    "online": "green",
    "offline": "red",
    "ready": "green",
    "available": "green",
    "downloading": "yellow",
    "pending": "yellow",
    "registered": "cyan",
    "failed": "red",
    "error": "red",
    "queued": "yellow",
    "running": "cyan",
    "done": "green",
    "recorded": "dim",
}


class UsageError(Exception):
    """A problem with what the user typed that argparse could not see."""


_errors_as_json = False


def errors_as_json(on: bool) -> None:
    """``--json``: errors too are JSON, ``{"error": {"code", "message"}}`` (one line on stderr)."""
    global _errors_as_json
    _errors_as_json = on


def fail(message: str, code: int, error_code: str | None = None, **details: Any) -> int:
    """Print one error line on stderr; return ``code``.  No message holds the
    token: ``ApiClient`` refuses a token it could not send and redacts one a
    peer echoes.  ``error_code`` names the error for ``--json`` (the peer's
    code for an answer, else from the exit code)."""
    if _errors_as_json:
        name = error_code or ("USAGE" if code == EXIT_USAGE else "ERROR")
        print(json.dumps({"error": {"code": name, "message": message, "exit_code": code, **details}},
                         ensure_ascii=False), file=sys.stderr)
    else:
        print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def human_bytes(value: Any) -> str:
    """``1536`` -> ``"1.5 KiB"``; anything that is not a number -> ``"-"``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    return units.human_bytes(value)


def as_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def human_duration(seconds: Any) -> str:
    """``83`` -> ``"1m23s"``; ``7500`` -> ``"2h05m"``; not a number -> ``"-"``."""
    value = as_number(seconds)
    if value is None or value < 0:
        return "-"
    total = round(value)
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def styled(value: Any) -> Text:
    text = "-" if value is None else str(value)
    return Text(text, style=STATE_STYLES.get(text.lower(), ""))


def when(ms: Any) -> str:
    value = as_number(ms)
    if not value:
        return "-"
    return datetime.fromtimestamp(value / 1000).isoformat(sep=" ", timespec="seconds")


def name_list(items: Any) -> list[str]:
    """Lists of strings or of dicts (``{"device": ...}``, ``{"node_id": ...}``) -> strings."""
    if not isinstance(items, list):
        return []
    out: list[str] = []
    for item in items:
        if isinstance(item, dict):
            for key in ("device", "model_name", "name", "node_id", "id", "url", "endpoint"):
                if item.get(key) is not None:
                    out.append(str(item[key]))
                    break
            else:
                out.append(json.dumps(item, sort_keys=True))
        else:
            out.append(str(item))
    return out


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def stdout_console() -> Console:
    console = Console(file=sys.stdout, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(file=sys.stdout, highlight=False, width=PIPE_WIDTH)
    return console


def stderr_console() -> Console:
    return Console(file=sys.stderr, highlight=False)

