"""The aggregator's metrics, read at scrape time from its monitor state (the same snapshot its monitor
socket publishes, safe from another thread) and its node registry: nothing is counted for them per sector.

Labels: ``path`` the forwarding process (0 the aggregator itself, i >= 1 forwarding process i; each binds
every receiver address), ``node`` the node index the aggregator gave (bounded by streaming.n_nodes),
``state`` one of four names.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client.registry import Collector

from counting.geometry import SECTOR_BYTES
from streaming.aggregator.aggregator import Aggregator
from streaming.aggregator.config import AggregatorConfig
from streaming.aggregator.registry import NodeEntry
from streaming.aggregator.stats import AggregatorStats
from streaming.metrics.exporter import Announce, exported
from streaming.metrics.families import counter, gauge, labelled_counter, labelled_gauge
from streaming.protocol import control as p
from streaming.settings import MetricsSettings
from streaming.signals import STOP_GRACE_S, stop_on_signals
from streaming.transport.security import CurveServerConfig

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

STATES = ("waiting", "armed", "streaming", "stopped")
PATH_COUNTERS = {  # AggregatorState.per_path key -> (metric name, help)
    "received": ("aggregator_sectors_received", "valid sectors received from the receivers"),
    "forwarded": ("aggregator_sectors_forwarded", "sectors sent to a node"),
    "late": ("aggregator_sectors_late", "sectors of an already-ended scan, dropped"),
    "malformed": ("aggregator_sectors_malformed", "messages from the receivers that failed validation"),
    "refused": ("aggregator_sectors_refused", "sectors of scans begun before the session was first ready"),
    "unroutable": ("aggregator_sectors_unroutable", "sectors whose node was gone or stalled, dropped"),
}


@dataclass(frozen=True)
class NodeSeen:
    """One node index as the aggregator sees it."""

    index: int
    connected: bool
    ready: bool
    heartbeat_age: float  # seconds since its last message
    forwarded: int  # sectors sent to it, under any of the names this index had


def aggregator_families(state: p.AggregatorState, scans: int, nodes: list[NodeSeen]) -> list[Metric]:
    """The aggregator's metric families from its monitor state, scans begun and its nodes."""
    paths = state.per_path or {0: {}}
    out: list[Metric] = [
        labelled_counter(name, doc, "path", {i: c.get(key, 0) for i, c in paths.items()})
        for key, (name, doc) in PATH_COUNTERS.items()
    ]
    received = {i: c.get("received", 0) * SECTOR_BYTES for i, c in paths.items()}
    out += [
        labelled_counter("aggregator_received_bytes", "sector payload bytes received", "path", received),
        counter("aggregator_scans_begun", "scans begun", scans),
        labelled_gauge(
            "aggregator_state",
            "1 for the state it is in",
            "state",
            {s: float(state.state == s) for s in STATES},
        ),
        gauge("aggregator_scan_open", "1 while a scan streams", float(state.scan_number >= 0)),
        gauge("aggregator_scan_sectors_expected", "sectors expected of the open scan", state.scan_expected),
        gauge("aggregator_scan_sectors_received", "sectors received of the open scan", state.scan_received),
        gauge("aggregator_nodes", "node streamers a scan needs (streaming.n_nodes)", state.n_nodes),
        gauge("aggregator_nodes_connected", "node streamers connected", state.nodes_connected),
        gauge("aggregator_nodes_ready", "node streamers connected and armed", state.nodes_ready),
        gauge("aggregator_forwarders_lost", "forwarding processes that exited", len(state.paths_lost)),
        labelled_gauge(
            "aggregator_node_up",
            "1 while the node is connected (not lost)",
            "node",
            {n.index: float(n.connected) for n in nodes},
        ),
        labelled_gauge(
            "aggregator_node_ready",
            "1 while the node is armed for a scan",
            "node",
            {n.index: float(n.connected and n.ready) for n in nodes},
        ),
        labelled_gauge(
            "aggregator_node_heartbeat_age_seconds",
            "seconds since the node's last message",
            "node",
            {n.index: n.heartbeat_age for n in nodes},
        ),
        labelled_counter(
            "aggregator_node_sectors_forwarded",
            "sectors sent to the node",
            "node",
            {n.index: n.forwarded for n in nodes},
        ),
    ]
    return out


class AggregatorCollector(Collector):
    """Reads a running Aggregator at each scrape (from the exporter's thread)."""

    def __init__(self, aggregator: Aggregator) -> None:
        self._aggregator = aggregator
        # Every node name seen, with its index: a restarted node's new name drops the old one from the
        # registry, and the sectors sent under the old name must stay in its index's counter.
        self._index_of: dict[str, int] = {}

    def collect(self) -> Iterator[Metric]:
        """The families, from a fresh monitor state."""
        agg = self._aggregator
        state = agg.state()
        # Copies first (list() of builtins holds the GIL): the loop may change the tables meanwhile.
        entries = list(agg.nodes.by_index.values())
        self._index_of.update({e.name: e.index for e in list(agg.nodes.by_name.values())})
        seen = nodes_seen(entries, self._index_of, state.per_node, time.monotonic())
        yield from aggregator_families(state, agg.stats.scans, seen)


def nodes_seen(
    entries: list[NodeEntry], index_of: dict[str, int], per_node: dict[str, int], now: float
) -> list[NodeSeen]:
    """Every node index the aggregator gave, with what it forwarded to it under any of its names."""
    forwarded: dict[int, int] = {}
    for name, n in per_node.items():
        i = index_of.get(name)
        if i is not None:
            forwarded[i] = forwarded.get(i, 0) + n
    return [
        NodeSeen(e.index, e.connected, e.ready, max(0.0, now - e.last_seen), forwarded.get(e.index, 0))
        for e in entries
    ]


def run_aggregator_exported(
    config: AggregatorConfig,
    curve: CurveServerConfig | None,
    metrics: MetricsSettings,
    announce: Announce,
    timeout: float | None = None,
) -> AggregatorStats:
    """run_aggregator with its metrics served: until SIGTERM/SIGINT or timeout; returns its counters."""
    stop = threading.Event()
    with (
        stop_on_signals(stop.set, grace=STOP_GRACE_S),
        Aggregator(config, curve) as agg,
        exported(metrics, "aggregator", [AggregatorCollector(agg)], announce),
    ):
        return agg.run(stop_event=stop, timeout=timeout)
