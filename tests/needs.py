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
        pytest.fail(f"running as root, yet {why}: .ci/run must install what this test needs")
    pytest.skip(why)
