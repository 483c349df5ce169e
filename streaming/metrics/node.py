"""A node streamer's metrics, read at scrape time: its counters (NodeCounters), its hold queue, its counting
pool's health and, on node 0, the scan writer's stop records. Nothing is counted for them per sector."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client.registry import Collector

from streaming.metrics.exporter import Announce, exported
from streaming.metrics.families import counter, gauge, labelled_counter
from streaming.node.config import NodeConfig, NodeCounters
from streaming.node.streamer import NodeStreamer
from streaming.node.workers.pool import CountingPool
from streaming.protocol.record import ScanRecord, ScanStatus
from streaming.signals import stop_on_signals

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

NODE_COUNTERS = {  # NodeCounters field -> (metric name, help)
    "sectors": ("node_sectors_received", "sectors received from the aggregator"),
    "malformed": ("node_messages_malformed", "messages that failed validation (aggregator or writer)"),
    "stray": ("node_sectors_stray", "sectors of a scan this node is not in, dropped"),
    "late_sectors": ("node_sectors_late", "sectors of frames already sealed, dropped"),
    "duplicates": ("node_sectors_duplicate", "sectors received twice, dropped"),
    "frames": ("node_frames_counted", "frames counted"),
    "incomplete_frames": ("node_frames_incomplete", "frames counted with sectors missing"),
    "scans": ("node_scans_done", "scans this node finished"),
}


@dataclass(frozen=True)
class NodeGauges:
    """What a node holds and how its counting pool is, at one moment."""

    index: int  # as the aggregator numbered it (-1 until welcomed)
    held: int  # sectors and control messages waiting for a free slot
    hold_limit: int
    counting: int  # batches in the counting workers
    workers: int  # counting processes configured (0: counting in the node process)
    workers_alive: int
    worker_restarts: int


def node_families(counters: NodeCounters, g: NodeGauges) -> list[Metric]:
    """The node's metric families."""
    out: list[Metric] = [
        counter(name, doc, getattr(counters, field)) for field, (name, doc) in NODE_COUNTERS.items()
    ]
    out += [
        gauge("node_index", "the node's index as the aggregator numbered it (-1: not welcomed)", g.index),
        gauge("node_held_messages", "messages waiting for a free slot (the hold queue)", g.held),
        gauge("node_hold_limit", "the hold queue's bound (streaming.node_hold_limit)", g.hold_limit),
        gauge("node_counting_batches", "batches in the counting workers", g.counting),
        gauge("node_counting_workers", "counting processes configured (0: inline)", g.workers),
        gauge("node_counting_workers_alive", "counting processes running", g.workers_alive),
        counter(
            "node_counting_worker_restarts",
            "counting processes that exited and were restarted",
            g.worker_restarts,
        ),
    ]
    return out


def writer_families(records: list[ScanRecord] | None, malformed: int) -> list[Metric]:
    """The scan writer's metric families (records None: this node hosts no writer)."""
    hosted = records is not None
    records = records or []
    statuses = {s.value: 0 for s in ScanStatus}
    for r in records:
        statuses[r.status.value] += 1
    out: list[Metric] = [
        gauge("writer_hosted", "1 on the node hosting the session's scan writer", float(hosted)),
        labelled_counter("writer_scans", "scans the writer finished, by status", "status", statuses),
        counter(
            "writer_frames_written", "frames written to scan files", sum(r.frames_written for r in records)
        ),
        counter("writer_messages_malformed", "messages from nodes that failed validation", malformed),
    ]
    if records:
        last = records[-1]
        out += [
            gauge("writer_last_scan_number", "the last finished scan's number", last.scan_number),
            gauge(
                "writer_last_scan_completeness_ratio", "its fraction of sectors received", last.completeness
            ),
            gauge("writer_last_scan_frames_written", "its frames written", last.frames_written),
            gauge("writer_last_scan_frames_expected", "its frames expected", last.expected_frames),
            gauge("writer_last_scan_frames_incomplete", "its frames not complete", last.frames_incomplete),
            gauge(
                "writer_last_scan_seconds_to_file",
                "seconds from its last data to its file on disk",
                last.seconds_to_file,
            ),
            gauge(
                "writer_last_scan_written_timestamp_seconds",
                "when its file was finished (Unix time)",
                last.written_time,
            ),
        ]
    return out


class NodeCollector(Collector):
    """Reads a running NodeStreamer at each scrape (from the exporter's thread); nothing until ``node`` is
    set (the exporter starts first: a bad metrics address fails before the node allocates anything)."""

    def __init__(self, node: NodeStreamer | None = None) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        """The node's families and its hosted writer's."""
        node = self.node
        if node is None:
            return
        pool = node.pool
        gauges = NodeGauges(
            index=node.link.node_index,
            held=len(node._held),  # the hold queue has no public handle on the streamer (a 400-line file)
            hold_limit=node._held.limit,
            counting=pool.outstanding,
            workers=pool.workers,
            workers_alive=workers_alive(pool),
            worker_restarts=pool.restarts,
        )
        yield from node_families(node.counters, gauges)
        writer = node.hosted.scan_writer
        records = list(writer.records) if writer is not None else None
        yield from writer_families(records, writer.malformed if writer is not None else 0)


def workers_alive(pool: CountingPool) -> int:
    """Counting processes running, from /proc (never waitpid: reaping belongs to the node's thread)."""
    return sum(process_running(pid) for pid in pool.worker_pids())


def process_running(pid: int) -> bool:
    """The process exists and is not a zombie (Linux /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def run_node_exported(
    config: NodeConfig, dark: np.ndarray | None, gain: np.ndarray | None, announce: Announce
) -> NodeCounters:
    """run_node with its metrics served (and node 0's scan writer's): until SIGTERM/SIGINT or max_scans."""
    collector = NodeCollector()
    with exported(config.streaming.metrics, "node", [collector], announce):
        node = collector.node = NodeStreamer(config, dark, gain)
        with stop_on_signals(node.stop):
            return node.run()
