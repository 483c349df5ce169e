"""Sparse HDF5: our layout round-trips, stempy reads it with identical events, py4DSTEM can use it."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from counting.geometry import ALL_SECTORS, ScanShape
from counting.kernel import EventList
from counting.sparse import (
    ScanAccumulator,
    SparseFormatError,
    read_counted_scan,
    write_counted_scan,
)


def random_scan(rng, scan: ScanShape, k: int, drop_sector_at: int | None = None):
    """A counted scan with random sorted events, frames added in shuffled order."""
    n = scan.positions * k
    positions = np.repeat(np.arange(scan.positions), k)
    frame_numbers = np.arange(1, n + 1)
    masks = np.full(n, ALL_SECTORS, np.uint8)
    if drop_sector_at is not None:
        masks[drop_sector_at] = 0b1011
    per_frame = [
        np.unique(rng.integers(0, 576 * 576, rng.integers(0, 40))).astype(np.uint32) for _ in range(n)
    ]
    per_frame[3] = np.empty(0, np.uint32)  # an empty frame must survive too
    order = rng.permutation(n)
    acc = ScanAccumulator(scan)
    for chunk in np.array_split(order, 3):
        sizes = [len(per_frame[i]) for i in chunk]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        idx = np.concatenate([per_frame[i] for i in chunk] or [np.empty(0, np.uint32)]).astype(np.uint32)
        acc.add(positions[chunk], frame_numbers[chunk], masks[chunk], EventList(idx, offsets))
    counted = acc.finish({"electron_counting": {"background_threshold": 10.5, "x_ray_threshold": 400.0}}, k)
    expected = np.empty((scan.positions, k), dtype=object)
    for i in range(n):
        expected[positions[i], i % k] = per_frame[i]
    return counted, expected


@pytest.mark.parametrize("k", [1, 2])
def test_round_trip_and_layout(tmp_path, k):
    rng = np.random.default_rng(k)
    scan = ScanShape(5, 3)
    counted, expected = random_scan(rng, scan, k, drop_sector_at=4)
    path = write_counted_scan(tmp_path / "scan.h5", counted)
    with h5py.File(path) as f:
        assert f.attrs["version"] == 3
        assert f["electron_events/frames"].dtype == h5py.vlen_dtype(np.uint32)
        assert (f["electron_events/frames"].attrs["Nx"], f["electron_events/frames"].attrs["Ny"]) == (
            576,
            576,
        )
        sp = f["electron_events/scan_positions"]
        assert (sp.attrs["Nx"], sp.attrs["Ny"]) == (5, 3)
        assert f["electron_events/frames"].shape == (scan.positions * k,)
    back = read_counted_scan(path)
    for p in range(scan.positions):
        for j in range(k):
            np.testing.assert_array_equal(back.events[p, j], expected[p, j])
    assert back.sector_masks.ravel()[4] == 0b1011
    assert back.complete_frames == scan.positions * k - 1
    assert back.metadata["electron_counting"]["background_threshold"] == 10.5
    assert not back.position_complete.all()


@pytest.mark.parametrize("k", [1, 3])
def test_stempy_reads_our_files_with_identical_events(tmp_path, k):
    from stempy.io import SparseArray

    rng = np.random.default_rng(10 + k)
    scan = ScanShape(4, 6)
    counted, expected = random_scan(rng, scan, k)
    path = write_counted_scan(tmp_path / "scan.h5", counted)
    sa = SparseArray.from_hdf5(str(path))
    assert tuple(sa.scan_shape) == (6, 4)
    assert tuple(sa.frame_shape) == (576, 576)
    assert sa.data.shape == (scan.positions, k)
    for p in range(scan.positions):
        for j in range(k):
            np.testing.assert_array_equal(sa.data[p, j], expected[p, j])
    assert sa.metadata["electron_counting"]["x_ray_threshold"] == 400.0
    # stempy's own dense view agrees with ours
    np.testing.assert_array_equal(sa.to_dense().astype(np.int64), counted.to_dense(1, np.int64))


def test_we_read_files_written_by_stempy(tmp_path):
    from stempy.io import SparseArray

    rng = np.random.default_rng(5)
    data = np.empty((6, 1), dtype=object)
    for i in range(6):
        data[i, 0] = np.unique(rng.integers(0, 576 * 576, 5 + 3 * i)).astype(np.uint32)  # ragged on purpose
    SparseArray(data=data, scan_shape=(2, 3), frame_shape=(576, 576)).write_to_hdf5(str(tmp_path / "s.h5"))
    back = read_counted_scan(tmp_path / "s.h5")
    assert back.scan == ScanShape(3, 2)
    for i in range(6):
        np.testing.assert_array_equal(back.events[i, 0], data[i, 0])
    assert back.completeness == 1.0


def test_py4dstem_datacube_from_counted_scan(tmp_path):
    import py4DSTEM

    rng = np.random.default_rng(2)
    counted, _ = random_scan(rng, ScanShape(4, 3), 2)
    dense = read_counted_scan(write_counted_scan(tmp_path / "s.h5", counted)).to_dense(bin_factor=4)
    assert dense.shape == (3, 4, 144, 144)
    dc = py4DSTEM.DataCube(data=dense)
    assert dc.data.shape == (3, 4, 144, 144)
    assert int(dc.data.sum()) == counted.num_events
    assert dc.get_dp_mean().data.shape == (144, 144)


def test_atomic_write_leaves_no_partial_file(tmp_path):
    counted, _ = random_scan(np.random.default_rng(0), ScanShape(2, 2), 1)
    counted.metadata["bad"] = {"value": object()}  # h5py cannot store this: the write fails midway
    with pytest.raises(TypeError):
        write_counted_scan(tmp_path / "scan.h5", counted)
    assert list(tmp_path.iterdir()) == []


def test_unreadable_files_give_clear_errors(tmp_path):
    with pytest.raises(SparseFormatError, match="no such file"):
        read_counted_scan(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(SparseFormatError, match="junk.h5: not a readable HDF5"):
        read_counted_scan(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f.attrs["version"] = 3
    with pytest.raises(SparseFormatError, match="not a stempy-format"):
        read_counted_scan(tmp_path / "empty.h5")


@pytest.mark.parametrize("n_events", [0, 3])
def test_frames_of_equal_length_are_written(tmp_path, n_events):
    """A vacuum scan (no events) or equal-length frames must not confuse numpy's object arrays."""
    scan = ScanShape(3, 2)
    acc = ScanAccumulator(scan)
    idx = np.tile(np.arange(n_events, dtype=np.uint32), 6)
    acc.add(
        np.arange(6),
        np.arange(6),
        np.full(6, ALL_SECTORS, np.uint8),
        EventList(
            idx,
            np.arange(0, 6 * n_events + 1, max(n_events, 1))[:7].astype(np.int64)
            if n_events
            else np.zeros(7, np.int64),
        ),
    )
    back = read_counted_scan(write_counted_scan(tmp_path / "s.h5", acc.finish()))
    assert all(len(e) == n_events for e in back.events.ravel())
