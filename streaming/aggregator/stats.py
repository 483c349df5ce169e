"""What the aggregator counts, logs and what its monitors see."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from streaming.aggregator.config import AggregatorConfig
from streaming.aggregator.data_path import ENDED_MEMORY
from streaming.aggregator.open_scan import OpenScan
from streaming.aggregator.registry import NodeRegistry
from streaming.protocol import control as p

log = logging.getLogger("streaming.aggregator.aggregator")  # its lines are logged as the aggregator's


@dataclass
class AggregatorStats:
    """Running counters (whole session)."""

    received: int = 0  # valid sectors received
    forwarded: int = 0  # sectors sent to a node
    malformed: int = 0  # messages that failed validation
    unroutable: int = 0  # sectors whose node was gone or stalled
    late: int = 0  # sectors of an already-ended scan
    refused: int = 0  # sectors of scans that began before the session was first ready
    refused_scans: dict[int, int] = field(default_factory=dict)  # scan number -> sectors refused
    scans: int = 0  # scans begun
    per_node: dict[str, int] = field(default_factory=dict)  # sectors forwarded, by node name
    # Forwarding processes' own counts (path i >= 1: received, forwarded, malformed, late, refused,
    # unroutable); the totals above include them, path 0 (this process) is the rest.
    per_path: dict[int, dict[str, int]] = field(default_factory=dict)
    # One ScanEnd per ended scan (sectors_sent: all nodes together), the latest ENDED_MEMORY of them.
    ended: deque[p.ScanEnd] = field(default_factory=lambda: deque(maxlen=ENDED_MEMORY), repr=False)

    def log_stopped(self) -> None:
        """The aggregator's last line."""
        log.info(
            "aggregator stopped: %d received, %d forwarded, %d malformed, %d unroutable, %d late",
            self.received,
            self.forwarded,
            self.malformed,
            self.unroutable,
            self.late,
        )


def log_started(
    receivers: list[str], endpoints: dict, n_nodes: int, security: str, config: AggregatorConfig
) -> None:
    """The aggregator's first line: where it listens, how it is secured, its queues."""
    log.info(
        "aggregator: receivers %s, nodes %s (%d), monitor %s; node and monitor sockets %s; queues: "
        "%d sectors per receiver connection, %d per node",
        receivers,
        endpoints["nodes"],
        n_nodes,
        endpoints["monitor"],
        security,
        config.path.receiver_hwm,
        config.path.node_hwm,
    )


def monitor_state(
    nodes: NodeRegistry,
    stats: AggregatorStats,
    scan: OpenScan | None,
    stopping: bool,
    paths_lost: dict[int, str] | None = None,
) -> p.AggregatorState:
    """A snapshot for monitors; safe from another thread."""
    # Copies first: list() and dict() of builtins run without releasing the GIL, so another thread never
    # sees a table the loop is changing.
    entries = list(nodes.by_index.values())
    per_node = dict(stats.per_node)
    writer = nodes.writer
    all_ready = len(entries) == nodes.n_nodes and all(n.connected and n.ready for n in entries)
    if stopping:
        name = "stopped"
    elif scan is not None:
        name = "streaming"
    else:
        name = "armed" if all_ready else "waiting"
    return p.AggregatorState(
        state=name,
        scan_number=scan.number if scan is not None else -1,
        nodes_connected=sum(n.connected for n in entries),
        nodes_ready=sum(n.connected and n.ready for n in entries),
        n_nodes=nodes.n_nodes,
        received=stats.received,
        forwarded=stats.forwarded,
        malformed=stats.malformed,
        unroutable=stats.unroutable,
        per_node=per_node,
        time=time.time(),
        late=stats.late,
        writer=writer.name if writer is not None else "",
        refused=stats.refused,
        scan_expected=scan.sectors_expected if scan is not None else 0,
        scan_received=scan.received if scan is not None else 0,
        refused_scans=dict(stats.refused_scans),
        per_path=path_counts(stats),
        paths_lost=dict(paths_lost or {}),
    )


PATH_COUNTS = ("received", "forwarded", "malformed", "late", "refused", "unroutable")


def path_counts(stats: AggregatorStats) -> dict[int, dict[str, int]]:
    """Counts per forwarding path: 0 the aggregator's own, i >= 1 forwarding process i."""
    others = {i: dict(c) for i, c in list(stats.per_path.items())}
    own = {k: getattr(stats, k) - sum(c.get(k, 0) for c in others.values()) for k in PATH_COUNTS}
    return {0: own, **others}
