"""The aggregator with K forwarding processes (streaming.aggregator_processes): every sector of a frame
reaches the same node whichever process forwards it, the result equals offline counting, a forwarding
process killed mid-scan costs only its sectors, and a lost node's share goes to the survivors."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import numpy as np
import pytest
import zmq

from counting.geometry import ScanShape
from counting.kernel import Thresholds
from counting.pipeline import CountingOptions, count_batches
from counting.simulator import SimulatedCamera, SimulatorConfig
from stemstream_testing.options import options
from stemstream_testing.pipeline import ProcessPipeline
from stemstream_testing.support import wait_until
from streaming.protocol import control as p
from streaming.protocol.record import ScanStatus
from streaming.settings import CurveSettings, StreamingSettings
from streaming.transport.security import CurveClientConfig, apply_client, write_keypair
from tests.streaming.harness import start_session

pytestmark = pytest.mark.timeout(180)
FIXED = Thresholds(30.5, 600.0)


def offline(config: SimulatorConfig, opts: CountingOptions):
    cam = SimulatedCamera(config)
    return count_batches(cam.iter_batches(64), cam.scan, None, opts)


def assert_same_events(a, b) -> None:
    assert a.events.shape == b.events.shape
    for x, y in zip(a.events.ravel(), b.events.ravel(), strict=True):
        np.testing.assert_array_equal(x, y)


def test_three_forwarding_processes_give_the_offline_result_and_equal_shares(tmp_path):
    config = SimulatorConfig(ScanShape(20, 20), dose=80.0, seed=11)
    session = start_session(tmp_path, 2, fixed=FIXED, agg_overrides={"aggregator_processes": 3})
    try:
        agg = session.aggregator
        assert all(e.count(",") == 2 for e in agg.receiver_endpoints)  # each receiver: 3 addresses
        session.send(config, scan_number=7)
        got = session.counted(7)
        state = agg.state()
    finally:
        session.close()
    assert_same_events(got, offline(config, options(fixed=FIXED)))
    assert got.completeness == 1.0
    frames = [r.frames for r in session.results.values()]
    assert sum(frames) == 400 and max(frames) - min(frames) <= 4  # +-1 %
    assert sum(r.incomplete_frames for r in session.results.values()) == 0  # no frame split over nodes
    assert state.received == state.forwarded == 4 * 400 and state.unroutable == 0
    # every process carried part of the data (ZeroMQ spreads each receiver's sectors over them)
    assert agg.stats.received > 0 and len(agg.hub.forwarders) == 2


def test_a_forwarding_process_killed_mid_scan_costs_only_its_sectors(tmp_path):
    config = SimulatorConfig(ScanShape(24, 24), dose=50.0, seed=3)
    session = start_session(
        tmp_path,
        2,
        fixed=FIXED,
        scan_deadline=1.0,
        agg_overrides={"aggregator_processes": 2},
        node_overrides={"node_deadline": 3.0},
    )
    try:
        agg = session.aggregator
        victim = agg.hub.forwarders[1].process

        def kill_soon():
            deadline = time.monotonic() + 20
            while agg.state().scan_received < 400 and time.monotonic() < deadline:
                time.sleep(0.005)
            os.kill(victim.pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_soon, daemon=True)
        killer.start()
        session.send(config, scan_number=2, rate=600)
        killer.join(30)
        got = session.counted(2, timeout=60)
        # monitors are told which part failed (the session names it from this)
        assert wait_until(lambda: 1 in agg.state().paths_lost, timeout=10), agg.state().paths_lost
        assert f"pid {victim.pid}) exited with -9" in agg.state().paths_lost[1]
        # the next scan goes through the survivor alone, complete
        session.send(SimulatorConfig(ScanShape(8, 8), dose=50.0, seed=4), scan_number=3)
        nxt = session.counted(3, timeout=60)
    finally:
        session.close()
    # What the dead process held (if anything: on a loaded machine its queue may be empty when it dies)
    # is missing, and every missing frame is marked; the rest went through the aggregator's own path.
    assert got.completeness > 0.3
    masks = got.sector_masks.ravel()
    assert (got.completeness < 1.0) == bool((masks != 15).any())
    assert got.completeness == sum(int(m).bit_count() for m in masks) / (4 * 576)
    assert nxt.completeness == 1.0
    assert_same_events(
        nxt, offline(SimulatorConfig(ScanShape(8, 8), dose=50.0, seed=4), options(fixed=FIXED))
    )


class PausingCamera(SimulatedCamera):
    """A simulated scan whose rendering waits before frame ``pause_at`` until ``resume`` is set (at most
    ``wait`` s): the senders stop there, so what a test does meanwhile happens mid-scan, however late."""

    def __init__(self, config: SimulatorConfig, pause_at: int, resume: threading.Event, wait: float = 30):
        super().__init__(config)
        self.pause_at, self.resume, self.wait = pause_at, resume, wait

    def iter_batches(self, batch_size: int = 64):
        """The scan's batches, pausing before the one that holds frame ``pause_at``."""
        done = 0
        for batch in super().iter_batches(batch_size):
            if done <= self.pause_at < done + len(batch.frame_numbers):
                self.resume.wait(self.wait)
            done += len(batch.frame_numbers)
            yield batch


