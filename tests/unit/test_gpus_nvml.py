"""The NVML reader against a stand-in ``pynvml`` module: what each call's
answer becomes in a reading, what a driver without memory v2 or without power
readings gives, and how a failing GPU turns into one ``GpuReadError``.  (On
a machine with a GPU, ``tests/integration/test_gpus.py`` also reads the real one.)"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import pytest

from meshnode.gpus import GpuReadError, NvmlReader, open_reader

GiB = 2**30


class NVMLError(Exception):
    pass


def _err(name: str) -> type[NVMLError]:
    return type(name, (NVMLError,), {})


@dataclass
class Proc:
    pid: int
    usedGpuMemory: int | None


@dataclass
class Card:
    total: int
    used: int
    util: int = 40
    temp: int = 55
    power: int | None = 250_000
    compute: tuple[Proc, ...] = ()
    graphics: tuple[Proc, ...] = ()
    lost: bool = False


def fake_nvml(cards: list[Card], *, v2: bool = True, v2_works: bool = True, init_error: str | None = None) -> Any:
    m = types.SimpleNamespace()
    m.NVMLError = NVMLError
    for name in ("NVMLError_NotSupported", "NVMLError_NoPermission", "NVMLError_FunctionNotFound",
                 "NVMLError_ArgumentVersionMismatch", "NVMLError_GpuIsLost", "NVMLError_LibraryNotFound"):
        setattr(m, name, _err(name))
    m.NVML_TEMPERATURE_GPU = 0
    m.calls = []
    if v2:
        m.nvmlMemory_v2 = 0x2000028

    def init() -> None:
        if init_error:
            raise m.NVMLError_LibraryNotFound(init_error)

    def handle(i: int) -> Card:
        c = cards[i]
        if c.lost:
            raise m.NVMLError_GpuIsLost("GPU is lost")
        return c

    def memory(c: Card, version: int | None = None) -> Any:
        m.calls.append(("memory", version))
        if version is not None and not v2_works:
            raise m.NVMLError_FunctionNotFound("Function Not Found")
        return types.SimpleNamespace(total=c.total, used=c.used, free=c.total - c.used)

    def power(c: Card) -> int:
        if c.power is None:
            raise m.NVMLError_NotSupported("Not Supported")
        return c.power

    m.nvmlInit = init
    m.nvmlShutdown = lambda: None
    m.nvmlSystemGetDriverVersion = lambda: b"550.54"
    m.nvmlDeviceGetCount = lambda: len(cards)
    m.nvmlDeviceGetHandleByIndex = handle
    m.nvmlDeviceGetMemoryInfo = memory
    m.nvmlDeviceGetUtilizationRates = lambda c: types.SimpleNamespace(gpu=c.util, memory=c.util // 2)
    m.nvmlDeviceGetTemperature = lambda c, sensor: c.temp
    m.nvmlDeviceGetPowerUsage = power
    m.nvmlDeviceGetEnforcedPowerLimit = lambda c: 700_000
    m.nvmlDeviceGetComputeRunningProcesses = lambda c: list(c.compute)
    m.nvmlDeviceGetGraphicsRunningProcesses = lambda c: list(c.graphics)
    m.nvmlDeviceGetUUID = lambda c: f"GPU-{id(c) % 1000:03d}"
    m.nvmlDeviceGetName = lambda c: b"NVIDIA H200"  # bytes, as older bindings return
    return m


def test_a_reading_has_every_figure() -> None:
    cards = [Card(141 * GiB, 20 * GiB, compute=(Proc(4242, 18 * GiB),), graphics=(Proc(4242, 18 * GiB), Proc(7, None))),
             Card(141 * GiB, 0, power=None)]
    nvml = fake_nvml(cards)
    r = NvmlReader(nvml)
    assert r.driver == "550.54"
    g0, g1 = r.read()
    assert (g0.index, g0.name, g0.total_bytes, g0.used_bytes, g0.free_bytes) == (0, "NVIDIA H200", 141 * GiB, 20 * GiB,
                                                                                121 * GiB)
    assert (g0.util_pct, g0.mem_util_pct, g0.temperature_c, g0.power_mw, g0.power_limit_mw) == (40, 20, 55, 250_000,
                                                                                                700_000)
    # Compute and graphics lists merged, one entry per pid; NVML's "unknown" memory stays unknown.
    assert [(p.pid, p.used_bytes) for p in g0.processes] == [(7, None), (4242, 18 * GiB)]
    assert g1.power_mw is None  # not supported on this GPU: absent, not a failed read
    assert ("memory", nvml.nvmlMemory_v2) in nvml.calls  # memory v2 where the binding has it


def test_a_driver_without_memory_v2_falls_back_to_v1_once() -> None:
    nvml = fake_nvml([Card(24 * GiB, GiB)], v2_works=False)
    r = NvmlReader(nvml)
    assert r.read()[0].used_bytes == GiB
    r.read()
    assert [v for k, v in nvml.calls if k == "memory"] == [nvml.nvmlMemory_v2, None, None]


def test_a_lost_gpu_is_one_read_error() -> None:
    cards = [Card(24 * GiB, 0), Card(24 * GiB, 0)]
    r = NvmlReader(fake_nvml(cards))
    cards[1].lost = True
    with pytest.raises(GpuReadError, match="NVML: GPU is lost"):
        r.read()


def test_no_driver_is_an_error_at_start() -> None:
    with pytest.raises(GpuReadError, match="NVML: NVML Shared Library Not Found"):
        NvmlReader(fake_nvml([], init_error="NVML Shared Library Not Found"))


def test_no_gpu_and_no_flag_lists_none() -> None:
    """This machine has no NVIDIA driver (CI neither): the real pynvml says so, and the node lists no GPU."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        assert open_reader((), "n1") is None
    else:  # a machine with a GPU
        pynvml.nvmlShutdown()
        reader = open_reader((), "n1")
        assert reader is not None and reader.source == "nvml" and reader.read()
    fake = open_reader((24 * GiB,), "n1")
    assert fake is not None and fake.source == "fake" and fake.read()[0].total_bytes == 24 * GiB
