"""One scan the writer is receiving: its file, its nodes, its threshold offer and how far each node got."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from counting.scan_file import ScanFile
from streaming.protocol import control as p
from streaming.writer.thresholds import SampleOffer


@dataclass(eq=False)
class OpenScan:
    """A scan between its first node's begin and its finish (all nodes done, or the writer's deadline)."""

    begin: p.NodeScanBegin  # the first node's: number, shape, node count, keys
    started: float  # wall clock at the first begin: the file name carries it
    scan_id: int  # unique in the output directory
    path: Path  # its final name
    file: ScanFile  # written as counted frames arrive
    samples: SampleOffer  # frames offered for the threshold estimate
    nodes: dict[bytes, str] = field(default_factory=dict)  # identity -> node name
    done: dict[str, p.NodeScanDone] = field(default_factory=dict)  # by node name
    thresholds: p.ScanThresholds | None = None  # once decided: every node counts with them
    frames: int = 0  # counted frames received
    first_data: float = 0.0  # wall clock of the first counted frames
    last_activity: float = field(default_factory=time.monotonic)

    def touch(self) -> None:
        """Something arrived: the writer's deadline starts again."""
        self.last_activity = time.monotonic()

    def silent_for(self, now: float) -> float:
        """Seconds since anything of this scan arrived (monotonic clock)."""
        return now - self.last_activity

    @property
    def all_done(self) -> bool:
        """Every node reported done, or was lost (lost nodes never report: they are not waited for)."""
        lost = {name for d in self.done.values() for name in d.lost} - self.done.keys()
        return len(self.done) + len(lost) >= self.begin.n_nodes


def scan_key(message: p.NodeScanBegin | p.SampleHeader | p.EventsHeader | p.NodeScanDone) -> str:
    """The scan a message belongs to: its aggregator key (the number alone, from older nodes)."""
    return message.scan_key or f"number-{message.scan_number}"
