"""One error vocabulary: codes to statuses, and finding errors inside trio's groups."""

from __future__ import annotations

import trio

from meshnode.errors import STATUS, MeshError, first_mesh_error, first_of, only


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
