"""The writer's deadline when a node dies before it offered threshold samples: the survivors' samples give
the thresholds after writer_deadline, so their frames are counted, not written as an empty scan; and a
node that ends a scan on its own deadline is heard, so the writer does not wait for its deadline."""

from __future__ import annotations

import time

import numpy as np
import zmq

from counting.geometry import FRAME_SHAPE, ScanShape
from counting.kernel import Thresholds
from counting.simulator import SimulatorConfig
from stemstream_testing.options import estimation
from streaming.camera.faults import SenderFaults
from streaming.protocol import control as p
from streaming.protocol.record import ScanRecord, ScanStatus
from streaming.writer.writer import ScanWriter, WriterConfig
from tests.streaming.harness import start_session

FIXED = Thresholds(30.5, 600.0)


def test_thresholds_come_from_the_survivors_when_a_node_never_offers(tmp_path):
    config = WriterConfig(tmp_path, 0, "scan_{scan:05d}.h5", "UTC", None, estimation(sample_frames=4), 0.5)
    writer = ScanWriter("tcp://127.0.0.1:0", config, None).start()
    ctx = zmq.Context()
    alive, dead = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    rng = np.random.default_rng(0)
    try:
        for sock, name in ((alive, "n0"), (dead, "n1")):
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(writer.endpoint)
            sock.send_multipart(p.encode(p.NodeScanBegin(name, 1, 4, 2, 2, 0, 0, "k1")))
        frames = [rng.normal(100, 5, FRAME_SHAPE).astype(np.uint16) for _ in range(4)]
        alive.send_multipart(
            [*p.encode(p.SampleHeader("n0", 1, [0, 1, 2, 3], True, "k1")), *[f.tobytes() for f in frames]]
        )
        t0 = time.monotonic()
        assert alive.poll(10_000), "no thresholds within 10 s"  # n1 never offers, never says done
        waited = time.monotonic() - t0
        t = p.decode(*alive.recv_multipart()[:2], p.ScanThresholds)
    finally:
        alive.close()
        dead.close()
        ctx.term()
        writer.stop(timeout=20)
    assert t.scan_number == 1 and np.isfinite(t.background) and np.isfinite(t.xray)
    assert 0.4 < waited < 5


def test_a_node_ending_a_scan_on_its_own_deadline_is_heard_by_the_writer(tmp_path):
    """The aggregator silent mid-scan (one module stops short, and its scan deadline is longer than the
    nodes'): every node ends the scan itself (node-deadline). Its done report cannot say what the
    aggregator sent (-1): the writer takes it all the same, so the scan is written at once with what
    arrived, marked, not after the writer's deadline (the report was once refused as malformed)."""
    config = SimulatorConfig(ScanShape(8, 8), dose=50.0, seed=7)
    drop = frozenset((f, 3) for f in range(48, 64))  # module 3's last 16 sectors never come
    overrides = {"node_deadline": 2.0, "writer_deadline": 60.0}
    session = start_session(tmp_path, 2, fixed=FIXED, scan_deadline=120.0, node_overrides=overrides)
    try:
        session.send(config, scan_number=1, faults=SenderFaults(drop=drop))
        sent = time.monotonic()
        path = session.wait_for_file(1, timeout=40)
        waited = time.monotonic() - sent
    finally:
        session.close()
    record = ScanRecord.load(path.with_suffix(".json"))
    assert record.reasons == ["node-deadline"] and record.nodes_done == 2, record
    assert (record.complete_frames, record.frames_written, record.status) == (48, 64, ScanStatus.INCOMPLETE)
    assert waited < 20, f"written {waited:.1f} s after the last sector: the writer waited for the reports"
