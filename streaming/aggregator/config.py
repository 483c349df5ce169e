"""The aggregator's config: a frozen copy of what it and its forwarding processes take from the streaming
settings (built once, by streaming.components, or here from the settings), so no part of it reads the
pydantic settings and a forwarding process gets a small picklable value."""

from __future__ import annotations

from dataclasses import dataclass

from streaming.aggregator.data_path import PathConfig
from streaming.settings import StreamingSettings


@dataclass(frozen=True)
class AggregatorConfig:
    """Everything the aggregator and its forwarding processes need; no defaults of its own."""

    path: PathConfig  # receivers, node address, port stride, queues, stall timeout, scan deadline
    monitor_bind: str | None
    n_nodes: int
    heartbeat: float
    node_timeout: float
    processes: int  # K: the aggregator and K - 1 forwarding processes

    def __post_init__(self) -> None:
        if not self.path.receivers:
            raise ValueError("give at least one receiver address")

    @classmethod
    def of(cls, st: StreamingSettings) -> AggregatorConfig:
        """The aggregator's part of the streaming settings."""
        return cls(
            path=PathConfig.of(st),
            monitor_bind=st.monitor_bind,
            n_nodes=st.n_nodes,
            heartbeat=st.heartbeat,
            node_timeout=st.node_timeout,
            processes=st.aggregator_processes,
        )

    @property
    def scan_deadline(self) -> float:
        """Seconds without a sector of the open scan before it ends."""
        return self.path.scan_deadline
