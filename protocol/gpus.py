"""GPUs in the catalog: a node's NVML readings, and when one is worth gossiping.

Theory of operation
-------------------
Each node reads its own GPUs every few seconds (``meshnode/gpus.py``: NVML,
or a fake) and keeps one record under its ``gpus`` key: a ``GpusRecord``
holding a ``GpuReading`` per GPU (memory, utilisation, temperature, power,
the processes using it).  A reading is only written when it differs from the
*published* one by more than ``Thresholds`` (``publish_reason``), so a busy
GPU whose figures wobble costs no gossip, and what every peer sees is never
further from the truth than a threshold: the comparison is against what was
last published, not against the last reading, so small drifts cannot add up.
A heartbeat republishes an unchanged reading now and then, so that its age
(``read_ms``) tells a peer the figures are still current.

A read that fails keeps the last figures, marked ``stale`` with the error:
placement can see that a node's VRAM figures are old.

Every value arriving from a peer goes through ``from_value``, which refuses
anything out of shape or beyond the bounds (``MAX_GPUS``, ``MAX_PROCESSES``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from .records import RecordError, field_int, field_list, field_map, field_str

__all__ = [
    "MAX_GPUS",
    "MAX_PROCESSES",
    "GpuProcess",
    "GpuReading",
    "GpusRecord",
    "Thresholds",
    "parse_fake_gpus",
    "publish_reason",
    "readings_within",
]

MAX_GPUS = 64
MAX_PROCESSES = 64  # per GPU; more are counted, not listed
_TEXT_MAX = 200
MiB = 2**20
GiB = 2**30


def _text(raw: Any, what: str, *, optional: bool = False) -> Any:
    return field_str(raw, what, optional=optional, max_chars=_TEXT_MAX)


@dataclass(frozen=True, slots=True)
class GpuProcess:
    pid: int
    used_bytes: int | None  # None where NVML cannot tell (no permission, MIG)

    def to_value(self) -> list[Any]:
        return [self.pid, self.used_bytes]

    @classmethod
    def from_value(cls, raw: Any) -> GpuProcess:
        v = field_list(raw, "gpu process", 2)
        if len(v) != 2:
            raise RecordError("gpu process: expected [pid, used_bytes]")
        return cls(field_int(v[0], "gpu process pid", hi=2**32), field_int(v[1], "gpu process used_bytes", optional=True))


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One GPU as NVML reads it.  Optional figures are None where the GPU or
    the driver does not report them."""

    index: int
    uuid: str
    name: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    util_pct: int | None = None
    mem_util_pct: int | None = None
    temperature_c: int | None = None
    power_mw: int | None = None
    power_limit_mw: int | None = None
    processes: tuple[GpuProcess, ...] = ()
    processes_total: int = 0  # all of them, when more than MAX_PROCESSES

    @property
    def device(self) -> str:
        return f"gpu{self.index}"

    def to_value(self) -> dict[str, Any]:
        return {
            "index": self.index, "uuid": self.uuid, "name": self.name,
            "total_bytes": self.total_bytes, "used_bytes": self.used_bytes, "free_bytes": self.free_bytes,
            "util_pct": self.util_pct, "mem_util_pct": self.mem_util_pct, "temperature_c": self.temperature_c,
            "power_mw": self.power_mw, "power_limit_mw": self.power_limit_mw,
            "processes": [p.to_value() for p in self.processes], "processes_total": self.processes_total,
        }

    @classmethod
    def from_value(cls, raw: Any) -> GpuReading:
        v = field_map(raw, "gpu")
        procs = tuple(GpuProcess.from_value(p) for p in field_list(v.get("processes", []), "gpu processes", MAX_PROCESSES))
        r = cls(
            index=field_int(v.get("index"), "gpu index", hi=MAX_GPUS - 1),
            uuid=_text(v.get("uuid"), "gpu uuid"),
            name=_text(v.get("name"), "gpu name"),
            total_bytes=field_int(v.get("total_bytes"), "gpu total_bytes"),
            used_bytes=field_int(v.get("used_bytes"), "gpu used_bytes"),
            free_bytes=field_int(v.get("free_bytes"), "gpu free_bytes"),
            util_pct=field_int(v.get("util_pct"), "gpu util_pct", optional=True, hi=100),
            mem_util_pct=field_int(v.get("mem_util_pct"), "gpu mem_util_pct", optional=True, hi=100),
            temperature_c=field_int(v.get("temperature_c"), "gpu temperature_c", optional=True, hi=1000),
            power_mw=field_int(v.get("power_mw"), "gpu power_mw", optional=True, hi=10**8),
            power_limit_mw=field_int(v.get("power_limit_mw"), "gpu power_limit_mw", optional=True, hi=10**8),
            processes=procs,
            processes_total=field_int(v.get("processes_total", len(procs)), "gpu processes_total", hi=2**32),
        )
        if r.used_bytes > r.total_bytes or r.free_bytes > r.total_bytes:
            raise RecordError("gpu: used or free above total")
        return r


