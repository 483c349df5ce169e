"""A node's live snapshots: counted batches go to a thread that adds them to the scan's live images
(counting.live_images) and sends a snapshot to the view at the microscope at most every ``live.interval``
seconds, over a DEALER socket the node connects out with (CURVE when the aggregator link uses it). The
view's only answer on it is the scan's agreed BF geometry, so the images of all nodes add up. With
``live.parallax_bins`` (and a scan of at most ``live.parallax_max_positions``), the same batches also go into
per-position bright-field bin counts (counting.phase.accumulate) for the view's live phase contrast; each
snapshot carries the rows changed since the last one the view took.

The counting loop only hands batches over (``put_nowait`` on a bounded queue); when the queue is full the
batch is dropped and counted, and a snapshot the view cannot take in time is dropped and counted (its sums
are cumulative, so the next one makes up for it). Nothing here ever waits on the view.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time

import numpy as np
import zmq

from counting import live_images
from counting.live_images import LiveGeometry, LiveImages
from counting.phase import accumulate as parallax_sums
from counting.phase.accumulate import ParallaxAccumulator
from counting.phase.bins import ParallaxBins
from streaming.protocol import control as p
from streaming.protocol import live as live_wire
from streaming.settings import LiveSettings
from streaming.transport.security import CurveClientConfig

log = logging.getLogger(__name__)
_STOP = object()
AGREE_WAIT = 2.0  # seconds a node waits for the view's geometry before it settles on its own estimate


class _Scan:
    """One scan's live images on this node, and which positions changed since the last snapshot sent."""

    def __init__(self, begin: p.ScanBegin, live: LiveSettings) -> None:
        given = None
        if live.bf_center is not None and live.bf_radius is not None:
            r = live.bf_radius
            given = LiveGeometry(*live.bf_center, r, live.adf_inner * r, live.adf_outer * r)
        self.begin = begin
        self.images = LiveImages(
            begin.scan_width,
            begin.scan_height,
            given,
            live.estimate_frames,
            (live.adf_inner, live.adf_outer),
            auto_settle=False,  # settled on the geometry the view agrees for the scan (AGREE_WAIT)
        )
        self.proposal: LiveGeometry | None = None  # this node's estimate, offered to the view
        self.proposed_at = 0.0
        self.lo, self.hi = begin.scan_width * begin.scan_height, 0  # positions not yet sent
        self.seq = 0
        self.counted_at = 0.0  # newest batch added
        self.oldest_at = 0.0  # oldest batch added since the last snapshot sent
        self.sent_at = 0.0
        # Live phase contrast: per-position bin counts (counting.phase), bounded by
        # live.parallax_max_positions; rows plo..phi changed since the last snapshot taken.
        positions = begin.scan_width * begin.scan_height
        wanted = live.parallax_bins > 0 and positions <= live.parallax_max_positions
        self.parallax = ParallaxAccumulator(begin.scan_height, begin.scan_width) if wanted else None
        self.plo, self.phi = positions, 0

    def settle_parallax(self, n: int) -> None:
        """Fix the parallax bins once the BF geometry is (their sums then start); none when they would
        exceed the wire's bound."""
        acc, geometry = self.parallax, self.images.geometry
        if acc is None or acc.bins is not None or geometry is None:
            return
        bins = ParallaxBins.from_geometry(geometry, n)
        if len(acc.frames) * bins.count > live_wire.PARALLAX_MAX_CELLS:
            log.warning("no live phase for scan %d: too many positions x bins", self.begin.scan_number)
            self.parallax = None
            return
        acc.settle(bins)  # the batches kept until now are added: their rows are in plo..phi already

    def parallax_part(self) -> tuple[dict | None, dict[str, np.ndarray]]:
        """The snapshot's parallax header and array (rows changed since the last snapshot taken)."""
        acc = self.parallax
        if acc is None or acc.bins is None:
            return None, {}
        lo, hi = self.plo, max(self.phi, self.plo)
        spec = {"n": acc.bins.n, "inner": acc.bins.inner, "bins": acc.bins.count, "lo": lo, "hi": hi}
        return spec, {"parallax": acc.counts[lo:hi].ravel()}


