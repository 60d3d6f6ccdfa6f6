"""One error vocabulary: codes to statuses, and finding errors inside trio's groups."""

from __future__ import annotations

import re
from pathlib import Path

import trio

from meshnode.errors import STATUS, Code, MeshError, first_mesh_error, first_of, only


def test_a_code_has_one_status() -> None:
    assert MeshError("NO_SPACE", "full").status == STATUS["NO_SPACE"] == 507
    assert MeshError("SOMETHING_NEW", "?").status == 500  # an unknown code is our bug, not the client's
    assert MeshError("NOT_FOUND", "x", status=410).status == 410


def test_errors_are_found_inside_groups_by_split() -> None:
    nested = BaseExceptionGroup("outer", [ValueError(1), BaseExceptionGroup("inner", [MeshError("NO_SPACE", "full"),
                                                                                      KeyboardInterrupt()])])
    found = first_mesh_error(nested)
    assert found is not None and found.code == "NO_SPACE"
    assert isinstance(first_of(nested, KeyboardInterrupt), KeyboardInterrupt)
    assert first_of(nested, lambda x: isinstance(x, OSError)) is None
    assert first_of(ValueError(), ValueError) is not None and first_of(ValueError(), OSError) is None
    assert first_mesh_error(ValueError()) is None


def test_only_cancellations_mean_a_stop_not_a_failure() -> None:
    assert only(BaseExceptionGroup("g", [KeyboardInterrupt(), KeyboardInterrupt()]), KeyboardInterrupt)
    assert not only(BaseExceptionGroup("g", [KeyboardInterrupt(), ValueError()]), KeyboardInterrupt)
    assert only(MeshError("X", "y"), (MeshError, trio.Cancelled))
    assert not only(ValueError(), trio.Cancelled)


RAISED = re.compile(
    r"\b(?:MeshError|ServeError|SourceError|StoreError|TransferError|TargetRefused|HealthError)\(\s*\"([A-Z][A-Z0-9_]+)\""
    r"|\b_error\(\s*\d{3},\s*\"([A-Z][A-Z0-9_]+)\""
    r"|\b_reply\(\s*send,\s*\d{3},\s*\"([A-Z][A-Z0-9_]+)\""
    r"|\bcode=\"([A-Z][A-Z0-9_]+)\"")


def test_every_code_raised_anywhere_is_one_with_a_status() -> None:
    """Scan the daemon and the protocol for every code an error is raised with:
    each is a ``Code`` (so the API never answers one as a 500 by accident)."""
    root = Path(__file__).resolve().parents[2]
    seen: dict[str, str] = {}
    for path in [*root.glob("meshnode/**/*.py"), *root.glob("protocol/**/*.py")]:
        for m in RAISED.finditer(path.read_text()):
            code = next(g for g in m.groups() if g)
            seen.setdefault(code, str(path.relative_to(root)))
    assert len(seen) > 40  # the scan finds them
    missing = {c: where for c, where in seen.items() if c not in STATUS}
    assert not missing, f"codes raised without a status in meshnode.errors.Code: {missing}"
    assert {c.value for c in Code} == set(STATUS) and all(400 <= c.status < 600 for c in Code)
    for code in ("BAD_CHUNK", "BAD_CONTENT", "INCOMPLETE", "NO_SOURCE", "SOURCE_CHANGED", "SOURCE_CORRUPT",
                 "TOO_MANY_FILES", "UNAVAILABLE", "UNHEALTHY"):  # once answered as 500
        assert MeshError(code, "x").status != 500