@dataclass(frozen=True, slots=True)
class GpusRecord:
    """``gpus``: every GPU of one node.  ``source`` is ``nvml`` or ``fake``;
    ``stale`` with ``error`` when the last read failed (the figures are the
    last good ones)."""

    gpus: tuple[GpuReading, ...]
    read_ms: int
    source: str
    stale: bool = False
    error: str | None = None

    def to_value(self) -> dict[str, Any]:
        return {"gpus": [g.to_value() for g in self.gpus], "read_ms": self.read_ms, "source": self.source,
                "stale": self.stale, "error": self.error}

    @classmethod
    def from_value(cls, raw: Any) -> GpusRecord:
        v = field_map(raw, "gpus")
        gpus = tuple(GpuReading.from_value(g) for g in field_list(v.get("gpus"), "gpus", MAX_GPUS))
        if len({g.index for g in gpus}) != len(gpus):
            raise RecordError("gpus: two readings of one index")
        stale = v.get("stale", False)
        if not isinstance(stale, bool):
            raise RecordError("gpus stale: expected true or false")
        return cls(gpus, field_int(v.get("read_ms"), "gpus read_ms"), _text(v.get("source"), "gpus source"), stale,
                   _text(v.get("error"), "gpus error", optional=True))

    def marked_stale(self, error: str, read_ms: int) -> GpusRecord:
        """The last good figures, flagged: a read failed at ``read_ms``."""
        return replace(self, stale=True, error=error[:_TEXT_MAX], read_ms=read_ms)

    def storage_view(self) -> dict[str, dict[str, int]]:
        """``gpuN`` -> total / used / free, beside disk and dram in ``GET /storage``."""
        return {g.device: {"total": g.total_bytes, "used": g.used_bytes, "free": g.free_bytes} for g in self.gpus}


@dataclass(frozen=True, slots=True)
class Thresholds:
    """How far a reading may move from the published one before it is news."""

    memory_bytes: int = 256 * MiB  # or memory_frac of the GPU's total, whichever is larger
    memory_frac: float = 0.02
    util_pct: int = 20
    temperature_c: int = 10
    power_frac: float = 0.20  # of the power limit, or of the published draw without one
    heartbeat_s: float = 60.0

    def memory_step(self, total: int) -> int:
        return max(self.memory_bytes, int(total * self.memory_frac))


def _moved(a: int | None, b: int | None, step: float) -> bool:
    if (a is None) != (b is None):
        return True
    return a is not None and b is not None and abs(a - b) >= step


