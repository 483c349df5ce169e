"""A scan's HDF5 written while it streams in (counting.scan_file): the same file content as writing a whole
counted scan, in any arrival order and with several frames per position; flat memory; a storage failure is
one OSError, leaves nothing behind and never crashes the interpreter."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from counting.geometry import ALL_SECTORS, ScanShape
from counting.kernel import EventList
from counting.scan_file import ScanFile
from counting.sparse import ScanAccumulator, read_counted_scan, write_counted_scan

META = {"electron_counting": {"background_threshold": 10.5, "x_ray_threshold": 400.0}, "stemstream": {"a": 1}}


def frames_of(rng, scan: ScanShape, k: int, missing: int = 0):
    """(positions, frame numbers, masks, events) of a scan with k frames per position, some frames missing
    and some sectors lost, in shuffled order."""
    n = scan.positions * k
    positions = np.repeat(np.arange(scan.positions), k)
    numbers = np.arange(100, 100 + n)
    masks = np.full(n, ALL_SECTORS, np.uint8)
    masks[rng.choice(n, 3, replace=False)] = 0b0111
    events = [np.unique(rng.integers(0, 576 * 576, rng.integers(0, 60))).astype(np.uint32) for _ in range(n)]
    events[min(5, n - 1)] = np.empty(0, np.uint32)
    keep = rng.permutation(n)[missing:]
    return positions[keep], numbers[keep], masks[keep], [events[i] for i in keep]


def batches(positions, numbers, masks, events, size: int):
    for a in range(0, len(positions), size):
        ev = events[a : a + size]
        offsets = np.concatenate([[0], np.cumsum([len(e) for e in ev])]).astype(np.int64)
        indices = np.concatenate(ev) if ev else np.empty(0, np.uint32)
        yield positions[a : a + size], numbers[a : a + size], masks[a : a + size], EventList(indices, offsets)


def stream(directory: Path, name: str, scan: ScanShape, frames, batch: int = 7, flush: int = 16) -> ScanFile:
    f = ScanFile(directory, name, scan, flush_frames=flush)
    for b in batches(*frames, batch):
        f.add(*b)
    return f


def whole(tmp: Path, scan: ScanShape, frames, k: int):
    acc = ScanAccumulator(scan)
    for b in batches(*frames, 1000):
        acc.add(*b)
    return read_counted_scan(write_counted_scan(tmp / "whole.h5", acc.finish(META, k)))


@pytest.mark.parametrize(("k", "missing"), [(1, 0), (1, 4), (2, 0), (3, 5)])
def test_streamed_file_equals_the_whole_scan_written_at_once(tmp_path: Path, k: int, missing: int):
    rng = np.random.default_rng(k * 10 + missing)
    scan = ScanShape(7, 5)
    frames = frames_of(rng, scan, k, missing)
    out = tmp_path / "out"
    f = stream(out, "scan.h5", scan, frames)
    tally = f.finish(META)
    digest = f.sha256()
    f.link(out / "scan.h5")
    assert sorted(p.name for p in out.iterdir()) == ["scan.h5"]  # no temporary left
    got, want = read_counted_scan(out / "scan.h5"), whole(tmp_path, scan, frames, tally.frames_per_position)
    assert got.events.shape == want.events.shape
    for a, b in zip(got.events.ravel(), want.events.ravel(), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(got.sector_masks, want.sector_masks)
    assert got.metadata == want.metadata
    assert tally.frames_per_position == want.frames_per_position
    assert (tally.num_frames, tally.complete_frames, tally.num_events) == (
        want.num_frames,
        want.complete_frames,
        want.num_events,
    )
    assert tally.completeness == pytest.approx(want.completeness)
    import hashlib

    assert digest == hashlib.sha256((out / "scan.h5").read_bytes()).hexdigest()


def test_stempy_reads_a_streamed_file(tmp_path: Path):
    from stempy.io import SparseArray

    scan = ScanShape(4, 6)
    frames = frames_of(np.random.default_rng(3), scan, 1, missing=2)
    f = stream(tmp_path, "s.h5", scan, frames)
    f.finish(META)
    f.link(tmp_path / "s.h5")
    sa = SparseArray.from_hdf5(str(tmp_path / "s.h5"))
    assert tuple(sa.scan_shape) == (6, 4)
    expected = {int(p): e for p, e in zip(frames[0], frames[3], strict=True)}
    for p in range(scan.positions):
        np.testing.assert_array_equal(sa.data[p, 0], expected.get(p, np.empty(0, np.uint32)))


@pytest.mark.parametrize("n_events", [0, 3])
def test_equal_length_frames_stream(tmp_path: Path, n_events: int):
    scan = ScanShape(3, 2)
    events = [np.arange(n_events, dtype=np.uint32) for _ in range(6)]
    f = stream(tmp_path, "s.h5", scan, (np.arange(6), np.arange(6), np.full(6, 15, np.uint8), events))
    f.finish({})
    f.link(tmp_path / "s.h5")
    assert all(len(e) == n_events for e in read_counted_scan(tmp_path / "s.h5").events.ravel())


def test_never_replaces_an_existing_file(tmp_path: Path):
    (tmp_path / "s.h5").write_text("kept")
    scan = ScanShape(2, 2)
    f = stream(tmp_path, "s.h5", scan, frames_of(np.random.default_rng(0), scan, 1))
    f.finish({})
    with pytest.raises(FileExistsError):
        f.link(tmp_path / "s.h5")
    f.discard()
    assert (tmp_path / "s.h5").read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["s.h5"]


def test_memory_stays_flat_while_a_scan_streams(tmp_path: Path):
    """16,384 frames of 300 events (20 MB of events): the file object's own allocations stay far below."""
    scan = ScanShape(128, 128)
    rng = np.random.default_rng(0)
    f = ScanFile(tmp_path, "big.h5", scan)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for a in range(0, scan.positions, 32):
            positions = np.arange(a, a + 32)
            indices = rng.integers(0, 576 * 576, 32 * 300).astype(np.uint32)
            f.add(positions, positions, np.full(32, 15, np.uint8), EventList(indices, np.arange(33) * 300))
        f.finish({})
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    f.link(tmp_path / "big.h5")
    assert (tmp_path / "big.h5").stat().st_size > 19_000_000
    assert peak < 5_000_000, peak  # the flush buffer and per-position arrays, not the scan


