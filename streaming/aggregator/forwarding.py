"""The aggregator's side of its forwarding processes (streaming.aggregator.forwarder): the scan plan they forward by,
the first sector of a new scan they report (begun, held for the arm, or dropped as late or refused), and
their progress reports, merged into the open scan and the counters. A part of Aggregator, kept apart so
each file reads in one sitting."""

from __future__ import annotations

import logging
import time

from streaming.aggregator.open_scan import OpenScan
from streaming.aggregator.stats import PATH_COUNTS
from streaming.protocol import paths as f
from streaming.protocol.sector import WireError, decode_header

log = logging.getLogger(__name__)


class ForwardingControl:
    """Aggregator methods for the forwarding processes (mixed into Aggregator)."""

    def _plan(self, scan: OpenScan) -> f.Begin:
        """The scan's plan for the forwarding processes."""
        return f.Begin(
            scan.number,
            scan.key,
            scan.width,
            scan.height,
            scan.expected_frames,
            len(self._live),
            self.session_id,
            [list(r) for r in self.nodes.routes()],
        )

    def _service_hub(self) -> None:
        for message in self.hub.receive():
            if isinstance(message, f.Progress):
                self._on_progress(message)
            elif isinstance(message, f.Seen):
                self._on_seen(message)

    def _on_seen(self, seen: f.Seen) -> None:
        """A forwarder holds the first sector of a scan it has no word on: begin it, or say why not."""
        try:
            header = decode_header(seen.header)
        except WireError as exc:  # it decoded the header itself: never expected
            log.error("forwarder %d reported an undecodable header: %s", seen.index, exc)
            return
        scan = self._scan
        if scan is not None and header.scan_number == scan.number:
            self.hub.tell(self._plan(scan))  # it began meanwhile
            return
        verdict = self._admit(header, None)
        if verdict in ("refused", "late"):
            self.hub.tell(f.Drop(header.scan_number, verdict))

    def _on_progress(self, pr: f.Progress) -> None:
        st = self.stats
        st.received += pr.received
        st.malformed += pr.malformed
        st.unroutable += pr.unroutable
        st.late += pr.late
        st.refused += pr.refused
        st.forwarded += sum(pr.sent.values())
        path = st.per_path.setdefault(pr.index, dict.fromkeys(PATH_COUNTS, 0))
        for name, k in (
            ("received", pr.received),
            ("forwarded", sum(pr.sent.values())),
            ("malformed", pr.malformed),
            ("late", pr.late),
            ("refused", pr.refused),
            ("unroutable", pr.unroutable),
        ):
            path[name] += k
        for name, k in pr.per_node.items():
            st.per_node[name] = st.per_node.get(name, 0) + k
        scan = self._scan
        if scan is None or pr.key != scan.key:
            return
        scan.merge(pr.received, pr.module_received, pr.threads)
        scan.malformed += pr.malformed
        scan.unroutable += pr.unroutable
        for index, k in pr.sent.items():
            scan.sent_elsewhere[int(index)] += k
        if pr.received:
            scan.last_sector = time.monotonic()
        if scan.complete:
            self._end_scan("complete")
