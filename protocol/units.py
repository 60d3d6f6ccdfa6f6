"""Sizes as people read them: ``human_bytes(25165953)`` is ``24.0 MiB``
(binary units, one decimal, as ``rich`` and ``huggingface_hub`` print them)."""

from __future__ import annotations

__all__ = ["human_bytes"]

_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def human_bytes(n: int | float) -> str:
    """``512 B``, ``1.5 KiB``, ``24.0 MiB``, ``1.2 GiB``; negative sizes keep their sign."""
    sign, v = ("-", -float(n)) if n < 0 else ("", float(n))
    if v < 1024:
        return f"{sign}{v:.0f} B"
    unit = "B"
    for unit in _UNITS:
        v /= 1024
        if v < 1024 or unit == _UNITS[-1]:
            break
    return f"{sign}{v:.1f} {unit}"
