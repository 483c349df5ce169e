"""Node streamers with a real aggregator on loopback: reassembly, counting, one file per scan, losses."""

from __future__ import annotations

import json

import numpy as np
import pytest

from counting.geometry import ALL_SECTORS, SECTOR_ROWS, ScanShape
from counting.kernel import Counter, Thresholds
from counting.pipeline import CountingOptions, count_batches
from counting.simulator import SimulatedCamera, SimulatorConfig
from counting.sparse import read_counted_scan
from stemstream_testing.options import options
from streaming.camera.faults import SenderFaults
from streaming.node.assembly import FrameAssembler
from tests.streaming.harness import start_session

pytestmark = pytest.mark.timeout(120)
FIXED = Thresholds(30.5, 600.0)


def offline(config: SimulatorConfig, opts: CountingOptions):
    cam = SimulatedCamera(config)
    return count_batches(cam.iter_batches(64), cam.scan, None, opts)


def assert_same_events(a, b):
    assert a.events.shape == b.events.shape
    for x, y in zip(a.events.ravel(), b.events.ravel(), strict=True):
        np.testing.assert_array_equal(x, y)


def test_assembler_reassembles_byte_exact_in_any_order():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 65535, (10, 576, 576), dtype=np.uint16)
    slots = [np.zeros((4, 576, 576), np.uint16) for _ in range(3)]
    asm = FrameAssembler(slots)
    asm.begin_scan(1)
    order = [(f, m) for f in range(10) for m in range(4)]
    # interleave frames and modules, as four receivers do
    order = sorted(order, key=lambda fm: (fm[0] // 3, rng.random()))
    sealed = []
    for f, m in order:
        sector = np.ascontiguousarray(frames[f, m * SECTOR_ROWS : (m + 1) * SECTOR_ROWS])
        sealed += asm.add(100 + f, f, m, memoryview(sector).cast("B"))
    sealed += asm.flush()
    seen = {}
    for s in sealed:
        slot = asm.slot(s.slot)
        for row in range(s.frames):
            assert slot.masks[row] == ALL_SECTORS
            seen[int(slot.frame_numbers[row])] = slot.frames[row].copy()
    assert sorted(seen) == list(range(100, 110))
    for f in range(10):
        np.testing.assert_array_equal(seen[100 + f], frames[f])


def test_assembler_marks_missing_sectors_and_drops_late_ones():
    sector = memoryview(np.full((144, 576), 7, np.uint16)).cast("B")
    asm = FrameAssembler([np.full((2, 576, 576), 99, np.uint16) for _ in range(2)])
    asm.begin_scan(1)
    for f in range(4):
        for m in (0, 1, 3):  # module 2 never arrives
            asm.add(f, f, m, sector)
    assert not asm.can_accept()
    sealed = asm.evict_oldest()
    assert len(sealed) == 1 and sealed[0].incomplete == 2
    slot = asm.slot(sealed[0].slot)
    assert (slot.masks[:2] == 0b1011).all()
    assert (slot.frames[:2, 288:432] == 0).all()  # the stale 99s are gone: missing means zero
    assert (slot.frames[:2, :288] == 7).all()
    assert asm.add(0, 0, 2, sector) == [] and asm.late == 1  # too late: counted, not a new frame


@pytest.mark.parametrize("estimated", [False, True])
def test_two_nodes_write_one_file_identical_to_offline_counting(tmp_path, estimated):
    config = SimulatorConfig(ScanShape(16, 12), dose=150.0, seed=4)
    session = start_session(tmp_path, 2, fixed=None if estimated else FIXED)
    try:
        session.send(config, scan_number=3)
        streamed = session.counted(3)
    finally:
        session.close()
    ref = offline(config, options() if estimated else options(fixed=FIXED))
    assert_same_events(streamed, ref)
    assert streamed.completeness == 1.0
    assert streamed.metadata["electron_counting"]["background_threshold"] == pytest.approx(
        ref.metadata["electron_counting"]["background_threshold"], rel=1e-12
    )
    record = json.loads(session.wait_for_file(3).with_suffix(".json").read_text())
    assert record["status"] == "complete" and record["frames_written"] == 192 and record["sha256"]


def test_session_of_several_scans_with_counting_processes(tmp_path):
    session = start_session(tmp_path, 2, fixed=FIXED, workers=1)
    configs = [SimulatorConfig(ScanShape(8, 8), dose=100.0 + 50 * i, seed=i) for i in range(3)]
    try:
        for i, cfg in enumerate(configs):
            session.send(cfg, scan_number=10 + i)
        written = [session.counted(10 + i) for i in range(3)]
    finally:
        session.close()
    for cfg, got in zip(configs, written, strict=True):
        assert_same_events(got, offline(cfg, options(fixed=FIXED)))
    assert sum(r.scans for r in session.results.values()) == 6


def test_four_nodes_share_frames_equally(tmp_path):
    config = SimulatorConfig(ScanShape(16, 16), dose=50.0, seed=2)
    session = start_session(tmp_path, 4, fixed=FIXED)
    try:
        session.send(config, scan_number=1)
        got = session.counted(1)
    finally:
        session.close()
    frames = [r.frames for r in session.results.values()]
    assert sum(frames) == 256 and max(frames) - min(frames) <= 1
    assert_same_events(got, offline(config, options(fixed=FIXED)))


def test_lost_sectors_end_the_scan_by_deadline_and_are_marked(tmp_path):
    config = SimulatorConfig(ScanShape(8, 6), dose=100.0, seed=7)
    dropped = {(5, 2), (6, 0), (6, 1), (40, 3)}  # (frame number, module); frames start at 1
    session = start_session(tmp_path, 2, fixed=FIXED, scan_deadline=0.5)
    try:
        session.send(config, scan_number=2, faults=SenderFaults(drop=frozenset(dropped)))
        got = session.counted(2, timeout=15)
        session.send(config, scan_number=3)  # the next scan is unaffected
        nxt = session.counted(3)
    finally:
        session.close()
    cam = SimulatedCamera(config)
    masks = got.sector_masks.ravel()
    for frame in (5, 6, 40):
        position = cam.position_of(frame)
        missing = {m for f, m in dropped if f == frame}
        assert masks[position] == ALL_SECTORS & ~sum(1 << m for m in missing)
    assert got.complete_frames == 48 - 3
    # incomplete frames are counted too, with the missing rows as zeros
    frame6 = cam.frame(6)
    frame6[0:288] = 0
    np.testing.assert_array_equal(got.events[cam.position_of(6), 0], Counter(None, FIXED).count_frame(frame6))
    record = json.loads(session.wait_for_file(2).with_suffix(".json").read_text())
    assert record["status"] == "incomplete" and "deadline" in record["reasons"]
    assert nxt.completeness == 1.0


def test_modules_far_out_of_step_are_held_not_dropped(tmp_path):
    """Module 0 sends its whole scan before module 1 starts: slots (8 frames) fill with one-sector frames,
    the node keeps reading into its hold queue, and the scan still completes exactly."""
    from streaming.camera.sender import run_sender

    config = SimulatorConfig(ScanShape(8, 8), dose=100.0, seed=11)
    # Long deadlines: the gap between one sender's end and the next one's start is no lost sector, however
    # loaded the machine (the scan still ends at once when its last sector arrives).
    session = start_session(
        tmp_path,
        2,
        fixed=FIXED,
        scan_deadline=30.0,
        node_overrides={"node_slots": 2, "node_batch": 4, "frame_timeout": 30.0},
    )
    try:
        for m in range(4):  # one receiver after another: the worst possible skew
            run_sender(
                SimulatedCamera(config),
                session.aggregator.receiver_endpoints,
                m,
                scan_number=4,
                send_timeout=30,
            )
        got = session.counted(4)
    finally:
        session.close()
    assert got.completeness == 1.0
    assert_same_events(got, offline(config, options(fixed=FIXED)))


def test_a_scan_number_that_comes_again_is_a_new_scan_with_its_own_file_and_id(tmp_path):
    """The detector resets its scan numbers: scan 7 again, after the first scan 7 ended, is a new scan
    with its own file and unique id; a second session writing to the same directory goes on counting
    ids from there; names are production's FOURD_<date>_<id>_<scan>.h5 (stempy finds a scan by its id)."""
    import time

    from stempy.contrib import get_scan_path

    first, again = (SimulatorConfig(ScanShape(8, 6), dose=100.0, seed=s) for s in (31, 32))

    def records(n: int) -> list:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = sorted((tmp_path / "out").glob("FOURD_*.json"))
            if len(found) >= n:
                return [json.loads(f.read_text()) for f in found]
            time.sleep(0.05)
        raise AssertionError(f"{n} scans not written")

    session = start_session(tmp_path, 2, fixed=FIXED, scan_deadline=0.5)
    try:
        session.send(first, scan_number=7)
        records(1)
        time.sleep(1.0)  # past the late-sector window (the aggregator's scan deadline)
        session.send(again, scan_number=7)
        both = records(2)
    finally:
        session.close()
    session = start_session(tmp_path, 2, fixed=FIXED, scan_deadline=0.5)
    try:
        session.send(first, scan_number=1)
        third = [r for r in records(3) if r["scan_number"] == 1]
    finally:
        session.close()
    ids = sorted(r["scan_id"] for r in both)
    assert ids == [1, 2] and [r["scan_id"] for r in third] == [3]
    assert all(r["status"] == "complete" for r in [*both, *third])
    for record, config in zip(sorted(both, key=lambda r: r["scan_id"]), (first, again), strict=True):
        path = tmp_path / "out" / record["path"].rsplit("/", 1)[1]
        assert path.name.startswith("FOURD_") and path.name.endswith(f"_{record['scan_id']:05d}_00007.h5")
        found, number, scan_id = get_scan_path(tmp_path / "out", scan_id=record["scan_id"])
        assert (found, number, scan_id) == (path, 7, record["scan_id"])
        counted = read_counted_scan(path)
        assert_same_events(counted, offline(config, options(fixed=FIXED)))
        # no dark reference was given: the file says so
        assert counted.metadata["stemstream"]["dark_reference"] == "none: zero dark, fitted thresholds"
