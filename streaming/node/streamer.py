"""The node streamer: connects out to the aggregator, reassembles frames, counts them in worker processes,
and sends the events to the session's scan writer, which node 0 hosts.

Every node runs the same command. The aggregator numbers the nodes it welcomes and designates the writer's
host (node 0): that node starts the scan writer and announces its address, and the aggregator hands the
address to the others; a node arms (``ready``) only once it knows where the writer is. A node the
aggregator refuses (all slots taken, or another output directory than the writer's) stops with the reason
(NodeRefused), so a mistake is a clear error at start-up, never a second writer.

One loop, one thread, everything polled together: the aggregator socket (read only while a slot is free or
the hold queue has room: the back-pressure), the writer socket, and the counting workers' pipes. Nothing
waits without a deadline: a scan ends when the aggregator says so, or after ``node_deadline`` of silence.
A hosted writer that cannot store a scan stops the node at once and ``run`` raises ScanWriterError.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import zmq

from counting.geometry import ALL_SECTORS
from streaming.live.hooks import LiveNode
from streaming.node.assembly import FrameAssembler, Sealed
from streaming.node.config import NodeConfig, NodeCounters, NodeRefused
from streaming.node.dark_sums import NodeDarkSums
from streaming.node.hold_queue import HoldQueue
from streaming.node.hosted_writer import HostedWriter
from streaming.node.intake import SectorIntake, rest_of_message
from streaming.node.path_links import ForwarderLinks
from streaming.node.polling import LoopPoller
from streaming.node.scan import NodeScan, check_shape
from streaming.node.uplink import AggregatorLink
from streaming.node.workers.pool import CountingPool, CountResult
from streaming.node.workers.shared_blocks import sweep_dead
from streaming.node.workers.slots import SlotMemory
from streaming.node.writer_client import WriterClient
from streaming.protocol import control as p
from streaming.protocol.calibration import calibration_digest, calibration_parts
from streaming.protocol.reasons import EndReason
from streaming.signals import stop_on_signals
from streaming.writer.files import ScanWriterError, check_output_dir

log = logging.getLogger(__name__)
_NOBLOCK = int(zmq.NOBLOCK)  # a plain int: pyzmq's enum flag arithmetic costs more than the call


class NodeStreamer:
    """A node streamer process's state and loop, composed of: the aggregator socket and its hold queue,
    the frame assembler, the counting pool, the writer client, and (on node 0) the hosted scan writer."""

    def __init__(self, config: NodeConfig, dark: np.ndarray | None, gain: np.ndarray | None = None):
        st = config.streaming
        self.config = config
        self.counters = NodeCounters()
        check_output_dir(config.output_dir)  # before anything starts: a clear error, nothing to undo
        self._ctx = zmq.Context(io_threads=st.node_io_threads)  # CURVE decryption runs in I/O threads
        self._stop = threading.Event()
        self._dark, self._gain = dark, gain
        self._calibration = calibration_digest(*calibration_parts(dark, gain))
        self.hosted = HostedWriter(config.writer, st, self._ctx, config.curve)
        self.writer_error: str | None = None  # why the hosted writer failed; run() then raises
        if st.node_workers > 0 and (swept := sweep_dead()).blocks:  # a killed node's memory, else held
            mb = swept.bytes / 1e6
            log.warning("%s: removed %d shared-memory block(s) (%.0f MB) of node processes that no longer run",
                        config.name, swept.blocks, mb)  # fmt: skip
        self.memory = SlotMemory(st.node_slots, st.node_batch, shared=st.node_workers > 0)
        self.assembler = FrameAssembler(self.memory.slots())
        self.pool = CountingPool(self.memory, dark, gain, st.node_workers)
        self.link = AggregatorLink(self._ctx, config)
        self.paths = ForwarderLinks(self._ctx, config)  # the aggregator's forwarding processes, if any
        self.writer = WriterClient(self._ctx, config.name, 4 * st.node_batch, config.curve)
        # Live snapshots and the tap: never blocking.
        self.live = LiveNode(self._ctx, config.name, st.live, config.aggregator, config.curve)
        self._poller = LoopPoller()
        self._held = HoldQueue(st.node_hold_limit)
        self.intake = SectorIntake(self.assembler, self.counters, self._held, self._sealed)
        self._scan: NodeScan | None = None
        # A dark session: the raw frames' per-pixel sums too (streaming.node.dark_sums).
        self.dark_sums = NodeDarkSums(config.output_dir, config.name) if st.accumulate_dark else None

    # ------------------------------------------------------------------------------------------- running
    def stop(self) -> None:
        """Ask the loop to end (safe from signal handlers and other threads)."""
        self.pool.stop()  # workers ended by the same signal are not restarted
        self._stop.set()

    def run(self) -> NodeCounters:
        """Serve scans until stopped or max_scans are done; always releases every resource.

        Raises NodeRefused when the aggregator refused this node, ScanWriterError (after releasing
        everything) when the hosted writer could not store a scan."""
        try:
            self._serve()
        finally:
            self.close()
        if self.link.refused is not None:
            raise NodeRefused(f"{self.config.name} refused by the aggregator: {self.link.refused}")
        if self.writer_error is not None:
            raise ScanWriterError(f"scan writer failed: {self.writer_error}")
        return self.counters

    def _serve(self) -> None:
        log.info("%s", self.config.describe())
        self.link.hello(self.hosted.address)
        while not self._stop.is_set() and self.link.refused is None:
            self._watch()
            events = self._poller.poll(50)
            for sock in self._poller.members("data"):
                if sock in events:
                    self._drain_aggregator(sock)
            if self.writer.socket is not None and self.writer.socket in events:
                self._drain_writer()
            self._take_results(self.pool.collect(0, events))  # the workers' pipes were in this poll
            self._housekeeping()
            if self.hosted.error is not None:
                log.error("%s: scan writer failed, stopping: %s", self.config.name, self.hosted.error)
                break
            if self.config.max_scans is not None and self.counters.scans >= self.config.max_scans:
                break

    def _watch(self) -> None:
        """What the loop polls: the workers' pipes (a restarted worker has a new one), the writer (once
        connected; a new address is a new socket), and the aggregator's and forwarders' connections while
        this node can take sectors (the back-pressure)."""
        self._poller.watch("workers", self.pool.generation, self.pool.connections)
        self._poller.watch("writer", self.writer.socket, lambda: [self.writer.socket])
        data = (self.link.socket, *self.paths.sockets)
        want = self._can_read()
        self._poller.watch("data", (want, data), lambda: list(data) if want else [])

    def close(self) -> None:
        """Take the counts in flight (bounded), stop workers and the writer (it writes what it has), close."""
        deadline = time.monotonic() + (2.0 if self._stop.is_set() and self.hosted.error is None else 0.0)
        while self.pool.outstanding and time.monotonic() < deadline:
            self._take_results(self.pool.collect(0.05))
        self.pool.close()
        try:
            self.writer_error = self.hosted.stop()  # waits for pending writes, which may fail too
        finally:  # sockets and shared memory are released even if the writer's stop raised
            self.link.close()
            self.paths.close()
            # Nothing queued for a writer that failed is worth waiting for.
            self.writer.close(linger_ms=0 if self.writer_error else 2000)
            self.live.close()
            self._ctx.term()
            self.memory.close()

    # ------------------------------------------------------------------------------------------- aggregator
    def _drain_aggregator(self, sock: zmq.Socket) -> None:
        # Bounded batch per poll so writer messages and worker results are never starved.
        for _ in range(256):
            if not self._can_read():
                return
            try:
                kind = sock.recv(_NOBLOCK)
            except zmq.Again:
                return
            self.link.last_heard = time.monotonic()
            if kind == p.DATA and not self._held.controls:  # nothing held may be overtaken: place it now
                self.intake.receive(sock, self._scan)
                continue
            parts = rest_of_message(sock, kind)
            if kind == p.ATTACH:
                self._on_attached(parts)
            elif kind == p.LOST and self._lost_now(parts):
                pass  # about the open scan: taken at once, it may be what frees the slots held behind it
            elif self._held.must_hold(kind):
                self._held.hold(kind, parts)
            elif kind == p.DATA:
                self._on_data(parts)
            else:
                self._on_control(kind, parts)

    def _can_read(self) -> bool:
        """Read on while a slot is free, or while the hold queue for frames needing a slot has room."""
        return self.assembler.can_accept() or self._held.has_room()

    def _replay_held(self) -> None:
        if len(self._held):
            self._held.replay(lambda parts: self._on_data(parts, hold=True), self._on_control)

    def _on_control(self, kind: bytes, parts: list) -> None:
        try:
            if kind == p.WELCOME:
                self._on_welcome(p.decode(kind, parts[1].bytes, p.Welcome))
            elif kind == p.SCAN:
                self._begin_scan(p.decode(kind, parts[1].bytes, p.ScanBegin))
            elif kind == p.END:
                self._end_scan(p.decode(kind, parts[1].bytes, p.ScanEnd))
            elif kind == p.BYE:
                self._on_bye(p.decode(kind, parts[1].bytes, p.Bye))
            elif kind == p.LOST and self._scan is not None:  # else about a scan already closed
                self._scan.take_lost(p.decode(kind, parts[1].bytes, p.NodesLost), self.writer)
            else:
                raise p.ProtocolError(f"unexpected message {kind[:20]!r}")
        except (p.ProtocolError, IndexError) as exc:
            self.counters.malformed += 1
            log.warning("%s: dropped a malformed control message: %s", self.config.name, exc)

    def _on_attached(self, parts: list) -> None:
        try:
            self.paths.on_attached(parts[1].bytes)
        except (p.ProtocolError, IndexError) as exc:
            self.counters.malformed += 1
            log.warning("%s: dropped a malformed attach answer: %s", self.config.name, exc)
            return
        if self.link.welcomed:
            self._arm()

    def _on_welcome(self, w: p.Welcome) -> None:
        self.link.welcome(w)
        self.paths.update(w.data_ports)
        self.live.welcome(w.node_index)
        if w.host_writer and not self.hosted.address:
            self.link.writer_at(self.hosted.start(self._dark, self._gain, self.config.name))
            self.writer.connect(self.hosted.local_address)
        elif w.writer and not (self.hosted.address and w.writer == self.hosted.address):
            self.writer.connect(w.writer)
        self._arm()

    def _arm(self) -> None:
        """Ready for a scan, but only once counted frames have somewhere to go and sectors can come."""
        if self.writer.connected and self.paths.all_attached and self._scan is None:
            self.link.ready(-1)

    def _on_bye(self, bye: p.Bye) -> None:
        if self.link.bye(bye) and self._scan is not None and self._scan.end is None:
            self._close_scan(EndReason.AGGREGATOR_STOPPED)

    def _lost_now(self, parts: list) -> bool:
        """Take a ``lost`` about the open scan at once (True); one about another scan (a next scan whose
        begin may be held) or a malformed one keeps its place in the stream (False)."""
        try:
            lost = p.decode(p.LOST, parts[1].bytes, p.NodesLost)
        except (p.ProtocolError, IndexError):
            return False  # counted and logged where it is taken in order
        return self._scan is not None and self._scan.take_lost(lost, self.writer)

    def _on_data(self, parts: list, hold: bool = False) -> bool:
        """Place a whole sector message; returns False when it needs a slot and none is free (it is then
        held)."""
        return self.intake.place(parts, self._scan, hold)

    def _begin_scan(self, begin: p.ScanBegin) -> None:
        check_shape(begin, self.config.streaming.max_scan_positions)  # before anything is allocated
        if self._scan is not None and self._scan.begin.scan_key == begin.scan_key and begin.scan_key:
            return  # the same scan, announced on another path (a forwarding process)
        if self._scan is not None and self._scan.end is None:
            self._close_scan(EndReason.SUPERSEDED)
        log.info(
            "%s: scan %d begins (%dx%d)",
            self.config.name,
            begin.scan_number,
            begin.scan_width,
            begin.scan_height,
        )
        self._scan = NodeScan(begin)
        for s in self.assembler.begin_scan(begin.scan_number):
            self._sealed(s)
        self.writer.begin(begin)
        self.live.begin(begin)

    def _end_scan(self, end: p.ScanEnd) -> None:
        scan = self._scan
        if scan is None or scan.number != end.scan_number or scan.end is not None:
            return
        if scan.add_end(end):  # every path's end is in: nothing more of this scan can come
            scan.end = scan.combined_end()
            self._close_scan(scan.end.reason)

    def _close_scan(self, reason: EndReason) -> None:
        scan = self._scan
        scan.end_reason = reason
        if scan.end is None:
            scan.end = p.ScanEnd(scan_number=scan.number, sectors_sent=-1, reason=reason)
        for s in self.assembler.flush():
            self._sealed(s)
        counts = self.assembler.take_counters()
        scan.late, scan.evicted = counts.late, counts.evicted
        self.counters.duplicates += counts.duplicates
        self.counters.late_sectors += counts.late
        scan.close_samples(self.writer, sorted(scan.lost.union(scan.end.lost)))
        self._maybe_done()

    # ------------------------------------------------------------------------------------------- counting
    def _sealed(self, sealed: Sealed) -> None:
        scan = self._scan
        if scan is None or sealed.scan_number != scan.number:
            self.assembler.release(sealed.slot)  # frames of a scan already closed: nothing to send them to
            return
        scan.frames += sealed.frames
        scan.incomplete += sealed.incomplete
        slot = self.assembler.slot(sealed.slot)
        if self.dark_sums is not None:
            n = sealed.frames
            self.dark_sums.add(scan.number, scan.begin.scan_key, slot.frames[:n], slot.masks[:n])
        if scan.thresholds is not None:
            self._submit(scan, sealed)
        elif scan.failed:
            self.assembler.release(sealed.slot)
        else:
            scan.pending.append(sealed)
            scan.offer_samples(self.writer, slot, sealed, self.config.estimate.sample_frames)

    def _submit(self, scan: NodeScan, sealed: Sealed) -> None:
        self.pool.submit(sealed.slot, sealed.frames, scan.thresholds)
        scan.outstanding += 1

    def _take_results(self, results: list[CountResult]) -> None:
        for r in results:
            scan = self._scan
            slot = self.assembler.slot(r.slot)
            if scan is not None and slot.scan_number == scan.number:
                n = len(r.events)
                positions, numbers, masks = slot.positions[:n], slot.frame_numbers[:n], slot.masks[:n]
                self.writer.events(scan.begin, positions, numbers, masks, r.events)
                self.live.batch(scan.begin, positions, numbers, masks, r.events)
                scan.outstanding -= 1
                scan.counting_seconds += r.seconds
                self.counters.frames += n
                self.counters.incomplete_frames += int(np.count_nonzero(slot.masks[:n] != ALL_SECTORS))
            self.assembler.release(r.slot)
        if results:
            self._replay_held()
        self._maybe_done()

    def _drain_writer(self) -> None:
        try:
            received = self.writer.receive()
        except (p.ProtocolError, IndexError, ValueError) as exc:
            self.counters.malformed += 1
            log.warning("%s: dropped a malformed writer message: %s", self.config.name, exc)
            return
        for t, dark, gain in received:
            if t.calibration and t.calibration != self._calibration:
                self.pool.recalibrate(dark, gain)  # count with the writer's dark and gain, as all nodes do
                self._calibration = t.calibration
                log.info(
                    "%s: counting with the scan writer's dark and gain (%s)",
                    self.config.name,
                    t.calibration[:8],
                )
            scan = self._scan
            if scan is None or scan.number != t.scan_number or scan.thresholds is not None:
                continue
            for s in scan.take_thresholds(t, self.config.name):
                if scan.failed:
                    self.assembler.release(s.slot)
                else:
                    self._submit(scan, s)
            self._maybe_done()

    def _maybe_done(self) -> None:
        scan = self._scan
        if scan is None or not scan.finished:
            return
        if self.dark_sums is not None:  # on disk before the writer hears the scan is done
            self.dark_sums.finish(scan.number, scan.begin.scan_key)
        to_writer, to_aggregator = scan.done_messages(self.config.name, self.counters.duplicates)
        self.writer.send(to_writer)
        self.live.end(scan.begin)
        self.link.send(to_aggregator)
        self._scan = None
        self.counters.scans += 1
        self.link.ready(scan.number)

    # ------------------------------------------------------------------------------------------- timers
    def _housekeeping(self) -> None:
        now = time.monotonic()
        st = self.config.streaming
        # Also with a control message held: after a lossy scan the aggregator's end waits behind sectors
        # that need slots, and no further data will come to fill the hold queue and trigger the eviction.
        if not self._can_read() or self._held.controls:
            oldest = self.assembler.oldest_waiting()
            if oldest is not None and now - oldest > st.frame_timeout:
                # Never wedge on frames whose sectors are lost or far behind: count what we have, mark it.
                log.warning("%s: frames waited %.1f s for sectors with no slot free; sealing them incomplete",
                            self.config.name, now - oldest)  # fmt: skip
                for s in self.assembler.evict_oldest():
                    self._sealed(s)
                self._replay_held()
        scan = self._scan
        if scan is not None:
            reason = scan.overdue(now, self.link.last_heard, st.node_deadline, self.config.name)
            if reason is not None:
                self._close_scan(reason)
        scan = self._scan
        state = "streaming" if scan is not None else "ready"
        self.link.tick(now, state, scan.number if scan else -1, self.hosted.address)


def run_node(config: NodeConfig, dark: np.ndarray | None, gain: np.ndarray | None = None) -> NodeCounters:
    """Run a node streamer until SIGTERM/SIGINT (or max_scans); the process entry point's body."""
    node = NodeStreamer(config, dark, gain)
    with stop_on_signals(node.stop):
        return node.run()