class LivePublisher:
    """Live images of this node's scans, sent to the view; ``begin``/``batch``/``end`` never block."""

    def __init__(
        self,
        context: zmq.Context,
        name: str,
        live: LiveSettings,
        aggregator: str,
        curve: CurveClientConfig | None,
    ) -> None:
        """name: the node's; aggregator: its address as the node reaches it (the view is beside it unless
        live.connect says otherwise); curve: the node's CURVE client keys (None: plain)."""
        self.name, self.settings = name, live
        self.address = live.snapshot_address(aggregator)
        self.dropped_batches = 0  # batches the thread could not take in time (the queue was full)
        self.dropped_snapshots = 0  # snapshots the view could not take in time
        self.sent = 0
        self._ctx, self._curve = context, curve
        self._queue: queue.Queue = queue.Queue(self.settings.queue_batches)
        live_images.warm_up()  # compiled before the node is ready, not during its first scan
        if live.parallax_bins:
            parallax_sums.warm_up()
        self._thread = threading.Thread(target=self._run, name="stemstream-live", daemon=True)
        self._thread.start()

    # --------------------------------------------------------------------------- the counting loop's side
    def begin(self, begin: p.ScanBegin) -> None:
        """A scan begins on this node."""
        self._put(("begin", begin))

    def batch(
        self, key: str, positions: np.ndarray, masks: np.ndarray, offsets: np.ndarray, indices: np.ndarray
    ) -> None:
        """A counted batch (positions and masks are copied: their slot is reused at once)."""
        self._put(("batch", key, positions.copy(), masks.copy(), offsets, indices, time.time()))

    def end(self, key: str) -> None:
        """The node has counted everything of the scan: send its final snapshot."""
        self._put(("end", key))

    def close(self, timeout: float = 2.0) -> None:
        """Stop the thread (after the final snapshots it has) and close its socket."""
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=timeout)
        self._thread.join(timeout)

    def _put(self, item: tuple) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped_batches += 1

    # --------------------------------------------------------------------------- the thread
    def _run(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)  # out to the view; its only answer: the scan's agreed geometry
        sock.setsockopt(zmq.SNDHWM, self.settings.send_hwm)
        sock.setsockopt(zmq.RCVHWM, 16)
        sock.setsockopt(zmq.MAXMSGSIZE, 64 * 1024)  # in: only the view's small geometry answers
        sock.setsockopt(zmq.IMMEDIATE, 1)  # no view connected: drop, never queue for later
        sock.setsockopt(zmq.LINGER, 500)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)  # no view running: retry ever less often, up to 5 s
        if self._curve is not None:
            from streaming.transport.security import apply_client

            apply_client(sock, self._curve)
        sock.connect(self.address)
        scan: _Scan | None = None
        try:
            while True:
                try:
                    item = self._queue.get(timeout=self.settings.interval / 2)
                except queue.Empty:
                    item = None
                if item is _STOP:
                    break
                if item is not None:
                    scan = self._handle(item, scan, sock)
                if scan is not None and scan.images.geometry is None:
                    self._agree(sock, scan)
                if (
                    scan is not None
                    and scan.hi > scan.lo
                    and time.monotonic() - scan.sent_at >= self.settings.interval
                ):
                    self._send(sock, scan, final=False)
        except Exception:  # the live view must never take the node down
            log.exception("%s: live view stopped", self.name)
        finally:
            sock.close()

    def _handle(self, item: tuple, scan: _Scan | None, sock: zmq.Socket) -> _Scan | None:
        kind = item[0]
        if kind == "begin":
            try:
                scan = _Scan(item[1], self.settings)
            except ValueError as exc:  # a shape beyond the live images' cap: this scan has none
                log.warning("%s: no live images for scan %d: %s", self.name, item[1].scan_number, exc)
                return None
            scan.lo, scan.hi = 0, 0
            self._send(sock, scan, final=False)  # the view lists the scan at once
            return scan
        if scan is None or item[1] != scan.begin.scan_key:
            return scan  # a scan already ended
        if kind == "batch":
            _, _, positions, masks, offsets, indices, counted_at = item
            scan.images.add(positions, masks, offsets, indices)
            if scan.parallax is not None:
                scan.parallax.add(positions, masks, offsets, indices)
            if len(positions):
                first, last = int(positions.min()), int(positions.max()) + 1
                scan.lo, scan.hi = min(scan.lo, first), max(scan.hi, last)
                scan.plo, scan.phi = min(scan.plo, first), max(scan.phi, last)
            scan.counted_at = counted_at
            scan.oldest_at = scan.oldest_at or counted_at
            return scan
        self._agree(sock, scan)
        scan.images.settle(scan.proposal)
        scan.lo, scan.hi = 0, scan.begin.scan_width * scan.begin.scan_height
        if not self._send(sock, scan, final=True, wait=1.0):
            log.warning(
                "%s: the live view did not take scan %d's final images", self.name, scan.begin.scan_number
            )
        return None

    def _agree(self, sock: zmq.Socket, scan: _Scan) -> None:
        """Propose this node's estimate once it has enough frames; settle on the view's answer (the first
        geometry any node of the scan proposed), or on its own after AGREE_WAIT without one."""
        for _ in range(16):  # answers that came (bounded)
            try:
                kind, header, _ = live_wire.decode(sock.recv_multipart(flags=zmq.NOBLOCK))
            except zmq.Again:
                break
            except live_wire.LiveWireError:
                continue
            if kind == live_wire.GEOMETRY and header.get("scan_key") == scan.begin.scan_key:
                try:
                    geometry = LiveGeometry(**header["geometry"])
                except (KeyError, TypeError, ValueError):  # never expected from the view (it checks): ignored
                    continue
                scan.images.settle(geometry)
                scan.lo, scan.hi = 0, scan.begin.scan_width * scan.begin.scan_height  # BF/ADF all changed
        if scan.images.geometry is not None or not scan.images.ready_to_estimate:
            return
        if scan.proposal is None:
            scan.proposal, scan.proposed_at = scan.images.estimate(), time.monotonic()
            scan.sent_at = 0.0  # offer it at once
        elif time.monotonic() - scan.proposed_at > AGREE_WAIT:
            scan.images.settle(scan.proposal)  # no view answered: this node's own estimate
            scan.lo, scan.hi = 0, scan.begin.scan_width * scan.begin.scan_height  # kept batches added

    def _send(self, sock: zmq.Socket, scan: _Scan, final: bool, wait: float = 0.0) -> bool:
        b, img = scan.begin, scan.images
        scan.settle_parallax(self.settings.parallax_bins)
        parallax, parallax_arrays = scan.parallax_part()
        a, lo, hi = img.arrays, scan.lo, max(scan.hi, scan.lo)
        header = {
            "node": self.name,
            "node_index": b.node_index,
            "n_nodes": b.n_nodes,
            "scan_number": b.scan_number,
            "scan_key": b.scan_key,
            "width": b.scan_width,
            "height": b.scan_height,
            "expected_frames": b.expected_frames,
            "seq": scan.seq,
            "final": final,
            "frames": img.frames,
            "sectors": img.sectors,
            "events": img.events,
            "geometry": img.geometry.as_dict() if img.geometry else None,
            "proposal": scan.proposal.as_dict() if scan.proposal and not img.geometry else None,
            "dropped_batches": self.dropped_batches,
            "dropped_snapshots": self.dropped_snapshots,
            "counted_at": scan.counted_at,
            "oldest_at": scan.oldest_at,
            "lo": lo,
            "hi": hi,
            "parallax": parallax,
        }
        arrays = {n: getattr(a, n)[lo:hi] for n in ("counts", "bf", "adf", "sum_col", "sum_row", "frames")}
        arrays["pattern"] = a.pattern.astype(np.uint32)
        arrays.update(parallax_arrays)
        parts = live_wire.encode(live_wire.SNAP, header, arrays)
        scan.sent_at = time.monotonic()
        if wait and not sock.poll(int(wait * 1000), zmq.POLLOUT):
            self.dropped_snapshots += 1
            return False
        try:
            sock.send_multipart(parts, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped_snapshots += 1
            return False
        scan.seq += 1
        self.sent += 1
        scan.lo, scan.hi = b.scan_width * b.scan_height, 0
        if parallax is not None:  # before its bins are settled, the rows changed are kept for later
            scan.plo, scan.phi = b.scan_width * b.scan_height, 0
        scan.oldest_at = 0.0
        return True
