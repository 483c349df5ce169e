"""The aggregator's bookkeeping of the open scan: expected counts from the sector headers, what arrived,
what went to which node. Pure: no sockets."""

from __future__ import annotations

import logging
import time

from counting.geometry import N_SECTORS
from streaming.protocol import control as p
from streaming.protocol import paths as f
from streaming.protocol.reasons import EndReason
from streaming.protocol.sector import SectorHeader

log = logging.getLogger("streaming.aggregator.aggregator")  # the scan lines are logged as the aggregator's


class OpenScan:
    """Bookkeeping of the open scan: expected counts from the headers, what arrived, what went where."""

    def __init__(self, header: SectorHeader, n_nodes: int, now: float, key: str) -> None:
        self.number = header.scan_number
        self.key = key  # unique: a scan number may come again
        self.width = header.scan_width
        self.height = header.scan_height
        self.started = now
        self.last_sector = now
        self.threads: dict[tuple[int, int], int] = {}  # (module, thread_id) -> frames_this_thread
        # Per module, kept as threads arrive (O(1) each, never a pass over all threads): the sum of the
        # announced counts, whether a thread announced 0 (unknown), whether the module was seen at all.
        self._module_sum = [0] * N_SECTORS
        self._module_unknown = [False] * N_SECTORS
        self._module_seen = [False] * N_SECTORS
        self.module_expected = [0] * N_SECTORS
        self.module_received = [0] * N_SECTORS
        self.modules_done: set[int] = set()
        self.received = 0
        self.malformed = 0
        self.unroutable = 0
        self.sent = [0] * n_nodes  # by this process
        self.sent_elsewhere = [0] * n_nodes  # by the forwarding processes
        self.lost: set[str] = set()  # nodes lost while it streamed (the writer must not wait for them)
        # Frames in the whole scan as far as the first header tells: exact with one thread per receiver.
        self.expected_frames = max(header.frames_this_thread, self.width * self.height)

    def plan(self, session_id: int, routes: list[tuple[int, str]]) -> f.Begin:
        """The scan's plan (what every path tells its nodes, and forwards by), over these routes."""
        return f.Begin(
            scan_number=self.number,
            key=self.key,
            scan_width=self.width,
            scan_height=self.height,
            expected_frames=self.expected_frames,
            n_nodes=len(routes),
            session_id=session_id,
            routes=[list(r) for r in routes],
        )

    def log_begin(self, n_nodes: int) -> None:
        """The scan's begin line."""
        log.info(
            "scan %d begins: %dx%d, ~%d frames, %d nodes",
            self.number,
            self.width,
            self.height,
            self.expected_frames,
            n_nodes,
        )

    def end(self, reason: EndReason) -> f.End:
        """The scan's end (what every path tells its nodes, with what it sent each)."""
        return f.End(
            scan_number=self.number,
            key=self.key,
            reason=reason,
            expected=self.sectors_expected,
            received=self.received,
            malformed=self.malformed,
            lost=sorted(self.lost),
        )

    def lost_message(self) -> p.NodesLost:
        """What the scan's other nodes are told at once when it loses nodes."""
        return p.NodesLost(scan_number=self.number, scan_key=self.key, lost=sorted(self.lost))

    def record(self, end: f.End) -> p.ScanEnd:
        """The ended scan as the aggregator's counters keep it (sectors_sent: all nodes, every path), and
        its log line."""
        log.info(
            "scan %d ends (%s) after %.2f s: %d of %d sectors received, sent per node %s, "
            "%d unroutable, %d malformed",
            self.number,
            end.reason,
            time.monotonic() - self.started,
            self.received,
            end.expected,
            [a + b for a, b in zip(self.sent, self.sent_elsewhere)],  # by every forwarding path
            self.unroutable,
            self.malformed,
        )
        return p.ScanEnd(
            scan_number=self.number,
            sectors_sent=sum(self.sent) + sum(self.sent_elsewhere),
            reason=end.reason,
            sectors_expected=end.expected,
            sectors_received=self.received,
            malformed=self.malformed,
            lost=end.lost,
        )

    def add(self, header: SectorHeader) -> None:
        """Count a sector of this scan."""
        m = header.module
        key = (m, header.thread_id)
        if key not in self.threads:
            self.threads[key] = header.frames_this_thread
            self._update_expected(m, header.frames_this_thread)
        self.received += 1
        self.module_received[m] += 1
        if self.module_received[m] >= self.module_expected[m]:
            self.modules_done.add(m)

    def merge(self, received: int, module_received: list[int], threads: list[list[int]]) -> None:
        """Count what a forwarding process received of this scan (its progress report)."""
        for m, t, n in threads:
            if (m, t) not in self.threads:
                self.threads[(m, t)] = n
                self._update_expected(m, n)
        self.received += received
        for m, k in enumerate(module_received):
            if k:
                self.module_received[m] += k
                if self.module_received[m] >= self.module_expected[m] and self._module_seen[m]:
                    self.modules_done.add(m)

    def _update_expected(self, module: int, count: int) -> None:
        """A new thread of ``module`` announced ``count`` frames: update the module's expected count."""
        self._module_seen[module] = True
        self._module_sum[module] += count
        self._module_unknown[module] = self._module_unknown[module] or count == 0
        # A receiver that does not know its count sends 0: assume one frame per scan position.
        unknown = self._module_unknown[module]
        self.module_expected[module] = self.width * self.height if unknown else self._module_sum[module]
        if self.module_received[module] < self.module_expected[module]:
            self.modules_done.discard(module)

    @property
    def complete(self) -> bool:
        """All four modules seen and each sent all its threads announced."""
        return len(self.modules_done) == N_SECTORS

    @property
    def sectors_expected(self) -> int:
        """Sum over modules; a module never seen is assumed to send as much as the largest seen."""
        seen = [e for m, e in enumerate(self.module_expected) if self._module_seen[m]]
        return sum(seen) + (N_SECTORS - len(seen)) * max(seen, default=self.width * self.height)
