"""This node's GPUs: read through NVML (or a fake), published to the catalog.

``open_reader`` picks the reader: ``--fake-gpus 2x24GiB`` gives ``FakeGpus``
(tests, the simulator's shapes, the demo, any machine without a GPU);
otherwise ``NvmlReader`` when an NVIDIA driver answers; otherwise none, and
the node's ``gpus`` record lists none.  ``GpuMonitor`` reads every
``interval_s`` in a worker thread (an NVML call can block on a sick GPU, so
each read has a deadline and at most one runs at a time), and writes the
record only when ``protocol.gpus.publish_reason`` says it is news.  A failed
read is one log line (then one a minute while it lasts) and a ``stale``
record holding the last good figures; it never stops the node.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from protocol.gpus import (
    MAX_GPUS,
    MAX_PROCESSES,
    GpuProcess,
    GpuReading,
    GpusRecord,
    Thresholds,
    publish_reason,
)
from protocol.keys import GPUS_KEY

from .mesh import Mesh, wall_ms

__all__ = ["FakeGpus", "GpuMonitor", "GpuReadError", "GpuReader", "NvmlReader", "open_reader"]

log = logging.getLogger("meshnode.gpus")

READ_TIMEOUT_S = 10.0
ERROR_LOG_EVERY_S = 60.0


class GpuReadError(Exception):
    """A read failed; the message says why, and holds no secret."""


class GpuReader(Protocol):
    source: str

    def read(self) -> list[GpuReading]:
        """Every GPU now; blocking (called in a worker thread).  Raises GpuReadError."""
        ...

    def close(self) -> None: ...


# -- NVML -----------------------------------------------------------------------------------


def _text(v: Any) -> str:
    return (v.decode(errors="replace") if isinstance(v, bytes) else str(v))[:200]


class NvmlReader:
    """NVML through ``nvidia-ml-py`` (the ``pynvml`` module).  ``nvml`` may be
    given (tests pass a stand-in module); the default imports ``pynvml``."""

    source = "nvml"

    def __init__(self, nvml: Any = None) -> None:
        if nvml is None:
            import pynvml

            nvml = pynvml
        self.nvml = nvml
        self._lock = threading.Lock()
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as e:
            raise GpuReadError(f"NVML: {_text(e)}") from None
        self._v2 = hasattr(nvml, "nvmlMemory_v2")

        def errors(*names: str) -> tuple[type[BaseException], ...]:
            return tuple(getattr(nvml, n) for n in names if isinstance(getattr(nvml, n, None), type))

        # Figures a GPU may not report, and what an old driver says to memory v2.
        self._absent = errors("NVMLError_NotSupported", "NVMLError_NoPermission")
        self._no_v2 = errors("NVMLError_FunctionNotFound", "NVMLError_NotSupported", "NVMLError_ArgumentVersionMismatch")
        self.driver = ""
        try:
            self.driver = _text(nvml.nvmlSystemGetDriverVersion())
        except nvml.NVMLError:
            pass

    def _optional(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A figure some GPUs do not report (NOT_SUPPORTED): None, not a failed read."""
        try:
            return fn(*args)
        except self.nvml.NVMLError as e:
            if isinstance(e, self._absent):
                return None
            raise

    def _memory(self, h: Any) -> Any:
        if self._v2:
            try:
                # v2 counts memory the driver reserves as used, as nvidia-smi does.
                return self.nvml.nvmlDeviceGetMemoryInfo(h, version=self.nvml.nvmlMemory_v2)
            except self._no_v2:
                self._v2 = False  # an older driver: v1 from now on
        return self.nvml.nvmlDeviceGetMemoryInfo(h)

    def _processes(self, h: Any) -> tuple[tuple[GpuProcess, ...], int]:
        seen: dict[int, GpuProcess] = {}
        for fn in (self.nvml.nvmlDeviceGetComputeRunningProcesses, self.nvml.nvmlDeviceGetGraphicsRunningProcesses):
            for p in self._optional(fn, h) or ():
                used = getattr(p, "usedGpuMemory", None)
                pid = int(p.pid)
                if 0 <= pid <= 2**32 and pid not in seen:
                    seen[pid] = GpuProcess(pid, int(used) if isinstance(used, int) and used >= 0 else None)
        procs = sorted(seen.values(), key=lambda p: p.pid)
        return tuple(procs[:MAX_PROCESSES]), len(procs)

    def _one(self, i: int) -> GpuReading:
        n = self.nvml
        h = n.nvmlDeviceGetHandleByIndex(i)
        mem = self._memory(h)
        util = self._optional(n.nvmlDeviceGetUtilizationRates, h)
        procs, total = self._processes(h)
        power = self._optional(n.nvmlDeviceGetPowerUsage, h)
        limit = self._optional(n.nvmlDeviceGetEnforcedPowerLimit, h)
        temp = self._optional(n.nvmlDeviceGetTemperature, h, n.NVML_TEMPERATURE_GPU)
        total_b = int(mem.total)
        return GpuReading(
            index=i, uuid=_text(n.nvmlDeviceGetUUID(h)), name=_text(n.nvmlDeviceGetName(h)),
            total_bytes=total_b, used_bytes=min(int(mem.used), total_b), free_bytes=min(int(mem.free), total_b),
            util_pct=None if util is None else min(int(util.gpu), 100),
            mem_util_pct=None if util is None else min(int(util.memory), 100),
            temperature_c=None if temp is None else int(temp),
            power_mw=None if power is None else int(power),
            power_limit_mw=None if limit is None else int(limit),
            processes=procs, processes_total=total,
        )

    def read(self) -> list[GpuReading]:
        with self._lock:
            try:
                count = min(int(self.nvml.nvmlDeviceGetCount()), MAX_GPUS)
                return [self._one(i) for i in range(count)]
            except self.nvml.NVMLError as e:
                raise GpuReadError(f"NVML: {_text(e)}") from None

    def close(self) -> None:
        with self._lock:
            try:
                self.nvml.nvmlShutdown()
            except self.nvml.NVMLError:
                pass


