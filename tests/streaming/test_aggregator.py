"""The aggregator: routing, the arm handshake, zero loss, lost and malformed data, scan ends, monitor.

Nodes here are a small test double (FakeNode: a DEALER that says hello/ready and records what it gets),
not the real node streamer. Senders are the real run_sender, one thread per module.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
import zmq

from counting.geometry import N_SECTORS, SECTOR_ROWS, ScanShape
from counting.simulator import SimulatedCamera, SimulatorConfig
from streaming.aggregator.aggregator import Aggregator, run_aggregator
from streaming.camera.faults import GARBAGE_KINDS, SenderFaults
from streaming.camera.sender import SendResult, run_sender
from streaming.protocol import control as p
from streaming.protocol.sector import SectorHeader, decode_header
from streaming.settings import StreamingSettings
from streaming.transport.security import CurveClientConfig, CurveServerConfig, apply_client, generate_keypair

pytestmark = pytest.mark.timeout(60)

LOOPBACK = "tcp://127.0.0.1:0"
SMALL = SimulatorConfig(scan=ScanShape(8, 8), pool_size=8, seed=5)
MEDIUM = SimulatorConfig(scan=ScanShape(16, 16), pool_size=8, seed=6)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll predicate every 10 ms until true or timeout; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def digest(buffer: object) -> bytes:
    return hashlib.blake2b(buffer, digest_size=16).digest()


def expected_digests(config: SimulatorConfig) -> dict[tuple[int, int], bytes]:
    """(frame_number, module) -> digest of that sector, from the simulator itself."""
    camera = SimulatedCamera(config)
    out = {}
    for fn in camera.frame_numbers:
        frame = camera.frame(fn)
        for m in range(N_SECTORS):
            out[fn, m] = digest(frame[m * SECTOR_ROWS : (m + 1) * SECTOR_ROWS].tobytes())
    return out


# ----------------------------------------------------------------------------------------- test node
@dataclass
class Received:
    """What a FakeNode got, in order."""

    welcome: list[p.Welcome] = field(default_factory=list)
    begins: list[p.ScanBegin] = field(default_factory=list)
    ends: list[p.ScanEnd] = field(default_factory=list)
    byes: list[p.Bye] = field(default_factory=list)
    lost: list[p.NodesLost] = field(default_factory=list)
    data: list[tuple[SectorHeader, bytes]] = field(default_factory=list)  # (header, payload digest)
    end_times: list[float] = field(default_factory=list)
    data_times: list[float] = field(default_factory=list)
    order: list[bytes] = field(default_factory=list)  # message kinds as they came


class FakeNode:
    """Test double of a node: a DEALER that sends hello (and ready) and records what it receives.

    ready: send READY right after HELLO. rearm: after each END, send DONE then READY. The socket lives
    in the node's own thread; other threads talk to it through a queue.
    """

    def __init__(
        self,
        endpoint: str,
        name: str,
        *,
        ready: bool = True,
        rearm: bool = True,
        curve: CurveClientConfig | None = None,
        rcvhwm: int | None = None,
    ) -> None:
        self.name = name
        self.got = Received()
        self.paused = threading.Event()  # while set, the node does not read (its queue fills up)
        self._endpoint = endpoint
        self._ready = ready
        self._rearm = rearm
        self._curve = curve
        self._rcvhwm = rcvhwm
        self._outbox: queue.Queue[list[bytes]] = queue.Queue()
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._thread = threading.Thread(target=self._loop, name=f"fake-node-{name}", daemon=True)
        self._thread.start()

    def send(self, message: object) -> None:
        """Queue a control message for the node's socket."""
        self._outbox.put(p.encode(message))

    def arm(self) -> None:
        """Send READY."""
        self.send(p.Ready(self.name))

    def close(self) -> None:
        """Stop the node thread and close its socket (the aggregator sees a disconnect)."""
        self._stop.set()
        self._thread.join(timeout=10)
        self._ctx.destroy(linger=0)

    @property
    def sectors(self) -> int:
        return len(self.got.data)

    def _loop(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.linger = 0
        if self._rcvhwm is not None:
            sock.rcvhwm = self._rcvhwm
        if self._curve is not None:
            apply_client(sock, self._curve)
        sock.connect(self._endpoint)
        sock.send_multipart(p.encode(p.Hello(self.name, os.getpid())))
        if self._ready:
            sock.send_multipart(p.encode(p.Ready(self.name)))
        try:
            while not self._stop.is_set():
                while not self._outbox.empty():
                    sock.send_multipart(self._outbox.get_nowait())
                if self.paused.is_set():
                    time.sleep(0.01)
                    continue
                if sock.poll(10):
                    for _ in range(256):
                        try:
                            parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._on_message(sock, parts)
        finally:
            sock.close(linger=0)

    def _on_message(self, sock: zmq.Socket, parts: list[zmq.Frame]) -> None:
        kind = parts[0].bytes
        self.got.order.append(kind)
        if kind == p.DATA:
            self.got.data.append((decode_header(parts[1].bytes), digest(parts[2].buffer)))
            self.got.data_times.append(time.monotonic())
            return
        message = p.decode(kind, parts[1].bytes)
        if isinstance(message, p.Welcome):
            self.got.welcome.append(message)
        elif isinstance(message, p.ScanBegin):
            self.got.begins.append(message)
        elif isinstance(message, p.ScanEnd):
            self.got.ends.append(message)
            self.got.end_times.append(time.monotonic())
            if self._rearm:
                sent = message.sectors_sent
                sock.send_multipart(
                    p.encode(p.Done(self.name, message.scan_number, sent, sent // 4, 0, "ok"))
                )
                sock.send_multipart(p.encode(p.Ready(self.name, message.scan_number)))
        elif isinstance(message, p.Bye):
            self.got.byes.append(message)
        elif isinstance(message, p.NodesLost):
            self.got.lost.append(message)


# ----------------------------------------------------------------------------------------- fixtures
def agg_settings(n_nodes: int, monitor: str | None = LOOPBACK, **kwargs: object) -> StreamingSettings:
    """An aggregator's settings on loopback with 4 receiver ports. The test nodes send no heartbeats, so
    the liveness timeout is long here (its own test sets it short)."""
    values: dict = dict(scan_deadline=2.0, heartbeat=0.2, node_timeout=120.0)
    values.update(kwargs)
    return StreamingSettings(
        receivers=[LOOPBACK] * N_SECTORS, nodes_bind=LOOPBACK, monitor_bind=monitor, n_nodes=n_nodes, **values
    )


class Running:
    """An aggregator running in a thread."""

    def __init__(self, agg: Aggregator) -> None:
        self.agg = agg
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="aggregator", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.agg.run(stop_event=self.stop)
        except BaseException as exc:
            self.error = exc

    def shutdown(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "aggregator did not stop"
        self.agg.close()
        if self.error is not None:
            raise self.error


@pytest.fixture
def start_aggregator() -> Iterator[Callable[..., Aggregator]]:
    """Start aggregators on loopback with 4 receiver ports; all are stopped and closed afterwards."""
    running: list[Running] = []

    def start(n_nodes: int, curve: CurveServerConfig | None = None, **kwargs: object) -> Aggregator:
        agg = Aggregator(agg_settings(n_nodes, **kwargs), curve)
        running.append(Running(agg))
        return agg

    try:
        yield start
    finally:
        for r in running:
            r.shutdown()


@pytest.fixture
def make_node() -> Iterator[Callable[..., FakeNode]]:
    nodes: list[FakeNode] = []

    def make(endpoint: str, name: str, **kwargs: object) -> FakeNode:
        node = FakeNode(endpoint, name, **kwargs)
        nodes.append(node)
        return node

    try:
        yield make
    finally:
        for node in nodes:
            node.close()


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(max_workers=2 * N_SECTORS)
    try:
        yield executor
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def send(
    pool: ThreadPoolExecutor,
    config: SimulatorConfig,
    endpoints: Sequence[str],
    scan_number: int,
    modules: Sequence[int] = range(N_SECTORS),
    **kwargs: object,
) -> list[Future[SendResult]]:
    """Start one real sender thread per module (each with its own simulator)."""
    kwargs.setdefault("send_timeout", 20.0)
    return [
        pool.submit(
            lambda m=m: run_sender(SimulatedCamera(config), endpoints, m, scan_number=scan_number, **kwargs)
        )
        for m in modules
    ]


def results(futures: list[Future[SendResult]]) -> list[SendResult]:
    return [f.result(timeout=30) for f in futures]


def joined(nodes: Sequence[FakeNode], timeout: float = 10.0) -> None:
    assert wait_for(lambda: all(n.got.welcome for n in nodes), timeout), "nodes were not welcomed"


def ended(nodes: Sequence[FakeNode], scans: int = 1, timeout: float = 20.0) -> None:
    assert wait_for(lambda: all(len(n.got.ends) >= scans for n in nodes), timeout), "scan did not end"


# ----------------------------------------------------------------------------------------- tests
def test_routing_whole_frames_even_shares_zero_loss(start_aggregator, make_node, pool) -> None:
    agg = start_aggregator(4)
    nodes = [make_node(agg.nodes_endpoint, f"node{i}") for i in range(4)]
    joined(nodes)
    assert sorted(n.got.welcome[0].node_index for n in nodes) == [0, 1, 2, 3]
    assert {n.got.welcome[0].n_nodes for n in nodes} == {4}
    results(send(pool, MEDIUM, agg.receiver_endpoints, scan_number=3))
    ended(nodes)

    truth = expected_digests(MEDIUM)
    owner: dict[int, set[int]] = {}
    seen: dict[tuple[int, int], bytes] = {}
    for node in nodes:
        index = node.got.welcome[0].node_index
        end = node.got.ends[0]
        assert end.reason == "complete" and end.scan_number == 3
        assert end.sectors_sent == node.sectors  # what the aggregator says it sent is what arrived
        assert (end.sectors_expected, end.sectors_received, end.malformed) == (1024, 1024, 0)
        assert node.got.order[0] == p.WELCOME and node.got.order[1] == p.SCAN and node.got.order[-1] == p.END
        begin = node.got.begins[0]
        assert (begin.scan_number, begin.scan_width, begin.scan_height, begin.expected_frames) == (
            3,
            16,
            16,
            256,
        )
        assert (begin.node_index, begin.n_nodes) == (index, 4)
        for header, payload_digest in node.got.data:
            owner.setdefault(header.frame_number, set()).add(index)
            assert p.route(header.frame_number, 4) == index
            seen[header.frame_number, header.module] = payload_digest
    assert all(len(indices) == 1 for indices in owner.values())  # all 4 sectors of a frame on one node
    assert seen == truth  # every sector once, byte-exact
    frames = [n.sectors // 4 for n in nodes]
    assert sum(frames) == 256 and max(frames) - min(frames) <= 1
    s = agg.stats
    assert (s.received, s.forwarded, s.malformed, s.unroutable, s.late) == (1024, 1024, 0, 0, 0)
    assert s.per_node == {n.name: n.sectors for n in nodes}


def test_arm_handshake(start_aggregator, make_node, pool) -> None:
    """Between scans, a new scan waits (in the receivers' queues) until every node has armed again."""
    agg = start_aggregator(2)
    a = make_node(agg.nodes_endpoint, "a")
    b = make_node(agg.nodes_endpoint, "b", rearm=False)
    joined([a, b])
    results(send(pool, SMALL, agg.receiver_endpoints, scan_number=1))
    ended([a, b])
    before = (agg.stats.received, a.sectors, b.sectors)
    futures = send(pool, SMALL, agg.receiver_endpoints, scan_number=2)
    time.sleep(0.6)
    # Only one of two nodes armed again: nothing more is taken from the receivers, nothing forwarded.
    assert (agg.stats.received, a.sectors, b.sectors) == before
    assert len(a.got.begins) == len(b.got.begins) == 1
    assert agg.state().state == "waiting" and agg.state().nodes_ready == 1
    b.arm()
    ended([a, b], scans=2)
    results(futures)
    assert a.sectors + b.sectors == 2 * 4 * SMALL.total_frames
    assert [a.got.ends[1].reason, b.got.ends[1].reason] == ["complete", "complete"]
    assert agg.stats.refused == 0


def test_a_scan_before_the_session_is_ready_is_refused_and_counted(start_aggregator, make_node, pool) -> None:
    """Before every node has been ready once (the session's 'ready'), a scan is drained from the
    receivers, counted as refused and never forwarded, to its end; the next scan after ready is whole."""
    agg = start_aggregator(2)
    a = make_node(agg.nodes_endpoint, "a")
    b = make_node(agg.nodes_endpoint, "b", ready=False)
    joined([a, b])
    results(send(pool, SMALL, agg.receiver_endpoints, scan_number=1))  # drained: the senders finish
    assert wait_for(lambda: agg.stats.refused == 4 * SMALL.total_frames)
    b.arm()
    assert wait_for(lambda: agg.state().nodes_ready == 2)
    results(send(pool, SMALL, agg.receiver_endpoints, scan_number=2))
    ended([a, b])
    state = agg.state()
    assert (state.refused, state.refused_scans) == (4 * SMALL.total_frames, {1: 4 * SMALL.total_frames})
    assert a.sectors + b.sectors == 4 * SMALL.total_frames  # scan 2 only, whole
    assert [e.scan_number for e in a.got.ends] == [2] and a.got.ends[0].reason == "complete"


def test_extra_node_refused_and_never_fed(start_aggregator, make_node, pool) -> None:
    agg = start_aggregator(1)
    a = make_node(agg.nodes_endpoint, "a")
    joined([a])
    extra = make_node(agg.nodes_endpoint, "extra")
    assert wait_for(lambda: bool(extra.got.byes))
    assert "taken" in extra.got.byes[0].reason and not extra.got.welcome
    results(send(pool, SMALL, agg.receiver_endpoints, scan_number=1))
    ended([a])
    assert a.sectors == 4 * SMALL.total_frames and extra.sectors == 0 and not extra.got.begins


def test_reconnect_with_new_identity_keeps_index(start_aggregator, make_node) -> None:
    agg = start_aggregator(2)
    a = make_node(agg.nodes_endpoint, "a")
    joined([a])
    b = make_node(agg.nodes_endpoint, "b")
    joined([b])
    assert (a.got.welcome[0].node_index, b.got.welcome[0].node_index) == (0, 1)
    a.close()
    a2 = make_node(agg.nodes_endpoint, "a")  # a restarted node: new socket, new identity
    joined([a2])
    assert a2.got.welcome[0].node_index == 0


def test_lost_sectors_end_by_deadline_then_next_scan_works(start_aggregator, make_node, pool) -> None:
    deadline = 0.5
    agg = start_aggregator(2, scan_deadline=deadline)
    nodes = [make_node(agg.nodes_endpoint, n) for n in ("a", "b")]
    joined(nodes)
    drop = frozenset({(1, 0), (10, 1), (11, 1), (64, 3)})  # frame numbers start at 1
    results(send(pool, SMALL, agg.receiver_endpoints, scan_number=5, faults=SenderFaults(drop=drop)))
    ended(nodes)
    total = 4 * SMALL.total_frames
    for node in nodes:
        end = node.got.ends[0]
        assert end.reason == "deadline"
        assert (end.sectors_expected, end.sectors_received) == (total, total - 4)
        assert end.sectors_sent == node.sectors
        silence = node.got.end_times[0] - max(n.got.data_times[-1] for n in nodes)
        assert silence <= deadline + 0.5
    assert sum(n.sectors for n in nodes) == total - 4
    received = {(h.frame_number, h.module) for n in nodes for h, _ in n.got.data}
    assert not received & drop

    results(send(pool, SMALL, agg.receiver_endpoints, scan_number=6))
    ended(nodes, scans=2)
    assert [n.got.ends[1].reason for n in nodes] == ["complete", "complete"]
    assert [e.scan_number for e in agg.stats.ended] == [5, 6]


def test_malformed_messages_counted_and_dropped(start_aggregator, make_node, pool) -> None:
    agg = start_aggregator(2)
    nodes = [make_node(agg.nodes_endpoint, n) for n in ("a", "b")]
    joined(nodes)
    garbage = 2 * len(GARBAGE_KINDS)  # every kind, twice, from each module
    results(send(pool, SMALL, agg.receiver_endpoints, scan_number=2, faults=SenderFaults(garbage=garbage)))
    ended(nodes)
    assert agg.stats.malformed == 4 * garbage
    assert all(n.got.ends[0].malformed == 4 * garbage and n.got.ends[0].reason == "complete" for n in nodes)
    truth = expected_digests(SMALL)
    got = {(h.frame_number, h.module): d for n in nodes for h, d in n.got.data}
    assert got == truth and sum(n.sectors for n in nodes) == len(truth)


def test_two_scans_back_to_back(start_aggregator, make_node, pool) -> None:
    """The next scan is queued while the nodes are still busy: it streams once they re-arm, no deadlock."""
    agg = start_aggregator(2)
    nodes = [make_node(agg.nodes_endpoint, n, rearm=False) for n in ("a", "b")]
    joined(nodes)
    results(send(pool, SMALL, agg.receiver_endpoints, scan_number=20))
    ended(nodes)
    second = send(pool, SMALL, agg.receiver_endpoints, scan_number=21)
    time.sleep(0.4)
    assert all(len(n.got.begins) == 1 for n in nodes) and agg.stats.received == 4 * SMALL.total_frames
    for node in nodes:
        node.arm()
    results(second)
    ended(nodes, scans=2)
    for node in nodes:
        assert [b.scan_number for b in node.got.begins] == [20, 21]
        assert [(e.scan_number, e.reason) for e in node.got.ends] == [(20, "complete"), (21, "complete")]
    assert agg.stats.received == 2 * 4 * SMALL.total_frames and agg.stats.late == 0


def test_newer_scan_supersedes_and_late_sectors_are_dropped(start_aggregator, make_node, pool) -> None:
    agg = start_aggregator(2, scan_deadline=10.0)  # long: only a newer scan can end scan 30 quickly
    nodes = [make_node(agg.nodes_endpoint, n) for n in ("a", "b")]
    joined(nodes)
    results(send(pool, SMALL, agg.receiver_endpoints, scan_number=30, modules=[0, 1, 2]))
    assert wait_for(lambda: agg.stats.received == 3 * SMALL.total_frames)
    start = time.monotonic()
    results(send(pool, SMALL, agg.receiver_endpoints, scan_number=31))
    ended(nodes, scans=2)
    assert time.monotonic() - start < 5
    for node in nodes:
        assert [(e.scan_number, e.reason) for e in node.got.ends] == [(30, "superseded"), (31, "complete")]
        # ScanEnd of 30 comes before ScanBegin of 31, and no sector of 30 after its end.
        kinds = node.got.order
        assert kinds.index(p.END) < len(kinds) - 1 - kinds[::-1].index(p.SCAN)
    # The missing module of scan 30 arrives after it ended: late, dropped.
    results(send(pool, SMALL, agg.receiver_endpoints, scan_number=30, modules=[3]))
    assert wait_for(lambda: agg.stats.late == SMALL.total_frames)
    assert all(h.scan_number != 30 or h.module != 3 for n in nodes for h, _ in n.got.data)
    assert agg.state().late == SMALL.total_frames


def test_disconnected_node_share_goes_to_the_others(start_aggregator, make_node, pool) -> None:
    agg = start_aggregator(2)
    a = make_node(agg.nodes_endpoint, "a")
    b = make_node(agg.nodes_endpoint, "b")
    joined([a, b])
    assert wait_for(lambda: agg.state().nodes_ready == 2)
    b.close()  # gone after arming
    time.sleep(0.5)  # let the aggregator's I/O thread see the disconnect
    results(send(pool, SMALL, agg.receiver_endpoints, scan_number=4))
    ended([a])
    # Noticed at the scan's begin (b cannot take it): every frame goes to a, nothing is lost.
    assert agg.stats.unroutable == 0
    assert a.sectors == 4 * SMALL.total_frames and a.got.ends[0].reason == "complete"
    assert a.got.ends[0].lost == ["b"] and agg.state().nodes_connected == 1  # the writer waits not for b
    # ...and a hears it at once, right after the begin (not only in the end, which may sit behind sectors
    # waiting for thresholds that the writer would hold for b's samples).
    assert a.got.order[1:3] == [p.SCAN, p.LOST], a.got.order[:4]
    begin, lost = a.got.begins[0], a.got.lost
    assert [(m.scan_number, m.scan_key, m.lost) for m in lost] == [(4, begin.scan_key, ["b"])]


@pytest.mark.parametrize("n_nodes", [2, 3, 4, 5])
def test_a_lost_nodes_frames_move_and_no_others(n_nodes: int) -> None:
    """Routing after a loss: every frame of a connected node stays with it (so no frame in flight is split
    between two survivors), and the lost node's frames are spread evenly over the survivors."""
    for lost in range(n_nodes):
        live = [i for i in range(n_nodes) if i != lost]
        moved: dict[int, int] = {}
        for f in range(120 * n_nodes):
            home, to = f % n_nodes, p.route_live(f, live, n_nodes)
            assert to in live
            if home != lost:
                assert to == home
            else:
                moved[to] = moved.get(to, 0) + 1
        assert sorted(moved) == live and max(moved.values()) - min(moved.values()) <= 1, moved
    assert [p.route_live(f, list(range(n_nodes)), n_nodes) for f in range(50)] == [
        f % n_nodes for f in range(50)
    ]


def test_back_pressure_blocks_without_loss(start_aggregator, make_node, pool) -> None:
    agg = start_aggregator(1, aggregator_node_hwm=8)
    sub = zmq.Context.instance().socket(zmq.SUB)
    a = make_node(agg.nodes_endpoint, "a", rcvhwm=8)
    try:
        sub.linger = 0
        sub.subscribe(p.STATE)
        sub.connect(agg.monitor_endpoint)
        joined([a])
        a.paused.set()
        futures = send(pool, MEDIUM, agg.receiver_endpoints, scan_number=8)
        time.sleep(0.8)
        # While the node does not read, the aggregator forwards only what its small queues and the kernel's
        # socket buffers hold (a few MB), and keeps publishing state.
        assert agg.stats.forwarded < 300
        states = []
        while sub.poll(0):
            states.append(p.decode(*sub.recv_multipart()))
        assert any(s.state == "streaming" for s in states)
        a.paused.clear()
        ended([a])
        results(futures)
        assert a.sectors == 4 * MEDIUM.total_frames and agg.stats.unroutable == 0
    finally:
        sub.close(linger=0)


def test_stop_while_blocked_on_a_full_node(make_node, pool) -> None:
    """A stop request ends a send that waits on a full node at once, not after stall_timeout."""
    agg = Aggregator(agg_settings(1, None, aggregator_stall_timeout=30.0, aggregator_node_hwm=4))
    running = Running(agg)
    try:
        a = make_node(agg.nodes_endpoint, "a", rcvhwm=4)
        joined([a])
        a.paused.set()
        futures = send(pool, MEDIUM, agg.receiver_endpoints, scan_number=9, send_timeout=2.0)
        assert wait_for(lambda: agg.stats.forwarded > 0)
        time.sleep(0.3)
    finally:
        start = time.monotonic()
        running.shutdown()
    assert time.monotonic() - start < 3
    assert agg.stats.ended[-1].reason == "shutdown"
    for future in futures:
        future.exception(timeout=10)  # the senders give up by their own timeout; no thread is left behind


@contextlib.contextmanager
def monitor(agg: Aggregator) -> Iterator[zmq.Socket]:
    """A SUB on the aggregator's monitor for its state messages, closed afterwards."""
    sub = zmq.Context.instance().socket(zmq.SUB)
    try:
        sub.linger = 0
        sub.subscribe(p.STATE)
        sub.connect(agg.monitor_endpoint)
        yield sub
    finally:
        sub.close(linger=0)


def test_monitor_publishes_periodic_state(start_aggregator, make_node, pool) -> None:
    agg = start_aggregator(2, heartbeat=0.1)
    with monitor(agg) as sub:
        nodes = [make_node(agg.nodes_endpoint, n) for n in ("a", "b")]
        joined(nodes)
        results(send(pool, SMALL, agg.receiver_endpoints, scan_number=12, faults=SenderFaults(garbage=1)))
        ended(nodes)
        states: list[p.AggregatorState] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len([s for s in states if s.received == 256]) < 3:
            if sub.poll(100):
                kind, body = sub.recv_multipart()
                states.append(p.decode(kind, body, p.AggregatorState))
        final = [s for s in states if s.received == 256]
        assert len(final) >= 3  # periodic, not only on events
        last = final[-1]
        assert (last.forwarded, last.malformed, last.unroutable, last.n_nodes) == (256, 4, 0, 2)
        assert last.per_node == {"a": nodes[0].sectors, "b": nodes[1].sectors}
        assert last.nodes_connected == 2 and last.scan_number == -1
        times = [s.time for s in final]
        assert times == sorted(times)


def test_the_monitor_hears_every_node_armed_at_once_not_a_heartbeat_later(
    start_aggregator, make_node
) -> None:
    """A session waits on the monitor for its nodes to be ready: the state goes out when the last one arms,
    so start-up does not wait up to a heartbeat (30 s here) for it."""
    agg = start_aggregator(2, heartbeat=30.0)
    with monitor(agg) as sub:
        time.sleep(0.3)  # subscribed before the nodes arm (a SUB misses what was published before it joined)
        nodes = [make_node(agg.nodes_endpoint, n) for n in ("a", "b")]
        joined(nodes)
        deadline, ready = time.monotonic() + 15, None
        while ready is None and time.monotonic() < deadline:
            if sub.poll(100):
                kind, body = sub.recv_multipart()
                state = p.decode(kind, body, p.AggregatorState)
                ready = state if state.nodes_ready == 2 else None
        assert ready is not None, "no state with both nodes ready within 15 s (the heartbeat is 30 s)"


def test_stop_says_bye(make_node) -> None:
    agg = Aggregator(agg_settings(1, None))
    running = Running(agg)
    try:
        a = make_node(agg.nodes_endpoint, "a")
        joined([a])
    finally:
        start = time.monotonic()
        running.shutdown()
    assert time.monotonic() - start < 3
    assert wait_for(lambda: [b.reason for b in a.got.byes] == ["shutdown"])


def test_run_aggregator_stops_on_sigterm(make_node) -> None:
    """run_aggregator installs SIGTERM/SIGINT handlers in the main thread and stops cleanly on them."""
    default = signal.getsignal(signal.SIGTERM)

    def kill_when_installed() -> None:
        if wait_for(lambda: signal.getsignal(signal.SIGTERM) is not default, timeout=10):
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=kill_when_installed, daemon=True)
    killer.start()
    start = time.monotonic()
    stats = run_aggregator(agg_settings(1, None), timeout=20)
    killer.join(timeout=10)
    assert time.monotonic() - start < 10
    assert stats.received == 0
    assert signal.getsignal(signal.SIGTERM) is default


def test_curve_aggregator(start_aggregator, make_node, pool, caplog) -> None:
    """A node with the right key gets the scan; unknown-key and plaintext nodes get nothing."""
    caplog.set_level(logging.DEBUG)
    server_public, server_secret = generate_keypair()
    good_public, good_secret = generate_keypair()
    bad_public, bad_secret = generate_keypair()
    monitor_public, monitor_secret = generate_keypair()
    cfg = CurveServerConfig(server_secret, server_public, [good_public, monitor_public])
    agg = start_aggregator(1, curve=cfg)

    # The bad nodes connect first: if either got through it would take the only node slot.
    bad = make_node(agg.nodes_endpoint, "bad", curve=CurveClientConfig(bad_public, bad_secret, server_public))
    plain = make_node(agg.nodes_endpoint, "plain")
    time.sleep(0.5)
    good = make_node(
        agg.nodes_endpoint, "good", curve=CurveClientConfig(good_public, good_secret, server_public)
    )
    joined([good])
    assert good.got.welcome[0].node_index == 0

    ctx = zmq.Context()
    try:
        sub = ctx.socket(zmq.SUB)
        sub.linger = 0
        apply_client(sub, CurveClientConfig(monitor_public, monitor_secret, server_public))
        sub.subscribe(p.STATE)
        sub.connect(agg.monitor_endpoint)
        results(send(pool, SMALL, agg.receiver_endpoints, scan_number=40))
        assert wait_for(lambda: bool(good.got.ends))
        assert good.got.ends[0].reason == "complete" and good.sectors == 4 * SMALL.total_frames
        assert sub.poll(2000), "the allowed monitor gets state"
        assert p.decode(*sub.recv_multipart()).n_nodes == 1
    finally:
        ctx.destroy(linger=0)
    for node in (bad, plain):
        assert not node.got.order, f"{node.name} received {node.got.order[:3]}"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for secret in (server_secret, good_secret, bad_secret, monitor_secret):
        assert secret not in logged
