"""The node streamer: connects out to the aggregator, reassembles frames, counts them in worker processes,
and sends the events to the session's scan writer (which it may host itself).

One loop, one thread, everything polled together: the aggregator socket (read only while a slot is free,
which is the back-pressure), the writer socket, and the counting workers' pipes. Nothing waits without a
deadline: a scan ends when the aggregator says so, or when it has been silent for ``scan_deadline``.

A hosted writer that cannot store a scan (disk full, quota, read-only) stops the node at once, and ``run``
raises ScanWriterError: every later scan would fail the same way, so the writer's host fails loudly rather
than go on streaming scans it cannot store.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq

from counting.geometry import ALL_SECTORS
from counting.kernel import Thresholds
from counting.thresholds import ThresholdConfig
from streaming import protocol as p
from streaming.assembly import FrameAssembler, Sealed
from streaming.counting_pool import CountingPool, CountResult, SlotMemory
from streaming.security import CurveClientConfig, apply_client
from streaming.wire import WireError, decode_message
from streaming.writer import (
    DEFAULT_NAME_TEMPLATE,
    ScanWriter,
    ScanWriterError,
    WriterConfig,
    calibration_digest,
    calibration_parts,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeConfig:
    """Everything a node streamer needs; built from settings and CLI options at the entry point."""

    aggregator: str
    name: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    output_dir: Path | None = None  # host the session's writer, writing here
    writer: str | None = None  # or send counted frames to a writer hosted elsewhere
    writer_bind: str | None = None  # where a hosted writer listens for other nodes
    workers: int = 1  # counting processes; 0 counts in the node process itself
    batch_size: int = 32
    slots: int = 8  # frames in flight at most: slots * batch_size
    fixed: Thresholds | None = None  # only where the writer runs: it decides for every node
    estimate: ThresholdConfig = ThresholdConfig()
    session_id: int = 0
    name_template: str = DEFAULT_NAME_TEMPLATE
    scan_deadline: float = 10.0  # aggregator silent this long while a scan is open: end it
    frame_timeout: float = 1.0  # slots and hold queue full, oldest frame waited this long: seal it
    hold_limit: int = 1024  # sectors held while no slot is free (memory bound: hold_limit * 166 kB)
    writer_deadline: float = 30.0
    heartbeat: float = 1.0
    curve: CurveClientConfig | None = None
    max_scans: int | None = None  # stop after this many scans (tests, one-shot runs)

    def __post_init__(self) -> None:
        if (self.output_dir is None) == (self.writer is None):
            raise ValueError("give --output-dir (this node writes the scans) or --writer ADDR, not both")
        if self.writer is not None and (self.fixed is not None or self.writer_bind is not None):
            raise ValueError("thresholds and --writer-bind belong to the node that hosts the writer")
        if self.batch_size < 1 or self.slots < 2 or self.workers < 0:
            raise ValueError("need batch_size >= 1, slots >= 2, workers >= 0")


@dataclass
class _NodeScan:
    begin: p.ScanBegin
    thresholds: Thresholds | None = None
    failed: bool = False
    pending: list[Sealed] = field(default_factory=list)  # sealed, waiting for thresholds
    outstanding: int = 0  # slots being counted
    samples_sent: int = 0
    samples_closed: bool = False
    end: p.ScanEnd | None = None
    end_reason: str = ""
    sectors: int = 0
    frames: int = 0
    incomplete: int = 0
    counting_seconds: float = 0.0
    late: int = 0
    evicted: int = 0


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


class NodeStreamer:
    """A node streamer process's state and loop."""

    def __init__(self, config: NodeConfig, dark: np.ndarray | None, gain: np.ndarray | None = None):
        self.config = config
        self.counters = NodeCounters()
        self._ctx = zmq.Context()
        self._stop = threading.Event()
        self._writer: ScanWriter | None = None
        self.writer_error: str | None = None  # why the hosted writer failed; run() then raises
        writer_addr = config.writer
        if config.output_dir is not None:
            wcfg = WriterConfig(
                Path(config.output_dir),
                config.session_id,
                config.name_template,
                config.fixed,
                config.estimate,
                config.writer_deadline,
            )
            try:
                self._writer = ScanWriter(
                    config.writer_bind or f"inproc://writer-{id(self)}", wcfg, dark, gain, self._ctx
                ).start()
            except BaseException:  # e.g. an unwritable output directory: no workers exist yet
                self._ctx.destroy(linger=0)  # closes a socket a failed bind left open, then terms
                raise
            writer_addr = self._writer.endpoint
        self._calibration = calibration_digest(*calibration_parts(dark, gain))
        self.memory = SlotMemory(config.slots, config.batch_size, shared=config.workers > 0)
        self.assembler = FrameAssembler(self.memory.slots())
        self.pool = CountingPool(self.memory, dark, gain, config.workers)
        self._agg = self._dealer(config.aggregator, config.curve)
        self._out = self._dealer(writer_addr, None)
        self._scan: _NodeScan | None = None
        self._held: deque = deque()  # (kind, parts) read while no slot was free, in arrival order
        self._held_controls = 0
        self._node_index = -1
        self._welcomed = False
        self._last_agg = time.monotonic()
        self._last_hb = 0.0
        self._last_hello = 0.0

    def _dealer(self, addr: str, curve: CurveClientConfig | None) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.setsockopt(zmq.RCVHWM, 4 * self.config.batch_size)  # back-pressure starts here
        sock.setsockopt(zmq.SNDHWM, 0)  # counted events must never be dropped on the way to the writer
        if curve is not None:
            apply_client(sock, curve)
        sock.connect(addr)
        return sock

    # ------------------------------------------------------------------------------------------- running
    def stop(self) -> None:
        """Ask the loop to end (safe from signal handlers and other threads)."""
        self.pool.closing = True  # workers ended by the same signal are not restarted
        self._stop.set()

    def run(self) -> NodeCounters:
        """Serve scans until stopped or max_scans are done; always releases every resource.

        Raises ScanWriterError (after releasing everything) when the hosted writer could not store a scan.
        """
        try:
            self._serve()
        finally:
            self.close()
        if self.writer_error is not None:
            raise ScanWriterError(f"scan writer failed: {self.writer_error}")
        return self.counters

    def _serve(self) -> None:
        self._hello()
        poller = zmq.Poller()
        poller.register(self._out, zmq.POLLIN)
        registered: list = []
        generation = -1
        reading = False
        while not self._stop.is_set():
            if generation != self.pool.generation:  # a restarted worker has a new pipe
                for conn in registered:
                    poller.unregister(conn)
                registered = self.pool.connections()
                for conn in registered:
                    poller.register(conn, zmq.POLLIN)
                generation = self.pool.generation
            want = self._can_read()
            if want != reading:
                if want:
                    poller.register(self._agg, zmq.POLLIN)
                else:
                    poller.unregister(self._agg)
                reading = want
            events = dict(poller.poll(50))
            if self._agg in events:
                self._drain_aggregator()
            if self._out in events:
                self._drain_writer()
            self._take_results(self.pool.collect(0))
            self._housekeeping()
            if self._writer is not None and self._writer.error is not None:
                log.error("%s: scan writer failed, stopping: %s", self.config.name, self._writer.error)
                break
            if self.config.max_scans is not None and self.counters.scans >= self.config.max_scans:
                break

    def close(self) -> None:
        """Stop workers and the hosted writer (after it has written what it has), close sockets."""
        self.pool.close()
        try:
            if self._writer is not None:
                writer, self._writer = self._writer, None
                try:
                    writer.stop()  # waits for pending writes, which may fail too (a last scan, max_scans)
                finally:
                    self.writer_error = writer.error
        finally:  # sockets and shared memory are released even if the writer's stop raised
            for sock in (self._agg, self._out):
                # Nothing queued for a writer that failed is worth waiting for.
                sock.close(linger=0 if self.writer_error and sock is self._out else 2000)
            self._ctx.term()
            self.memory.close()

    def _hello(self) -> None:
        self._agg.send_multipart(p.encode(p.Hello(self.config.name, os.getpid())))
        self._agg.send_multipart(p.encode(p.Ready(self.config.name, -1)))
        self._last_hello = time.monotonic()

    # ------------------------------------------------------------------------------------------- aggregator
    def _drain_aggregator(self) -> None:
        # Bounded batch per poll so writer messages and worker results are never starved.
        for _ in range(256):
            if not self._can_read() or not self._agg.poll(0):
                return
            parts = self._agg.recv_multipart(copy=False)
            self._last_agg = time.monotonic()
            kind = parts[0].bytes
            if self._held_controls or (self._held and kind != p.DATA):
                # A control message (a scan's end, the next scan) must not overtake held sectors, and
                # everything after a held control message waits too, in order.
                self._held.append((kind, parts))
                self._held_controls += kind != p.DATA
            elif kind == p.DATA:
                self._on_data(parts)
            else:
                self._on_control(kind, parts)

    def _can_read(self) -> bool:
        """Read on while a slot is free, or while the hold queue for frames needing a slot has room."""
        return self.assembler.can_accept() or len(self._held) < self.config.hold_limit

    def _replay_held(self) -> None:
        """Place held sectors that now fit, and run held control messages once nothing before them waits."""
        if not self._held:
            return
        waiting: deque = deque()
        blocked = False
        while self._held:
            kind, parts = self._held.popleft()
            if kind != p.DATA:
                if blocked:
                    waiting.append((kind, parts))
                    continue
                self._held_controls -= 1
                self._on_control(kind, parts)
            elif not self._on_data(parts, hold=True):
                blocked = True
                waiting.append((kind, parts))
        self._held = waiting

    def _on_control(self, kind: bytes, parts: list) -> None:
        try:
            if kind == p.WELCOME:
                w = p.decode(kind, parts[1].bytes, p.Welcome)
                self._node_index, self._welcomed = w.node_index, True
                log.info("%s: welcomed as node %d of %d", self.config.name, w.node_index, w.n_nodes)
            elif kind == p.SCAN:
                self._begin_scan(p.decode(kind, parts[1].bytes, p.ScanBegin))
            elif kind == p.END:
                self._end_scan(p.decode(kind, parts[1].bytes, p.ScanEnd))
            elif kind == p.BYE:
                log.warning("%s: the aggregator went away", self.config.name)
                if self._scan is not None and self._scan.end is None:
                    self._close_scan("aggregator-stopped")
                self._welcomed = False
            else:
                raise p.ProtocolError(f"unexpected message {kind[:20]!r}")
        except (p.ProtocolError, IndexError) as exc:
            self.counters.malformed += 1
            log.warning("%s: dropped a malformed control message: %s", self.config.name, exc)

    def _on_data(self, parts: list, hold: bool = False) -> bool:
        """Place a sector; returns False when it needs a slot and none is free (it is then held)."""
        if len(parts) != 3:
            self.counters.malformed += 1
            return True
        try:
            header, payload = decode_message(parts[1:])
        except WireError:
            self.counters.malformed += 1
            return True
        scan = self._scan
        if scan is None or scan.end is not None or header.scan_number != scan.begin.scan_number:
            self.counters.stray += 1
            return True
        if header.scan_width != scan.begin.scan_width or header.scan_height != scan.begin.scan_height:
            self.counters.malformed += 1
            return True
        if not self.assembler.has_room_for(header.frame_number):
            # Sectors of frames already in flight may still arrive behind this one: keep reading.
            if not hold:
                self._held.append((p.DATA, parts))
            return False
        scan.sectors += 1
        self.counters.sectors += 1
        sealed = self.assembler.add(header.frame_number, header.position, header.module, payload)
        for s in sealed:
            self._sealed(s)
        return True

    def _begin_scan(self, begin: p.ScanBegin) -> None:
        if self._scan is not None and self._scan.end is None:
            self._close_scan("superseded")
        log.info(
            "%s: scan %d begins (%dx%d)",
            self.config.name,
            begin.scan_number,
            begin.scan_width,
            begin.scan_height,
        )
        self._scan = _NodeScan(begin)
        for s in self.assembler.begin_scan(begin.scan_number):
            self._sealed(s)
        self._out.send_multipart(
            p.encode(
                p.NodeScanBegin(
                    self.config.name,
                    begin.scan_number,
                    begin.scan_width,
                    begin.scan_height,
                    begin.n_nodes,
                    begin.node_index,
                    begin.session_id,
                )
            )
        )

    def _end_scan(self, end: p.ScanEnd) -> None:
        scan = self._scan
        if scan is None or scan.begin.scan_number != end.scan_number or scan.end is not None:
            return
        scan.end = end
        self._close_scan(end.reason)

    def _close_scan(self, reason: str) -> None:
        scan = self._scan
        scan.end_reason = reason
        if scan.end is None:
            scan.end = p.ScanEnd(scan.begin.scan_number, -1, reason)
        for s in self.assembler.flush():
            self._sealed(s)
        scan.late, scan.evicted = self.assembler.late, self.assembler.evicted
        self.counters.duplicates += self.assembler.duplicates
        self.counters.late_sectors += self.assembler.late
        self.assembler.duplicates = self.assembler.late = self.assembler.evicted = 0
        self._close_samples()
        self._maybe_done()

    # ------------------------------------------------------------------------------------------- counting
    def _sealed(self, sealed: Sealed) -> None:
        scan = self._scan
        if scan is None or sealed.scan_number != scan.begin.scan_number:
            self.assembler.release(sealed.slot)  # frames of a scan already closed: nothing to send them to
            return
        scan.frames += sealed.frames
        scan.incomplete += sealed.incomplete
        if scan.thresholds is not None:
            self._submit(scan, sealed)
            return
        if scan.failed:
            self.assembler.release(sealed.slot)
            return
        scan.pending.append(sealed)
        self._offer_samples(scan, sealed)

    def _offer_samples(self, scan: _NodeScan, sealed: Sealed) -> None:
        need = self.config.estimate.num_blocks - scan.samples_sent
        if scan.samples_closed or need <= 0:
            return
        slot = self.assembler.slot(sealed.slot)
        rows = np.flatnonzero(slot.masks[: sealed.frames] == ALL_SECTORS)[:need]
        numbers = [int(n) for n in slot.frame_numbers[rows]]
        scan.samples_sent += len(rows)
        last = scan.samples_sent >= self.config.estimate.num_blocks
        header = p.SampleHeader(self.config.name, scan.begin.scan_number, numbers, last)
        self._out.send_multipart([*p.encode(header), *[slot.frames[r].tobytes() for r in rows]])
        scan.samples_closed = last

    def _close_samples(self) -> None:
        scan = self._scan
        if scan is not None and not scan.samples_closed and scan.thresholds is None:
            self._out.send_multipart(
                p.encode(p.SampleHeader(self.config.name, scan.begin.scan_number, [], True))
            )
            scan.samples_closed = True

    def _submit(self, scan: _NodeScan, sealed: Sealed) -> None:
        self.pool.submit(sealed.slot, sealed.frames, scan.thresholds)
        scan.outstanding += 1

    def _take_results(self, results: list[CountResult]) -> None:
        for r in results:
            scan = self._scan
            slot = self.assembler.slot(r.slot)
            if scan is not None and slot.scan_number == scan.begin.scan_number:
                n = len(r.events)
                # send_multipart copies each part (copy=True), so slot views are safe to reuse at once.
                self._out.send_multipart(
                    [
                        *p.encode(p.EventsHeader(self.config.name, scan.begin.scan_number, n)),
                        slot.positions[:n],
                        slot.frame_numbers[:n],
                        slot.masks[:n],
                        r.events.offsets,
                        r.events.indices,
                    ]
                )
                scan.outstanding -= 1
                scan.counting_seconds += r.seconds
                self.counters.frames += n
                self.counters.incomplete_frames += int(np.count_nonzero(slot.masks[:n] != ALL_SECTORS))
            self.assembler.release(r.slot)
        if results:
            self._replay_held()
        self._maybe_done()

    def _drain_writer(self) -> None:
        while self._out.poll(0):
            parts = self._out.recv_multipart()
            try:
                t = p.decode(parts[0], parts[1], p.ScanThresholds)
                if t.calibration and t.calibration != self._calibration:
                    self._adopt_calibration(t.calibration, parts[2], parts[3])
            except (p.ProtocolError, IndexError, ValueError) as exc:
                self.counters.malformed += 1
                log.warning("%s: dropped a malformed writer message: %s", self.config.name, exc)
                continue
            scan = self._scan
            if scan is None or scan.begin.scan_number != t.scan_number or scan.thresholds is not None:
                continue
            if not (np.isfinite(t.background) and np.isfinite(t.xray)):
                log.error(
                    "%s: scan %d has no thresholds (%s); its frames are not counted",
                    self.config.name,
                    t.scan_number,
                    t.metadata.get("error"),
                )
                scan.failed = True
                for s in scan.pending:
                    self.assembler.release(s.slot)
                scan.pending.clear()
            else:
                scan.thresholds = Thresholds(t.background, t.xray)
                scan.samples_closed = True
                for s in scan.pending:
                    self._submit(scan, s)
                scan.pending.clear()
            self._maybe_done()

    def _adopt_calibration(self, digest: str, dark_bytes: bytes, gain_bytes: bytes) -> None:
        """Count with the writer's dark and gain, so every node and the thresholds agree."""
        from counting.geometry import FRAME_SHAPE

        def array(raw: bytes) -> np.ndarray | None:
            return np.frombuffer(raw, np.float32).reshape(FRAME_SHAPE).copy() if raw else None

        self.pool.recalibrate(array(dark_bytes), array(gain_bytes))
        self._calibration = digest
        log.info(
            "%s: counting with the scan writer's dark reference and gain (%s)", self.config.name, digest[:8]
        )

    def _maybe_done(self) -> None:
        scan = self._scan
        if scan is None or scan.end is None or scan.pending or scan.outstanding:
            return
        end = scan.end
        self._out.send_multipart(
            p.encode(
                p.NodeScanDone(
                    self.config.name,
                    scan.begin.scan_number,
                    scan.sectors,
                    end.sectors_sent,
                    scan.frames,
                    scan.incomplete,
                    self.counters.duplicates,
                    scan.end_reason or end.reason,
                    scan.counting_seconds,
                    scan.late,
                    scan.evicted,
                )
            )
        )
        self._agg.send_multipart(
            p.encode(
                p.Done(
                    self.config.name,
                    scan.begin.scan_number,
                    scan.sectors,
                    scan.frames,
                    scan.incomplete,
                    scan.end_reason or end.reason,
                )
            )
        )
        log.info(
            "%s: scan %d done: %d sectors, %d frames (%d incomplete), %s",
            self.config.name,
            scan.begin.scan_number,
            scan.sectors,
            scan.frames,
            scan.incomplete,
            scan.end_reason,
        )
        self._scan = None
        self.counters.scans += 1
        self._agg.send_multipart(p.encode(p.Ready(self.config.name, end.scan_number)))

    # ------------------------------------------------------------------------------------------- timers
    def _housekeeping(self) -> None:
        now = time.monotonic()
        # Also with a control message held: after a lossy scan the aggregator's end waits behind sectors
        # that need slots, and no further data will come to fill the hold queue and trigger the eviction.
        if not self._can_read() or self._held_controls:
            oldest = self.assembler.oldest_waiting()
            if oldest is not None and now - oldest > self.config.frame_timeout:
                # Never wedge on frames whose sectors are lost or far behind: count what we have, mark it.
                log.warning(
                    "%s: frames waited %.1f s for sectors with no slot free; sealing them incomplete",
                    self.config.name,
                    now - oldest,
                )
                for s in self.assembler.evict_oldest():
                    self._sealed(s)
                self._replay_held()
        scan = self._scan
        if scan is not None and scan.end is None and now - self._last_agg > self.config.scan_deadline:
            log.warning(
                "%s: scan %d: aggregator silent for %.1f s, ending the scan",
                self.config.name,
                scan.begin.scan_number,
                self.config.scan_deadline,
            )
            self._close_scan("node-deadline")
        if now - self._last_hb > self.config.heartbeat:
            state = "streaming" if self._scan is not None else "ready"
            self._agg.send_multipart(
                p.encode(p.Heartbeat(self.config.name, state, scan.begin.scan_number if scan else -1))
            )
            self._last_hb = now
        if not self._welcomed and now - self._last_hello > max(self.config.heartbeat, 1.0):
            self._hello()  # a restarted aggregator learns about us again


def run_node(config: NodeConfig, dark: np.ndarray | None, gain: np.ndarray | None = None) -> NodeCounters:
    """Run a node streamer until SIGTERM/SIGINT (or max_scans); the process entry point's body."""
    node = NodeStreamer(config, dark, gain)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, lambda *_: node.stop()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return node.run()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
