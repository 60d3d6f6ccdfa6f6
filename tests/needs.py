"""What to do when a test cannot get what it needs (root, ``ip``, a mount)."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def unavailable(why: str) -> NoReturn:
    """Skip, unless this runs as root: CI runs as root and installs what the
    tests need (``.ci/run``), so there a missing piece is a failure that a
    skip would hide."""
    if os.geteuid() == 0:
        pytest.fail(f"running as root, yet {why}: scripts/system-deps (which ./scripts/test runs) must install "
                    "what this test needs")
    pytest.skip(f"{why}; install what the tests need with: sudo scripts/system-deps")
