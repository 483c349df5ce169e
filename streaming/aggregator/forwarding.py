"""The aggregator's side of its forwarding processes (streaming.aggregator.forwarder): what it tells them
(plans, drops, ends, routes) and their progress reports, merged into the open scan and the counters. Which
scan a reported first sector starts is the aggregator's decision (streaming.aggregator.admission)."""

from __future__ import annotations

import logging
import time

import zmq

from counting.geometry import N_SECTORS
from streaming.aggregator.config import AggregatorConfig
from streaming.aggregator.hub import ForwarderHub
from streaming.aggregator.open_scan import OpenScan
from streaming.aggregator.sockets import AggregatorSockets
from streaming.aggregator.stats import PATH_COUNTS, AggregatorStats
from streaming.protocol import paths as f
from streaming.protocol.sector import SectorHeader, WireError, decode_header
from streaming.transport.ratelog import RateLimitedLog
from streaming.transport.security import CurveServerConfig

log = logging.getLogger(__name__)


class ForwardingControl:
    """Talks to the forwarding processes through the hub; adds their progress to ``stats``."""

    def __init__(self, hub: ForwarderHub, stats: AggregatorStats) -> None:
        self.hub, self.stats = hub, stats
        self._log = RateLimitedLog(log)

    @classmethod
    def start(
        cls,
        config: AggregatorConfig,
        curve: CurveServerConfig | None,
        sockets: AggregatorSockets,
        stats: AggregatorStats,
    ) -> ForwardingControl | None:
        """Start the forwarding processes 1..K-1 (none when K = aggregator_processes is 1) and poll their
        hub with the aggregator's sockets; on failure the aggregator's sockets are closed too."""
        if config.processes <= 1:
            return None
        try:
            hub = ForwarderHub(config, curve, sockets.context)
        except BaseException:
            sockets.close()
            raise
        for poller in (sockets.control_poller, sockets.data_poller):
            poller.register(hub.socket, zmq.POLLIN)
        return cls(hub, stats)

    def receiver_endpoints(self, own: list[str]) -> list[str]:
        """Each receiver's addresses on every path, comma-separated (a receiver connects to all)."""
        others = [x.receivers for x in self.hub.forwarders.values()]
        return [",".join([a, *(r[j] for r in others)]) for j, a in enumerate(own)]

    @property
    def socket(self) -> object:
        """The hub's socket (polled with the aggregator's own)."""
        return self.hub.socket

    def tell(self, message: object) -> None:
        """A message to every live forwarder."""
        self.hub.tell(message)

    def receive(self) -> list[object]:
        """The forwarders' messages waiting, decoded."""
        return self.hub.receive()

    def seen_header(self, seen: f.Seen) -> SectorHeader | None:
        """The header a forwarder reports holding (None, logged, if it does not decode: never expected,
        the forwarder decoded it itself)."""
        try:
            return decode_header(seen.header)
        except WireError as exc:
            log.error("forwarder %d reported an undecodable header: %s", seen.index, exc)
            return None

    def merge(self, pr: f.Progress, scan: OpenScan | None) -> bool:
        """Add a progress report to the counters and (when it is the open scan's) to ``scan``; True when
        that completes the scan. A report that does not fit (a node or module index out of range) is
        dropped, counted and logged: it never stops the aggregator."""
        try:
            return self._merge(pr, scan)
        except Exception as exc:  # noqa: BLE001 - a report's content must not stop the aggregator
            self.hub.malformed += 1
            self._log(
                "progress report dropped", "from forwarder %s: %s: %s", pr.index, type(exc).__name__, exc
            )
            return False

    def _merge(self, pr: f.Progress, scan: OpenScan | None) -> bool:
        # Checked before anything is added, so a refused report leaves no partial counts.
        if any(m >= N_SECTORS for m, _, _ in pr.threads):
            raise ValueError("a module number out of range")
        if scan is not None and pr.key == scan.key and any(i >= len(scan.sent_elsewhere) for i in pr.sent):
            raise ValueError("a node index out of range")
        st = self.stats
        forwarded = sum(pr.sent.values())
        st.received += pr.received
        st.malformed += pr.malformed
        st.unroutable += pr.unroutable
        st.late += pr.late
        st.refused += pr.refused
        st.forwarded += forwarded
        path = st.per_path.setdefault(pr.index, dict.fromkeys(PATH_COUNTS, 0))
        for name, k in (
            ("received", pr.received),
            ("forwarded", forwarded),
            ("malformed", pr.malformed),
            ("late", pr.late),
            ("refused", pr.refused),
            ("unroutable", pr.unroutable),
        ):
            path[name] += k
        for name, k in pr.per_node.items():
            st.per_node[name] = st.per_node.get(name, 0) + k
        if scan is None or pr.key != scan.key:
            return False
        scan.merge(pr.received, pr.module_received, pr.threads)
        scan.malformed += pr.malformed
        scan.unroutable += pr.unroutable
        for index, k in pr.sent.items():
            scan.sent_elsewhere[int(index)] += k
        if pr.received:
            scan.last_sector = time.monotonic()
        return scan.complete