# -- the fake ---------------------------------------------------------------------------------


@dataclass
class _FakeGpu:
    total: int
    used: int = 0
    util_pct: int = 0
    processes: dict[int, int] = field(default_factory=dict)  # pid -> bytes


class FakeGpus:
    """GPUs of the given sizes, for machines without one.  Memory and
    processes change only through ``allocate``/``release`` (what an engine on
    it would do) and ``set_used``; ``fail_with`` makes the next reads fail."""

    source = "fake"

    def __init__(self, totals: tuple[int, ...], label: str = "node") -> None:
        self.label = label[:64]
        self._lock = threading.Lock()
        self._gpus = [_FakeGpu(t) for t in totals]
        self.failing: str | None = None
        self.reads = 0

    def read(self) -> list[GpuReading]:
        with self._lock:
            self.reads += 1
            if self.failing is not None:
                raise GpuReadError(self.failing)
            out = []
            for i, g in enumerate(self._gpus):
                used = min(g.used + sum(g.processes.values()), g.total)
                procs = tuple(GpuProcess(pid, b) for pid, b in sorted(g.processes.items()))
                out.append(GpuReading(i, f"GPU-fake-{self.label}-{i}", f"Fake GPU {g.total // 2**30} GiB",
                                      g.total, used, g.total - used, g.util_pct, 0, 35, 50_000, 300_000,
                                      procs[:MAX_PROCESSES], len(procs)))
            return out

    def set_used(self, index: int, used: int, util_pct: int = 0) -> None:
        with self._lock:
            g = self._gpus[index]
            g.used, g.util_pct = min(max(used, 0), g.total), min(max(util_pct, 0), 100)

    def allocate(self, index: int, pid: int, nbytes: int) -> None:
        with self._lock:
            self._gpus[index].processes[pid] = nbytes

    def release(self, index: int, pid: int) -> None:
        with self._lock:
            self._gpus[index].processes.pop(pid, None)

    def fail_with(self, error: str | None) -> None:
        with self._lock:
            self.failing = error

    def close(self) -> None:
        pass


