"""The scan writer's files: the permissions the user's umask allows (group-readable on a shared file system
with umask 022), for the streamed scan, its stop record and an offline-counted file alike."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from counting.geometry import ALL_SECTORS, ScanShape
from counting.kernel import Thresholds
from counting.sparse import CountedScan, read_counted_scan, write_counted_scan
from stemstream_testing.options import estimation
from streaming.protocol import control as p
from streaming.writer.writer import ScanWriter, WriterConfig

pytestmark = pytest.mark.timeout(120)
FIXED = Thresholds(30.5, 600.0)


def write_one_scan(out: Path) -> ScanWriter:
    """A writer that gets one 2x2 scan (fixed thresholds) from one node; returns it stopped."""
    config = WriterConfig(out, 0, "scan_{scan:05d}.h5", "America/Los_Angeles", FIXED, estimation(), 30.0)
    writer = ScanWriter("tcp://127.0.0.1:0", config, None).start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(writer.endpoint)
        sock.send_multipart(p.encode(p.NodeScanBegin("n0", 1, 2, 2, 1, 0)))
        events = [np.arange(k, dtype=np.uint32) * 1000 for k in (3, 0, 5, 1)]
        sock.send_multipart(
            [
                *p.encode(p.EventsHeader("n0", 1, 4)),
                np.arange(4, dtype=np.int64)[::-1].copy(),  # in any order
                np.arange(4, dtype=np.int64),
                np.full(4, ALL_SECTORS, np.uint8),
                np.cumsum([0] + [len(e) for e in events]).astype(np.int64),
                np.concatenate(events),
            ]
        )
        sock.send_multipart(p.encode(p.NodeScanDone("n0", 1, 16, 16, 4, 0, 0, "end")))
        deadline = time.monotonic() + 20
        while not writer.records and writer.error is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        sock.close()
        ctx.term()
        writer.stop(timeout=20)
    return writer


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_permissions_the_umask_allows(tmp_path: Path, umask: int, mode: int):
    old = os.umask(umask)
    try:
        writer = write_one_scan(tmp_path / "out")
        events = np.empty((1, 1), object)
        events[0, 0] = np.arange(2, dtype=np.uint32)
        offline = write_counted_scan(
            tmp_path / "offline.h5", CountedScan(ScanShape(1, 1), events, np.full((1, 1), 15, np.uint8))
        )
    finally:
        os.umask(old)
    assert writer.error is None and [r.status for r in writer.records] == ["complete"]
    record = writer.records[0]
    for path in (Path(record.path), Path(record.path).with_suffix(".json"), offline):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    back = read_counted_scan(record.path)
    assert [len(e) for e in back.events.ravel()] == [1, 5, 0, 3]  # positions came in reverse order
    assert record.sha256 and record.frames_written == 4 and record.events == 9
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == [
        ".stemstream",
        "scan_00001.h5",
        "scan_00001.json",
    ]
