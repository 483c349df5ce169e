"""The aggregator: pulls sectors from the four receivers and forwards whole frames to N counting nodes.

Sockets: one PULL bound per receiver address, one ROUTER bound for the nodes (nodes connect outbound with
DEALERs; ROUTER_MANDATORY so a vanished node is an error, not a silent drop; ROUTER_HANDOVER so a
reconnect with the same identity takes over), and an optional PUB for monitors.

Arm handshake: the receivers are polled only while a scan is streaming, or when all N nodes are
connected and READY. Until then sectors wait in the senders' queues (back-pressure up to their HWM, then
their send timeout), so nothing is lost while nodes start. A scan starts streaming when all N nodes are
ready; once it streams it continues until it ends. Nodes re-send READY after ``done`` to arm for the next
scan.

Per sector: validate it (malformed messages are counted and dropped), route it by frame number (all four
sectors of a frame go to one node) and forward the received frames untouched (zero-copy). A scan ends
when all its expected sectors arrived ("complete"), when ``scan_deadline`` seconds pass without one of
its sectors ("deadline": lost data never hangs anything), or when a sector of a newer scan arrives
("superseded"); every node then gets ``end`` with what it was sent. Sectors of an ended scan are "late"
and dropped. See streaming.protocol.control for the messages.

Scale-out: with ``streaming.aggregator_processes`` K > 1 the aggregator starts K - 1 forwarding processes
(streaming.aggregator.forwarder, streaming.aggregator.hub) and stays the one control point: it begins and ends every
scan, holds the routes and the monitor; the processes forward (see aggregator_forwarding). Node control
messages are handled in aggregator_control, which scan a sector belongs to in aggregator_admission.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import zmq

from streaming.aggregator.admission import ScanAdmission
from streaming.aggregator.control import NodeControl
from streaming.aggregator.forwarding import ForwardingControl
from streaming.aggregator.hub import ForwarderHub
from streaming.aggregator.open_scan import OpenScan
from streaming.aggregator.registry import NodeEntry, NodeRegistry
from streaming.aggregator.sockets import AggregatorSockets
from streaming.aggregator.stats import ENDED_MEMORY, AggregatorStats, monitor_state
from streaming.protocol import control as p
from streaming.protocol import paths as f
from streaming.protocol.sector import SectorHeader, WireError, decode_message
from streaming.settings import StreamingSettings
from streaming.signals import stop_on_signals
from streaming.transport.router_io import Sent, drain, send_waiting
from streaming.transport.security import CurveServerConfig

log = logging.getLogger(__name__)

_DRAIN_BATCH = 256  # sectors taken from one receiver before looking at control messages and timers
_BLOCKED_POLL_MS = 2  # while a node's queue is full: how long to wait between send attempts
_MAX_POLL_MS = 100


class Aggregator(NodeControl, ForwardingControl, ScanAdmission):
    """Receives sectors, forwards frames to nodes, ends scans; see the module docstring.

    settings: the streaming settings (receivers, nodes_bind, n_nodes, monitor_bind, scan_deadline,
    heartbeat, node_timeout, aggregator_stall_timeout, aggregator_node_hwm, aggregator_receiver_hwm; port
    0 picks a free port, see receiver_endpoints). curve: CURVE server keys and allowed client keys for the
    node and monitor sockets (None: plain, for loopback). context: a zmq.Context to use (default: its own).
    """

    def __init__(
        self,
        settings: StreamingSettings,
        curve: CurveServerConfig | None = None,
        *,
        context: zmq.Context | None = None,
    ) -> None:
        st = settings
        if not st.receivers:
            raise ValueError("give at least one receiver address")
        self.settings = st
        self.n_nodes = st.n_nodes
        self.scan_deadline = st.scan_deadline
        self.heartbeat = st.heartbeat
        self.stall_timeout = st.aggregator_stall_timeout
        self.session_id = int.from_bytes(os.urandom(4), "little")
        self.security = (
            f"CURVE, {len(curve.allowed_clients)} allowed client key(s)"
            if curve is not None
            else "plain (no CURVE: for loopback or a trusted network only)"
        )
        self.stats = AggregatorStats()
        self.sockets = AggregatorSockets(st, curve, context)  # bound now: the ports are known at once
        self._receivers, self._router, self._monitor = (
            self.sockets.receivers,
            self.sockets.router,
            self.sockets.monitor,
        )
        self._control_poller, self._data_poller = self.sockets.control_poller, self.sockets.data_poller
        self.hub: ForwarderHub | None = None  # forwarding processes 1..K-1 (K = aggregator_processes)
        if st.aggregator_processes > 1:
            try:
                self.hub = ForwarderHub(st, curve, self.sockets.context)
            except BaseException:
                self.sockets.close()
                raise
            for poller in (self._control_poller, self._data_poller):
                poller.register(self.hub.socket, zmq.POLLIN)
        self.nodes = NodeRegistry(st.n_nodes)
        self._live: list[int] = []  # indices of the connected nodes: frames are routed over these
        self._scan: OpenScan | None = None
        self._held: tuple[SectorHeader, list] | None = None  # first sector of a scan waiting for the arm
        self._ended: OrderedDict[int, float] = OrderedDict()  # scan number -> when it ended (monotonic)
        self._armed_once = False  # all nodes have been ready at least once (the session's "ready")
        self._refusing: dict[int, float] = {}  # scan number -> last refused sector (monotonic)
        self._next_state = 0.0
        self._stopping = False
        self._stop_event: threading.Event | None = None
        self._until: Callable[[AggregatorStats], bool] | None = None
        self._end: float | None = None

    @property
    def receiver_endpoints(self) -> list[str]:
        """The bound receiver addresses (real ports when bound to port 0); with forwarding processes, each
        receiver's addresses on every process, comma-separated (a receiver connects to all of them)."""
        own = list(self.sockets.endpoints["receivers"])
        if self.hub is None:
            return own
        others = [x.receivers for x in self.hub.forwarders.values()]
        return [",".join([a, *(r[j] for r in others)]) for j, a in enumerate(own)]

    @property
    def nodes_endpoint(self) -> str:
        """The bound node ROUTER address."""
        return self.sockets.endpoints["nodes"]

    @property
    def monitor_endpoint(self) -> str | None:
        """The bound monitor PUB address, if any."""
        return self.sockets.endpoints["monitor"]

    def __enter__(self) -> Aggregator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the forwarding processes, close the sockets (bounded linger), stop the CURVE
        authenticator; idempotent."""
        if self.hub is not None:
            self.hub.stop()
        self.sockets.close()

    # ------------------------------------------------------------------------------------------ loop
    def run(
        self,
        stop_event: threading.Event | None = None,
        until: Callable[[AggregatorStats], bool] | None = None,
        timeout: float | None = None,
    ) -> AggregatorStats:
        """Serve until stop_event is set, until(stats) is true, or timeout seconds pass; then end an open
        scan, say bye to the nodes and close the sockets (bounded linger). Returns the counters."""
        # Kept as attributes (not a closure over self: a reference cycle would leave the sockets and the
        # context to the garbage collector, whose finalizer order can hang the context's term()).
        self._stop_event, self._until = stop_event, until
        self._end = None if timeout is None else time.monotonic() + timeout
        log.info(
            "aggregator: receivers %s, nodes %s (%d), monitor %s; node and monitor sockets %s; queues: "
            "%d sectors per receiver connection, %d per node",
            self.receiver_endpoints,
            self.nodes_endpoint,
            self.n_nodes,
            self.monitor_endpoint,
            self.security,
            self.settings.aggregator_receiver_hwm,
            self.settings.aggregator_node_hwm,
        )
        try:
            while not self._stop_requested():
                self._step()
        finally:
            try:
                self._shutdown()
            finally:
                self.close()
        return self.stats

    def _stop_requested(self) -> bool:
        """Also asked while a send blocks on a full node, so a stop never waits for stall_timeout."""
        self._stopping = (
            self._stopping
            or (self._stop_event is not None and self._stop_event.is_set())
            or (self._until is not None and self._until(self.stats))
            or (self._end is not None and time.monotonic() >= self._end)
        )
        return self._stopping

    def _step(self) -> None:
        """One poll: control messages, then sectors (when armed or streaming, and before the first arm, to
        refuse them), then timers."""
        self._maybe_begin_held()
        armed = self.nodes.all_ready(self._armed_once)
        self._armed_once = self._armed_once or armed
        streaming = self._scan is not None or (self._held is None and armed) or not self._armed_once
        poller = self._data_poller if streaming else self._control_poller
        events = dict(poller.poll(self._poll_ms()))
        if self._router in events:
            self._service_control()
        if self.hub is not None and self.hub.socket in events:
            self._service_hub()
        if streaming:
            for sock in self._receivers:
                if sock in events:
                    self._drain(sock)
        now = time.monotonic()
        scan = self._scan
        if scan is not None and now - scan.last_sector >= self.scan_deadline:
            self._end_scan("deadline")
        if now >= self._next_state:
            self._check_liveness(now)
            self._publish_state()

    def _check_liveness(self, now: float) -> None:
        """A node silent for node_timeout (no heartbeat) is lost: its place is free for a restarted one."""
        for node in list(self.nodes.by_index.values()):
            if node.connected and now - node.last_seen > self.settings.node_timeout:
                self._lose(node, f"silent for {self.settings.node_timeout:g} s (no heartbeat)")
        if self.hub is not None:
            self.hub.alive_indices()  # logs a forwarding process that died

    def _poll_ms(self) -> int:
        now = time.monotonic()
        wait = min(self._next_state - now, _MAX_POLL_MS / 1000)
        if self._scan is not None:
            wait = min(wait, self._scan.last_sector + self.scan_deadline - now)
        return max(0, int(wait * 1000) + 1)

    def _drain(self, sock: zmq.Socket) -> None:
        """Take up to a batch of messages from one receiver without blocking; a new scan that waits for
        the arm stops the taking."""
        drain(sock, self._on_message, _DRAIN_BATCH, lambda: self._held is not None)

    # ------------------------------------------------------------------------------------------ data
    def _on_message(self, parts: list) -> None:
        try:
            header, _ = decode_message(parts)
        except WireError as exc:
            self._on_malformed(exc)
            return
        scan = self._scan
        if scan is not None and header.scan_number == scan.number:
            self._forward(header, parts)
            return
        verdict = self._admit(header, parts)
        if verdict == "begun":
            self._forward(header, parts)
        elif verdict == "refused":
            self._count_refused(header.scan_number)
        elif verdict == "late":
            self._count_late(header.scan_number)

    def _forward(self, header: SectorHeader, parts: list) -> None:
        scan = self._scan
        assert scan is not None
        scan.add(header)
        self.stats.received += 1
        node = self.nodes.by_index[p.route_live(header.frame_number, self._live)] if self._live else None
        if node is not None and self._send(node, [p.DATA, *parts]):
            scan.sent[node.index] += 1
            self.stats.forwarded += 1
            self.stats.per_node[node.name] = self.stats.per_node.get(node.name, 0) + 1
        else:
            scan.unroutable += 1
            self.stats.unroutable += 1
        scan.last_sector = time.monotonic()  # after the send: time blocked on a full node is not silence
        if scan.complete:
            self._end_scan("complete")

    def _maybe_begin_held(self) -> None:
        if self._held is not None and self._scan is None and self.nodes.all_ready(self._armed_once):
            header, parts = self._held
            self._held = None
            self._begin_scan(header)
            if parts is not None:
                self._forward(header, parts)

    def _begin_scan(self, header: SectorHeader) -> None:
        self.stats.scans += 1
        scan = OpenScan(header, self.n_nodes, time.monotonic(), f"{self.session_id:08x}-{self.stats.scans}")
        self._scan = scan
        for node in self.nodes.by_index.values():
            node.ready = False  # the arm is used up: each node re-arms after its done
        if self.hub is not None:
            self.hub.tell(self._plan(scan))
        for node in self.nodes.by_index.values():
            self._send_control(node, self._scan_begin(scan, node))
        log.info(
            "scan %d begins: %dx%d, ~%d frames, %d nodes",
            scan.number,
            scan.width,
            scan.height,
            scan.expected_frames,
            self.n_nodes,
        )
        self._publish_state()

    def _scan_begin(self, scan: OpenScan, node: NodeEntry) -> p.ScanBegin:
        return p.ScanBegin(
            scan.number,
            scan.width,
            scan.height,
            scan.expected_frames,
            node.index,
            len(self._live),
            self.session_id,
            scan.key,
        )

    def _end_scan(self, reason: str) -> None:
        scan = self._scan
        assert scan is not None
        self._scan = None
        self._ended.pop(scan.number, None)
        self._ended[scan.number] = time.monotonic()
        while len(self._ended) > ENDED_MEMORY:
            self._ended.popitem(last=False)
        expected = scan.sectors_expected
        lost = sorted(scan.lost)
        forwarders = self.hub.alive_indices() if self.hub is not None else []
        for index, node in sorted(self.nodes.by_index.items()):
            end = p.ScanEnd(
                scan.number,
                scan.sent[index],
                reason,
                expected,
                scan.received,
                scan.malformed,
                forwarders=forwarders,
                lost=lost,
            )
            self._send_control(node, end)
        if self.hub is not None:
            self.hub.tell(f.End(scan.number, scan.key, reason, expected, scan.received, scan.malformed, lost))
        self.stats.ended.append(
            p.ScanEnd(
                scan.number,
                sum(scan.sent) + sum(scan.sent_elsewhere),
                reason,
                expected,
                scan.received,
                scan.malformed,
                lost=lost,
            )
        )
        log.info(
            "scan %d ends (%s) after %.2f s: %d of %d sectors received, sent per node %s, "
            "%d unroutable, %d malformed",
            scan.number,
            reason,
            time.monotonic() - scan.started,
            scan.received,
            expected,
            [a + b for a, b in zip(scan.sent, scan.sent_elsewhere)],  # by every forwarding path
            scan.unroutable,
            scan.malformed,
        )
        self._publish_state()

    # ------------------------------------------------------------------------------------------ sending
    def _send(self, node: NodeEntry, parts: list) -> bool:
        """Send [node identity, *parts] zero-copy; block while its queue is full (servicing control).

        False when the node is gone (EHOSTUNREACH) or stalled past stall_timeout: it is then marked
        disconnected, and its sectors count as unroutable until it talks to us again.
        """
        outcome = send_waiting(
            self._router,
            lambda: node.identity if node.connected else None,  # a node can reconnect while we wait
            parts,
            self.stall_timeout,
            self._stop_requested,
            self._wait_for_room,
        )
        if outcome is Sent.UNREACHABLE:
            self._lose(node, "disconnected")
        elif outcome is Sent.STALLED:
            self._lose(node, f"stalled: its queue stayed full for {self.stall_timeout:g} s")
        return outcome is Sent.SENT

    def _wait_for_room(self) -> None:
        if self._control_poller.poll(_BLOCKED_POLL_MS):
            self._service_control()
        if time.monotonic() >= self._next_state:
            self._publish_state()

    def _send_control(self, node: NodeEntry, message: object) -> None:
        if node.connected:
            self._send(node, p.encode(message))

    def _lose(self, node: NodeEntry, why: str) -> None:
        if node.connected:
            rest = len(self._live) - 1
            log.warning(
                "node %s (index %d) %s; its frames in flight are lost, %s",
                node.name,
                node.index,
                why,
                f"later frames go to the {rest} other node(s)" if rest else "no node is left",
            )
            if self._scan is not None:
                self._scan.lost.add(node.name)
        self.nodes.lose(node)
        self._routes_changed()
        self._publish_state()

    def _routes_changed(self) -> None:
        """Route over the connected nodes from now on, here and in every forwarding process."""
        routes = self.nodes.routes()
        self._live = [i for i, _ in routes]
        if self.hub is not None:
            self.hub.tell(f.Routes([list(r) for r in routes]))

    # ------------------------------------------------------------------------------------------ monitor
    def state(self) -> p.AggregatorState:
        """A snapshot for monitors; safe to call from another thread (tests, an embedding process)."""
        return monitor_state(self.nodes, self.stats, self._scan, self._stopping)

    def _publish_state(self) -> None:
        self._next_state = time.monotonic() + self.heartbeat
        if self._monitor is not None:
            self._monitor.send_multipart(p.encode(self.state()))

    # ------------------------------------------------------------------------------------------ stop
    def _shutdown(self) -> None:
        """End an open scan (reason "shutdown"), say bye to every node, publish the final state."""
        self._stopping = True
        if self._scan is not None:
            self._end_scan("shutdown")
        for node in self.nodes.by_index.values():
            if node.connected:
                self._reply(node.identity, p.Bye("shutdown"))
        if self._monitor is not None:
            self._publish_state()
        log.info(
            "aggregator stopped: %d received, %d forwarded, %d malformed, %d unroutable, %d late",
            self.stats.received,
            self.stats.forwarded,
            self.stats.malformed,
            self.stats.unroutable,
            self.stats.late,
        )


def run_aggregator(
    settings: StreamingSettings,
    curve: CurveServerConfig | None = None,
    stop_event: threading.Event | None = None,
    timeout: float | None = None,
) -> AggregatorStats:
    """Run an aggregator until SIGTERM/SIGINT, stop_event, or timeout seconds; returns its counters."""
    stop = stop_event or threading.Event()
    with stop_on_signals(stop.set), Aggregator(settings, curve) as agg:
        return agg.run(stop_event=stop, timeout=timeout)