def test_nodes_sigkilled_mid_scan_and_between_scans_cost_only_their_frames_in_flight(tmp_path):
    """Three node processes. One that does not host the writer is SIGKILLed mid-scan: later frames go to
    the others, and the scan is written within seconds of its last sector (not after the writer's 60 s
    deadline) missing at most what the dead node held. Another is SIGKILLed between scans, so the
    aggregator finds it gone only as the next scan begins: that scan is complete on the survivor, written
    at once (the survivor is told at once, not only in the scan's end, which waits behind sectors that
    wait for thresholds the writer would hold for the dead node's samples)."""
    config = SimulatorConfig(ScanShape(32, 32), dose=50.0, seed=5)
    # Small queues toward the nodes, so what a node holds (and loses when it dies) is small and known.
    streaming = {
        "writer_deadline": 60.0,
        "node_slots": 4,
        "node_batch": 8,
        "node_hold_limit": 64,
        "aggregator_node_hwm": 64,
        "scan_deadline": 1.0,
        "frame_timeout": 10.0,  # the survivors, on a loaded machine: frames wait for slots, not lost
    }
    with ProcessPipeline(tmp_path, 3, streaming=streaming) as pipe:
        mid, between = (name for name in ("n0", "n1", "n2") if name != pipe.state.writer)
        killed = threading.Event()

        def kill_mid_scan() -> None:
            # At ~40 % of the scan; the senders wait at 75 % until this is done, so it is always mid-scan.
            base = pipe.state.received
            with contextlib.suppress(TimeoutError):
                pipe.wait_state(lambda s: s.received - base >= 1600, 30)
            os.kill(pipe.procs[mid].pid, signal.SIGKILL)
            killed.set()

        killer = threading.Thread(target=kill_mid_scan, daemon=True)
        killer.start()
        sent = pipe.send(PausingCamera(config, 768, killed), scan_number=4, rate=400)
        killer.join(30)
        record, _ = pipe.record(4, timeout=50)
        os.kill(pipe.procs[between].pid, signal.SIGKILL)
        pipe.procs[between].wait(10)
        nxt = SimulatorConfig(ScanShape(16, 16), dose=50.0, seed=6)  # 256 frames: 8x what the slots hold
        sent_next = pipe.send(nxt, scan_number=5, rate=400)
        second, _ = pipe.record(5, timeout=50)
        agg, survivor = pipe.log("agg"), pipe.log(pipe.state.writer)
    assert killed.is_set() and f"node {mid} " in agg and f"node {between} " in agg, agg[-3000:]
    missing = record.expected_frames - record.complete_frames
    # What the dead node held: its slots (4 x 8 frames), hold queue (64 sectors), socket queues (32 + 64
    # sectors) and the kernel's TCP buffers: well under 128 frames. Everything else reached the survivors.
    assert 0 <= missing <= 128, record
    assert record.status is (ScanStatus.INCOMPLETE if missing else ScanStatus.COMPLETE), record
    assert record.written_time - sent.ended < 15, "the writer waited for the node lost mid-scan"
    assert second.completeness == 1.0, second
    assert f"scan 5: node(s) {between} lost; the writer no longer waits for them" in survivor
    assert second.written_time - sent_next.ended < 15, "the writer waited for the node lost as scan 5 began"
    print(
        f"node lost mid-scan: {missing} frames missing, file {record.written_time - sent.ended:.2f} s after; "
        f"node lost as the next scan began: complete, file {second.written_time - sent_next.ended:.2f} s after"
    )