FSIZE = 256 * 1024
FAILING = f"""
import errno, os, resource, sys
import numpy as np
from pathlib import Path
from counting.geometry import ScanShape
from counting.kernel import EventList
from counting.scan_file import ScanFile
out = Path(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, ({FSIZE}, {FSIZE}))
rng = np.random.default_rng(0)
side = int(sys.argv[3])
f = ScanFile(out, "scan.h5", ScanShape(side, side), flush_frames=int(sys.argv[2]))
for a in range(0, side * side, 32):
    positions = np.arange(a, a + 32)
    f.add(positions, positions, np.full(32, 15, np.uint8),
          EventList(rng.integers(0, 576 * 576, 32 * 200).astype(np.uint32), np.arange(33) * 200))
print(f.error is not None, sorted(p.name for p in out.iterdir()))
try:
    f.finish({{}})
except OSError as exc:
    assert exc.errno == errno.EFBIG, exc
    t = f.tally()
    print("EFBIG", t.num_frames, t.num_events)
"""


@pytest.mark.parametrize(("side", "flush_frames", "known_early"), [(96, 32, True), (32, 2048, False)])
def test_full_disk_while_streaming_is_one_oserror_and_leaves_nothing(
    tmp_path: Path, side: int, flush_frames: int, known_early: bool
):
    """Past the file-size limit mid-scan (a scan larger than HDF5's caches) or only at the end: EFBIG, kept and
    raised by finish; the frames are still tallied; no file is left, and none from the moment the failure is
    known; the interpreter exits cleanly (HDF5 never saw the error)."""
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", FAILING, str(out), str(flush_frames), str(side)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.split("\n")
    if known_early:
        assert lines[0] == "True []"
    else:
        assert lines[0].startswith("False ['.scan.h5.") and lines[0].endswith(".partial']")
    assert lines[1] == f"EFBIG {side * side} {side * side * 200}"
    assert os.listdir(out) == []
    assert "Traceback" not in proc.stderr and "HDF5" not in proc.stderr


def test_a_scan_file_that_cannot_be_created_fails_at_finish(tmp_path: Path):
    (tmp_path / "not-a-dir").write_text("")
    scan = ScanShape(2, 1)
    f = ScanFile(tmp_path / "not-a-dir", "s.h5", scan)
    assert isinstance(f.error, OSError)
    f.add(
        np.arange(2),
        np.arange(2),
        np.full(2, 15, np.uint8),
        EventList(np.arange(3, dtype=np.uint32), np.array([0, 1, 3])),
    )
    assert f.tally().num_events == 3
    with pytest.raises(OSError) as err:
        f.finish({})
    assert err.value.errno in (errno.EEXIST, errno.ENOTDIR)
