"""The writer's deadline when a node dies before it offered threshold samples: the survivors' samples give
the thresholds after writer_deadline, so their frames are counted, not written as an empty scan."""

from __future__ import annotations

import time

import numpy as np
import zmq

from counting.geometry import FRAME_SHAPE
from stemstream_testing.options import estimation
from streaming.protocol import control as p
from streaming.writer.writer import ScanWriter, WriterConfig


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
