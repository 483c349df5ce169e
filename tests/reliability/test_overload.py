"""Overload: the camera at twice the rate the pipeline sustains. Real processes (an aggregator and two node
streamers from the CLI, with small queues), the four receivers as real-time sender threads here.

A camera cannot wait, so sectors are lost; what matters is that memory stays bounded by the configured
queues and that every lost sector is counted somewhere and marked missing in the file, never silently.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from counting.geometry import FRAME_BYTES, N_SECTORS, SECTOR_BYTES, ScanShape
from counting.simulator import SimulatedCamera, SimulatorConfig
from counting.sparse import read_counted_scan
from flows.settings import load_settings, write_settings_file
from stemstream_testing.pipeline import ProcessPipeline
from streaming.settings import StreamingSettings

# serial: the sustainable rate is measured, then the camera runs at twice it (other tests beside it would
# change the rate between the two)
pytestmark = [pytest.mark.timeout(150), pytest.mark.serial]

# Small queues, so the scan is many times what the pipeline can hold.
RECEIVER_HWM = 8  # aggregator: sectors per receiver connection
NODE_HWM = 16  # aggregator: sectors per node
SLOTS, BATCH = 4, 16  # node: batches in flight, frames per batch
SENDER_HWM = 32  # each receiver's own buffer, in sectors
STREAMING = {
    "aggregator_receiver_hwm": RECEIVER_HWM,
    "aggregator_node_hwm": NODE_HWM,
    "node_slots": SLOTS,
    "node_batch": BATCH,
    "node_workers": 1,
    # Frames that lost a sector never complete; under loss they leave their slot only by this timeout.
    "frame_timeout": 0.2,
    "heartbeat": 0.2,
    "scan_deadline": 1.0,
}
THRESHOLDS = {"background_threshold": 30.5, "xray_threshold": 600}
MEASURE = ScanShape(48, 48)  # back-pressured: the sustainable rate
OVERLOAD = ScanShape(96, 96)  # real time at 2x that rate: 9216 frames, 6.1 GB of raw sectors
MB = 1 << 20


def camera(scan: ScanShape, scan_number: int) -> SimulatedCamera:
    """One simulated camera, shared by the four sender threads."""
    return SimulatedCamera(SimulatorConfig(scan, dose=100.0, seed=scan_number))


def memory_bound(n_nodes: int) -> int:
    """Bytes the configured queues may hold: aggregator receiver and node queues, each node's socket,
    hold queue and slots (slots are shared memory, counted in both the node and its worker's VmRSS)."""
    hold = StreamingSettings(**STREAMING).node_hold_limit
    sector = SECTOR_BYTES + 64  # payload plus header
    aggregator = (RECEIVER_HWM * N_SECTORS + NODE_HWM * n_nodes) * sector
    node = (4 * BATCH + hold) * sector + 2 * SLOTS * BATCH * FRAME_BYTES  # rcvhwm is 4 batches
    return aggregator + n_nodes * node


def test_the_processes_get_the_queues_the_memory_bound_assumes(tmp_path: Path, monkeypatch) -> None:
    """memory_bound() assumes these queues: every key is a real setting (a misspelt one would be ignored,
    leaving the default queues) and the settings file the processes get carries them, whatever the
    environment says."""
    assert set(STREAMING) <= set(StreamingSettings.model_fields)
    monkeypatch.setenv("STEMSTREAM_STREAMING__AGGREGATOR_NODE_HWM", str(100 * NODE_HWM))
    path = write_settings_file(load_settings(streaming=STREAMING), tmp_path / "settings.json")
    streaming = load_settings(path).streaming
    assert {k: getattr(streaming, k) for k in STREAMING} == STREAMING


@pytest.mark.slow
def test_camera_at_twice_the_sustainable_rate(tmp_path: Path) -> None:
    with ProcessPipeline(tmp_path, 2, streaming=STREAMING, counting=THRESHOLDS) as pipe:
        idle = pipe.memory.total()

        # 1. Back-pressured: nothing lost; the counted rate is what the pipeline sustains here, now.
        senders = pipe.send(camera(MEASURE, 1), 1, send_timeout=60, hwm=SENDER_HWM)
        record, _ = pipe.record(1, timeout=60)
        assert record.status == "complete" and senders.overflowed == 0, (record, pipe.tails())
        rate = record.frames_written / (record.written_time - record.first_data_time)
        before = pipe.wait_state(lambda s: s.nodes_ready == 2 and s.received == 4 * MEASURE.positions, 20)
        assert before.unroutable == before.late == before.malformed == 0

        # 2. Real time at twice that rate, far longer than the queues: sectors must be lost, counted.
        # Memory is measured from here: scan 1 warmed up the counting workers (their one-time JIT and
        # buffers are not queues) and already filled the queues once under back-pressure.
        warm = pipe.memory.reset()
        t0 = time.monotonic()
        senders = pipe.send(camera(OVERLOAD, 2), 2, 2 * rate, realtime=True, send_timeout=60, hwm=SENDER_HWM)
        camera_s = time.monotonic() - t0
        record, h5 = pipe.record(2, timeout=60)
        written = record.written_time
        after = pipe.wait_state(lambda s: s.time > written + 0.3, 10)  # counters after the scan ended
        peak = pipe.memory.peak
    assert all(pr.returncode is not None for pr in pipe.procs.values())
    tails = pipe.tails()

    expected = 4 * OVERLOAD.positions
    overflowed, sent = senders.overflowed, senders.sent
    assert sent + overflowed == expected and overflowed > 0  # the overload really happened
    counted = read_counted_scan(h5)
    assert counted.sector_masks.shape == (OVERLOAD.positions, 1)  # positions that never arrived: mask 0
    missing = expected - int(np.unpackbits(counted.sector_masks[..., None], axis=-1).sum())
    stats = counted.metadata["stemstream"]
    aggregator_lost = (after.unroutable - before.unroutable) + (after.late - before.late)
    aggregator_lost += after.malformed - before.malformed
    node_late = int(stats["late_sectors"])
    in_transit = record.sectors_lost_in_transit
    assert after.received - before.received == sent  # every sector a receiver sent reached the aggregator
    # Every sector missing from the file is one the system counted as lost somewhere: none silently.
    counts = dict(
        overflowed=overflowed, aggregator=aggregator_lost, node_late=node_late, in_transit=in_transit
    )
    finals = [line for text in tails.values() for line in text.splitlines() if "finished" in line]
    assert missing == sum(counts.values()), f"{missing} missing, counted {counts}; {finals}"
    assert record.status == "incomplete" and record.completeness < 1
    assert record.completeness == pytest.approx(1 - missing / expected)

    # Memory: bounded by the configured queues, not by the scan.
    bound = memory_bound(2) + 128 * MB  # margin: allocator slack, Python objects, counted events
    growth = peak - warm
    raw = OVERLOAD.positions * FRAME_BYTES
    print(
        f"R {rate:.0f} frames/s; camera at {2 * rate:.0f} frames/s for {camera_s:.1f} s: "
        f"{overflowed} sectors overflowed, {aggregator_lost} aggregator, {node_late} node late, "
        f"{in_transit} in transit; {missing} of {expected} missing ({100 * missing / expected:.1f} %); "
        f"RSS idle {idle / MB:.0f} MB, before scan 2 {warm / MB:.0f} MB, peak {peak / MB:.0f} MB "
        f"(growth {growth / MB:.0f} MB, bound {bound / MB:.0f} MB, raw scan {raw / MB:.0f} MB)"
    )
    assert growth < bound < raw / 4
