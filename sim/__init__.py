"""A deterministic simulator that drives ``protocol/`` with many nodes and faults.

Everything runs on virtual time from one seed; nothing here imports the
daemon (``meshnode``) or does I/O.  ``python -m sim`` runs it.
"""

from __future__ import annotations

from .clock import SimClock
from .engine import SimConfig, Simulation, Write
from .network import Network

__all__ = ["Network", "SimClock", "SimConfig", "Simulation", "Write"]
