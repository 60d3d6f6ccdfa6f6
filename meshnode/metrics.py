"""Prometheus metrics, read from the node's own counters at scrape time.

A registry per node (several nodes may share a process in tests), filled by
a collector, so nothing on the hot path touches prometheus_client.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from protocol.gpus import GpusRecord

__all__ = ["Gauges", "render_metrics"]

MEMBER_STATES = ("alive", "suspect", "dead", "left")
TRANSFER_STATES = ("queued", "running", "done", "failed")
JOB_STATES = ("pending", "running", "completed", "failed", "cancelled")
SERVICE_STATES = ("starting", "healthy", "unhealthy", "restarting", "stopping", "error", "stopped")


@dataclass
class Gauges:
    """What the node holds now, read at scrape time: every label of each family
    is listed, zeros included, so that a dashboard sees a state empty, not gone."""

    members: Mapping[str, int] = field(default_factory=dict)
    gpus: GpusRecord | None = None
    tiers: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # disk, dram: total / used / free
    transfers: Mapping[str, int] = field(default_factory=dict)  # this node's, by status
    jobs: Mapping[str, int] = field(default_factory=dict)  # the mesh's, by status
    services: Mapping[str, int] = field(default_factory=dict)  # this node's, by state
    version: str = ""

_COUNTERS = {
    "messages_in": "peer messages received",
    "messages_out": "peer messages produced",
    "suspicions_raised": "members this node suspected",
    "deaths_declared": "members this node declared dead",
    "refutations": "suspicions of this node it refuted",
    "identity_conflicts": "records or keys of this node's id it did not write (another process, or forged)",
    "generation_moves": "times this node moved to a higher generation to refute an identity conflict",
    "future_generations_dropped": "member records dropped for a generation too far ahead of this node's clock",
    "bad_messages": "peer messages dropped as malformed or foreign",
    "refused_requests": "requests refused for a missing or wrong credential",
    "send_sent": "peer messages delivered",
    "send_failed": "peer messages that failed to send",
    "send_dropped_queue_full": "peer messages dropped because the send queue was full",
    "http_connections_refused": "HTTP connections turned away at a connection bound",
}


_GPU_GAUGES = (
    # name, help, the reading's field, scale
    ("gpu_memory_total_bytes", "GPU memory in all", "total_bytes", 1.0),
    ("gpu_memory_used_bytes", "GPU memory in use", "used_bytes", 1.0),
    ("gpu_memory_free_bytes", "GPU memory free", "free_bytes", 1.0),
    ("gpu_utilization_ratio", "share of time a kernel ran, over NVML's last sample period", "util_pct", 0.01),
    ("gpu_temperature_celsius", "GPU core temperature", "temperature_c", 1.0),
    ("gpu_power_watts", "GPU power draw", "power_mw", 0.001),
    ("gpu_processes", "processes using the GPU", "processes_total", 1.0),
)


class _Collector:
    def __init__(self, stats: Mapping[str, Any], g: Gauges) -> None:
        self.stats = stats
        self.g = g

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        for name, help_text in _COUNTERS.items():
            c = CounterMetricFamily(f"meshnode_{name}", help_text)
            c.add_metric([], float(stats.get(name, 0)))
            yield c
        yield self._by("meshnode_members", "members by state", MEMBER_STATES, self.g.members)
        yield self._by("meshnode_transfers", "this node's transfers by status (finished ones as kept in its history)",
                       TRANSFER_STATES, self.g.transfers)
        yield self._by("meshnode_jobs", "the mesh's jobs by status", JOB_STATES, self.g.jobs)
        yield self._by("meshnode_services", "this node's engines by state", SERVICE_STATES, self.g.services)
        for name, what in (("total", "in all"), ("used", "in use"), ("free", "free")):
            t = GaugeMetricFamily(f"meshnode_storage_{name}_bytes", f"storage tier bytes {what}", labels=["tier"])
            for tier, usage in sorted(self.g.tiers.items()):
                t.add_metric([tier], float(usage.get(name, 0)))
            yield t
        info = GaugeMetricFamily("meshnode_build_info", "the running version", labels=["version"])
        info.add_metric([self.g.version], 1.0)
        yield info
        conns = GaugeMetricFamily("meshnode_http_connections", "HTTP connections open now")
        conns.add_metric([], float(stats.get("http_connections", 0)))
        yield conns
        keys = GaugeMetricFamily("meshnode_catalog_keys", "catalog keys held, all origins")
        keys.add_metric([], float(stats.get("catalog_keys", 0)))
        yield keys
        yield from self._gpus()

    @staticmethod
    def _by(name: str, help_text: str, states: tuple[str, ...], counts: Mapping[str, int]) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, help_text, labels=["state"])
        for state in dict.fromkeys((*states, *sorted(counts))):
            g.add_metric([state], float(counts.get(state, 0)))
        return g

    def _gpus(self) -> Iterator[Metric]:
        rec = self.g.gpus
        if rec is None or rec.source == "none":
            return
        stale = GaugeMetricFamily("meshnode_gpu_stale", "1 while GPU reads fail (the figures are the last good ones)")
        stale.add_metric([], 1.0 if rec.stale else 0.0)
        yield stale
        for name, help_text, attr, scale in _GPU_GAUGES:
            g = GaugeMetricFamily(f"meshnode_{name}", help_text, labels=["gpu", "uuid"])
            for r in rec.gpus:
                v = getattr(r, attr)
                if v is not None:
                    g.add_metric([str(r.index), r.uuid], float(v) * scale)
            yield g


def render_metrics(stats: Mapping[str, Any], gauges: Gauges) -> tuple[bytes, str]:
    """The Prometheus text of a node's counters (``stats``), what it holds now
    (``gauges``), and the process (CPU, memory, open files) and platform."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector(stats, gauges))
    ProcessCollector(registry=reg)
    PlatformCollector(registry=reg)
    return generate_latest(reg), CONTENT_TYPE_LATEST
