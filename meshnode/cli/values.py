"""Small value parsers for the command line (argparse types and environment values)."""

from __future__ import annotations

import argparse

from ..config import parse_size

__all__ = ["LOG_LEVELS", "log_level", "parse_bytes", "positive_float"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def parse_bytes(text: str) -> int:
    """``"16GiB"``, ``"16G"``, ``"1500000"`` -> bytes (argparse type)."""
    try:
        return int(parse_size(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {text!r}")
    return value


def replica_count(text: str) -> int:
    """A number of copies: 0 or more, or -1 for every eligible node."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < -1:
        raise argparse.ArgumentTypeError(f"a number of copies, or -1 for every node: {text!r}")
    return value


def log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"unknown log level {text!r} (one of {', '.join(LOG_LEVELS)})")
    return level
