"""A node streamer's config and counters, and why it may be refused."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from counting.errors import PermanentError
from counting.thresholds import ThresholdConfig
from streaming.settings import StreamingSettings
from streaming.transport.security import CurveClientConfig
from streaming.writer.writer import WriterConfig


class NodeRefused(PermanentError):
    """The aggregator refused this node (all slots taken, another output directory, another protocol)."""


@dataclass(frozen=True)
class NodeConfig:
    """Everything a node streamer needs; built by streaming.components from the settings."""

    aggregator: str
    name: str
    output_dir: Path  # where scans go if this node hosts the writer (every node is started with it)
    streaming: StreamingSettings
    estimate: ThresholdConfig  # how many complete frames to offer for threshold estimation
    writer: WriterConfig  # used when this node hosts the writer
    curve: CurveClientConfig | None
    max_scans: int | None  # stop after this many scans (tests, one-shot runs)

    def __post_init__(self) -> None:
        st = self.streaming
        if st.node_batch < 1 or st.node_slots < 2 or st.node_workers < 0:
            raise ValueError("need node_batch >= 1, node_slots >= 2, node_workers >= 0")

    def describe(self) -> str:
        """The node's start-up line."""
        st = self.streaming
        return (
            f"{self.name}: {st.node_slots} slots of {st.node_batch} frames, {st.node_workers} counting "
            f"worker(s), hold limit {st.node_hold_limit} sectors; scans named {self.writer.name_template}"
        )


@dataclass
class NodeCounters:
    """What a node has seen, for logs, heartbeats and tests."""

    scans: int = 0
    sectors: int = 0
    malformed: int = 0
    stray: int = 0  # sectors of a scan this node is not in
    frames: int = 0
    incomplete_frames: int = 0
    duplicates: int = 0
    late_sectors: int = 0