def test_malformed_and_late_sectors_are_counted_per_process_and_in_total(tmp_path):
    config = SimulatorConfig(ScanShape(8, 8), dose=50.0, seed=9)
    session = start_session(
        tmp_path, 1, fixed=FIXED, scan_deadline=60.0, agg_overrides={"aggregator_processes": 2}
    )
    try:
        agg = session.aggregator
        own, other = agg.receiver_endpoints[0].split(",")
        ctx = zmq.Context()
        try:
            for address, garbage in ((own, 3), (other, 5)):
                push = ctx.socket(zmq.PUSH)
                push.connect(address)
                for _ in range(garbage):
                    push.send_multipart([b"not a header", b"x"])
                push.close(linger=2000)
        finally:
            ctx.term()
        session.send(config, scan_number=1)
        assert session.counted(1).completeness == 1.0
        session.send(config, scan_number=1)  # the same scan again within scan_deadline: late, dropped
        deadline = time.monotonic() + 30
        while agg.state().late < 4 * 64 and time.monotonic() < deadline:
            time.sleep(0.05)
        state = agg.state()
    finally:
        session.close()
    assert state.malformed == 8 and state.late == 4 * 64
    paths = state.per_path
    assert paths[0]["malformed"] == 3 and paths[1]["malformed"] == 5
    assert paths[0]["late"] + paths[1]["late"] == 4 * 64 and paths[0]["late"] > 0 and paths[1]["late"] > 0
    assert paths[0]["received"] + paths[1]["received"] == state.received == 4 * 64


def test_curve_with_forwarding_processes_lets_only_known_keys_in(tmp_path):
    """CURVE on every forwarding process: the nodes with allowed keys get a complete scan; a node with an
    unknown key and a plaintext one get nothing from the aggregator or from any forwarding process."""
    keys = tmp_path / "keys"
    _, server_secret = write_keypair(keys, "aggregator")
    node_keys = [write_keypair(keys, f"node{i}") for i in range(2)]
    intruder_public, intruder_secret = write_keypair(keys, "intruder")
    server = CurveSettings(
        server_secret_file=server_secret, allowed_clients=[public for public, _ in node_keys]
    )
    client = CurveSettings(client_secret_file=node_keys[0][1], server_public_file=keys / "aggregator.key")
    config = SimulatorConfig(ScanShape(12, 12), dose=60.0, seed=2)
    session = start_session(
        tmp_path,
        2,
        fixed=FIXED,
        agg_overrides={"aggregator_processes": 2, "curve": server},
        node_overrides={"curve": client},  # both nodes use node0's key: allowed is what counts here
    )
    ctx = zmq.Context()
    probes = []
    try:
        agg = session.aggregator
        addresses = [agg.nodes_endpoint, *(x.nodes for x in agg.hub.forwarders.values())]
        bad = CurveClientConfig.from_files(intruder_secret, keys / "aggregator.key")
        for address in addresses:
            for curve in (bad, None):
                sock = ctx.socket(zmq.DEALER)
                sock.linger = 0
                if curve is not None:
                    apply_client(sock, curve)
                sock.connect(address)
                sock.send_multipart(p.encode(p.Hello(f"intruder-{len(probes)}", 1)))
                sock.send_multipart(p.encode(p.Attach(f"intruder-{len(probes)}")))
                probes.append(sock)
        session.send(config, scan_number=6)
        got = session.counted(6)
        time.sleep(0.5)
        leaked = [i for i, sock in enumerate(probes) if sock.poll(0)]
        state = agg.state()
    finally:
        ctx.destroy(linger=0)
        session.close()
    assert not leaked, f"probes {leaked} received something"
    assert got.completeness == 1.0 and state.nodes_connected == 2
    assert_same_events(got, offline(config, options(fixed=FIXED)))


def test_colliding_ports_are_a_clear_error_before_anything_starts():
    from stemstream_testing.support import free_port
    from streaming.aggregator.aggregator import Aggregator
    from streaming.aggregator.hub import ForwarderError

    port = free_port()
    settings = StreamingSettings(
        receivers=[f"tcp://127.0.0.1:{port}"],
        nodes_bind="tcp://127.0.0.1:0",
        monitor_bind=f"tcp://127.0.0.1:{port + 100}",
        aggregator_processes=2,
    )
    with pytest.raises(ForwarderError, match=r"receiver 0 of path 1 would bind .*already the monitor_bind"):
        Aggregator(settings)