def _gpu_reason(old: GpuReading, new: GpuReading, th: Thresholds) -> str | None:
    if (old.uuid, old.name, old.total_bytes) != (new.uuid, new.name, new.total_bytes):
        return f"{new.device} changed identity"
    step = th.memory_step(new.total_bytes)
    if _moved(old.used_bytes, new.used_bytes, step) or _moved(old.free_bytes, new.free_bytes, step):
        return f"{new.device} memory moved"
    if {p.pid for p in old.processes} != {p.pid for p in new.processes} or old.processes_total != new.processes_total:
        return f"{new.device} processes changed"
    if any(_moved(a.used_bytes, b.used_bytes, step) for a, b in zip(
            sorted(old.processes, key=lambda p: p.pid), sorted(new.processes, key=lambda p: p.pid), strict=True)):
        return f"{new.device} a process's memory moved"
    if _moved(old.util_pct, new.util_pct, th.util_pct) or _moved(old.mem_util_pct, new.mem_util_pct, th.util_pct):
        return f"{new.device} utilisation moved"
    if _moved(old.temperature_c, new.temperature_c, th.temperature_c):
        return f"{new.device} temperature moved"
    ref = new.power_limit_mw or old.power_mw or 0
    if _moved(old.power_mw, new.power_mw, max(ref * th.power_frac, 1000)) or old.power_limit_mw != new.power_limit_mw:
        return f"{new.device} power moved"
    return None


def publish_reason(published: GpusRecord | None, published_at_s: float, current: GpusRecord, now_s: float,
                   th: Thresholds = Thresholds()) -> str | None:
    """Why ``current`` should replace ``published`` in the catalog, or None.

    New when nothing was published, the set of GPUs or any figure moved past
    its threshold, the stale flag or the error changed, or ``heartbeat_s``
    passed since the last publication."""
    if published is None:
        return "first reading"
    if (published.stale, published.error, published.source) != (current.stale, current.error, current.source):
        return "read failed" if current.stale else "read recovered"
    if [g.index for g in published.gpus] != [g.index for g in current.gpus]:
        return "the set of GPUs changed"
    for old, new in zip(published.gpus, current.gpus, strict=True):
        why = _gpu_reason(old, new, th)
        if why is not None:
            return why
    if now_s - published_at_s >= th.heartbeat_s:
        return "heartbeat"
    return None


_UNITS = {"": GiB, "g": GiB, "gb": GiB, "gib": GiB, "m": MiB, "mb": MiB, "mib": MiB, "t": 2**40, "tb": 2**40,
          "tib": 2**40}
_ONE = re.compile(r"^(?:(\d{1,3})\s*[xX*]\s*)?(\d+(?:\.\d+)?)\s*([a-zA-Z]*)$")


def parse_fake_gpus(spec: str) -> tuple[int, ...]:
    """``--fake-gpus``: ``2x24GiB``, ``24GiB,80GiB`` or ``1x80G`` (G, GB, GiB
    all mean 2**30 bytes; M and T likewise) to each GPU's total bytes.
    Raises ValueError with what is wrong."""
    totals: list[int] = []
    for part in spec.split(","):
        m = _ONE.match(part.strip())
        if m is None:
            raise ValueError(f"--fake-gpus: {part.strip()!r} is not COUNTxSIZE (for instance 2x24GiB)")
        count, size, unit = int(m.group(1) or 1), float(m.group(2)), m.group(3).lower()
        if unit not in _UNITS:
            raise ValueError(f"--fake-gpus: unknown unit {m.group(3)!r} (use MiB, GiB or TiB)")
        total = int(size * _UNITS[unit])
        if count < 1 or not MiB <= total <= 16 * 2**40:
            raise ValueError(f"--fake-gpus: {part.strip()!r}: at least one GPU, each from 1 MiB to 16 TiB")
        totals.extend([total] * count)
        if len(totals) > MAX_GPUS:
            raise ValueError(f"--fake-gpus: at most {MAX_GPUS} GPUs")
    return tuple(totals)


def readings_within(published: Sequence[GpuReading], current: Sequence[GpuReading], th: Thresholds) -> bool:
    """Is every published figure within its threshold of the current one (what
    ``publish_reason`` keeps true between publications)?"""
    return len(published) == len(current) and all(
        _gpu_reason(a, b, th) is None for a, b in zip(published, current, strict=True))
