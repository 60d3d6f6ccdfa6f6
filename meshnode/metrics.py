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
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from protocol.gpus import GpusRecord

__all__ = ["Gauges", "RouteLatency", "render_metrics"]

MEMBER_STATES = ("alive", "suspect", "dead", "left")
TRANSFER_STATES = ("queued", "running", "done", "failed")
JOB_STATES = ("pending", "running", "completed", "failed", "cancelled")
SERVICE_STATES = ("starting", "healthy", "unhealthy", "restarting", "stopping", "error", "stopped")


LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RouteLatency:
    """Request durations by method and route (the route's rule, so the
    series are bounded by the app's routes, not by what clients send)."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, str], list[float]] = {}  # bucket counts, then the sum

    def observe(self, method: str, route: str, seconds: float) -> None:
        key = (method if method in METHODS else "other", route)
        row = self.series.get(key)
        if row is None:
            row = self.series[key] = [0.0] * (len(LATENCY_BUCKETS_S) + 2)
        for i, le in enumerate(LATENCY_BUCKETS_S):
            if seconds <= le:
                row[i] += 1
                break
        else:
            row[len(LATENCY_BUCKETS_S)] += 1  # above the last bound: +Inf only
        row[-1] += seconds

    def family(self) -> HistogramMetricFamily:
        h = HistogramMetricFamily("meshnode_http_request_duration_seconds",
                                  "time from a request's head to its response's head, by method and route",
                                  labels=["method", "route"])
        for (method, route), row in sorted(self.series.items()):
            cumulative, buckets = 0.0, []
            for le, n in zip((*map(str, LATENCY_BUCKETS_S), "+Inf"), row[:-1], strict=True):
                cumulative += n
                buckets.append((le, cumulative))
            h.add_metric([method, route], buckets, sum_value=row[-1])
        return h


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
    fetched_bytes: Mapping[str, int] = field(default_factory=dict)  # from outside the mesh, by source kind
    upkeep: Mapping[str, int] = field(default_factory=dict)  # the keeper's and the evictor's counts since start
    latency: RouteLatency | None = None
    version: str = ""

UPKEEP = {
    "replica_rounds": "rounds of the replica rule this node ran",
    "replica_copies_added": "copies this node started because the replica rule named it",
    "replica_copies_dropped": "copies this node dropped because the replica rule named it",
    "evicted_copies": "copies evicted from this node's tiers (least recently used, above the high watermark)",
    "scrubbed_copies": "copies found removed or changed by hand and withdrawn",
}

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
    "send_sent_datagrams": "peer messages delivered as UDP datagrams (the rest went by HTTP)",
    "datagram_received": "peer datagrams received and taken",
    "datagram_refused": "peer datagrams refused: not ours, or a missing, wrong, stale or replayed credential",
    "http_connections_refused": "HTTP connections turned away at a connection bound",
    "gossip_rounds": "gossip rounds (anti-entropy with random members) this node started",
    "gossip_received_bytes": "bytes of peer messages received",
    "gossip_sent_bytes": "bytes of peer messages delivered",
    "data_received_bytes": "chunk bytes received over the data plane (verified or not)",
    "data_sent_bytes": "chunk bytes sent over the data plane",
    "data_have_sent_bytes": "bytes of HAVE answers sent over the data plane (what a node tells its neighbours)",
    "chunks_verified": "chunks pulled from peers whose xxhash matched",
    "bad_chunks": "chunks from peers whose xxhash did not match (fetched again elsewhere)",
    "peer_bans": "peers banned from a transfer for serving bad chunks",
    "chunk_stalls": "chunk requests that made no progress in time and moved to another peer",
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
        fetched = CounterMetricFamily("meshnode_source_fetched_bytes", "bytes fetched from outside the mesh "
                                      "(hf: a Hugging Face hub, http: an http(s) URL, s3: an S3 store)", labels=["source"])
        for kind in dict.fromkeys(("hf", "http", "s3", *sorted(self.g.fetched_bytes))):
            fetched.add_metric([kind], float(self.g.fetched_bytes.get(kind, 0)))
        yield fetched
        for name, text in UPKEEP.items():
            c = CounterMetricFamily(f"meshnode_{name}", text)
            c.add_metric([], float(self.g.upkeep.get(name, 0)))
            yield c
        if self.g.latency is not None:
            yield self.g.latency.family()
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
