"""Prometheus metrics, read from the node's own counters at scrape time.

A registry per node (several nodes may share a process in tests), filled by
a collector, so nothing on the hot path touches prometheus_client.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["render_metrics"]

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


class _Collector:
    def __init__(self, stats: Mapping[str, Any], members: Mapping[str, int]) -> None:
        self.stats = stats
        self.members = members

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        for name, help_text in _COUNTERS.items():
            c = CounterMetricFamily(f"meshnode_{name}", help_text)
            c.add_metric([], float(stats.get(name, 0)))
            yield c
        members = GaugeMetricFamily("meshnode_members", "members by state", labels=["state"])
        for state, n in sorted(self.members.items()):
            members.add_metric([state], n)
        yield members
        conns = GaugeMetricFamily("meshnode_http_connections", "HTTP connections open now")
        conns.add_metric([], float(stats.get("http_connections", 0)))
        yield conns
        keys = GaugeMetricFamily("meshnode_catalog_keys", "catalog keys held, all origins")
        keys.add_metric([], float(stats.get("catalog_keys", 0)))
        yield keys


def render_metrics(stats: Mapping[str, Any], members: Mapping[str, int]) -> tuple[bytes, str]:
    """The Prometheus text of a node's counters (``stats``) and its members by state."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector(stats, members))
    return generate_latest(reg), CONTENT_TYPE_LATEST