def open_reader(fake_totals: tuple[int, ...], node_id: str) -> GpuReader | None:
    """The fake when ``--fake-gpus`` gave sizes, else NVML when a driver
    answers, else None (no GPU: the node lists none, nothing else changes)."""
    if fake_totals:
        log.info("GPUs: %d fake (%s)", len(fake_totals), ", ".join(f"{t / 2**30:g} GiB" for t in fake_totals))
        return FakeGpus(fake_totals, node_id)
    try:
        reader = NvmlReader()
    except ImportError:
        log.warning("GPUs: the pynvml module (package nvidia-ml-py) is missing: none listed")
        return None
    except GpuReadError as e:
        log.info("GPUs: none (%s)", e)
        return None
    log.info("GPUs: NVML, driver %s", reader.driver or "of unknown version")
    return reader


# -- the monitor ------------------------------------------------------------------------------


class GpuMonitor:
    """Reads every ``interval_s``; writes the node's ``gpus`` record when it is news."""

    def __init__(self, mesh: Mesh, reader: GpuReader | None, interval_s: float = 5.0,
                 thresholds: Thresholds | None = None) -> None:
        self.mesh = mesh
        self.reader = reader
        self.interval_s = interval_s
        self.thresholds = thresholds or Thresholds()
        self.published: GpusRecord | None = None
        self._published_at = 0.0
        self.current: GpusRecord | None = None
        self.writes = 0
        self.failures = 0
        self._busy = False  # a read is out in a worker thread (perhaps stuck)
        self._last_error_log = -float("inf")
        self._wake = trio.Event()

    def poke(self) -> None:
        """Read again now (an engine started or stopped)."""
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.sample()  # the first figures are in the catalog before the node is up
        task_status.started()
        if self.reader is None:
            return
        try:
            while True:
                with trio.move_on_after(self.interval_s):
                    await self._wake.wait()
                self._wake = trio.Event()
                await self.sample()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.reader.close, abandon_on_cancel=True)

    async def sample(self) -> GpusRecord:
        """One read, and a write when it is news; what the node now shows."""
        now = trio.current_time()
        if self.reader is None:
            rec = GpusRecord((), wall_ms(), "none")
        else:
            rec = await self._read(self.reader)
        self.current = rec
        why = publish_reason(self.published, self._published_at, rec, now, self.thresholds)
        if why is not None:
            self.mesh.set(GPUS_KEY, rec.to_value())
            self.published, self._published_at = rec, now
            self.writes += 1
            log.debug("gpus published: %s", why)
        return self.published or rec

    async def _read(self, reader: GpuReader) -> GpusRecord:
        error: str
        if self._busy:
            error = "an earlier GPU read has not returned (the driver is stuck)"
        else:
            self._busy = True

            def read() -> list[GpuReading]:
                try:
                    return reader.read()
                finally:
                    self._busy = False

            try:
                with trio.fail_after(READ_TIMEOUT_S):
                    gpus = await trio.to_thread.run_sync(read, abandon_on_cancel=True)
                if self.failures:
                    log.warning("GPU reads work again after %d failures", self.failures)
                self.failures = 0
                return GpusRecord(tuple(gpus), wall_ms(), reader.source)
            except trio.TooSlowError:
                error = f"a GPU read took longer than {READ_TIMEOUT_S:g} s"
            except GpuReadError as e:
                error = str(e)
            except Exception as e:  # a reader's bug is a log line, never the node's end
                error = f"GPU read failed: {type(e).__name__}: {e}"[:200]
        self.failures += 1
        now = trio.current_time()
        if self.failures == 1 or now - self._last_error_log >= ERROR_LOG_EVERY_S:
            self._last_error_log = now
            log.warning("GPU figures are stale: %s (%d failed reads in a row)", error, self.failures)
        last = self.published if self.published is not None and self.published.source == reader.source else None
        base = last if last is not None else GpusRecord((), wall_ms(), reader.source)
        return base.marked_stale(error, wall_ms())
