"""Live images (counting.live_images) from counted batches equal, to the last count, the same sums computed
from the scan's written file; the geometry estimate finds the simulated bright-field disk."""

from __future__ import annotations

import numpy as np
import pytest

from counting.geometry import ScanShape
from counting.kernel import Thresholds
from counting.live_images import LiveGeometry, LiveImages, estimate_geometry
from counting.pipeline import CountingOptions, count_batches
from counting.settings import CountingSettings
from counting.simulator import SimulatedCamera, SimulatorConfig
from counting.sparse import write_counted_scan
from stemstream_testing.live_oracle import live_sums_from_file
from streaming.components import threshold_config

OPTIONS = CountingOptions(Thresholds(40.0, 2000.0), threshold_config(CountingSettings()), 1)


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    cam = SimulatedCamera(SimulatorConfig(ScanShape(16, 12), frames_per_position=2, seed=5))
    batches = list(cam.iter_batches(24))
    scan = count_batches(batches, cam.scan, cam.dark(), OPTIONS, frames_per_position=2)
    path = write_counted_scan(tmp_path_factory.mktemp("live") / "scan.h5", scan)
    return cam, scan, path


def _batches(scan, size: int, rng):
    """The scan's frames as shuffled counted batches (positions, masks, offsets, indices)."""
    slots = [(p, j) for p in range(scan.scan.positions) for j in range(scan.frames_per_position)]
    order = rng.permutation(len(slots))
    for a in range(0, len(order), size):
        pick = [slots[i] for i in order[a : a + size]]
        ev = [scan.events[p, j] for p, j in pick]
        offsets = np.concatenate([[0], np.cumsum([len(e) for e in ev])]).astype(np.int64)
        yield (
            np.array([p for p, _ in pick]),
            np.array([scan.sector_masks[p, j] for p, j in pick], np.uint8),
            offsets,
            np.concatenate(ev).astype(np.uint32),
        )


@pytest.mark.parametrize("given", [False, True])
def test_live_images_equal_sums_from_the_file(counted, given):
    cam, scan, path = counted
    geometry = LiveGeometry(290.5, 286.0, 150.0, 170.0, 400.0) if given else None
    live = LiveImages(16, 12, geometry, estimate_frames=40)
    for batch in _batches(scan, 17, np.random.default_rng(1)):
        live.add(*batch)
    g = live.settle()
    want = live_sums_from_file(path, g.cx, g.cy, g.bf_radius, g.adf_inner, g.adf_outer)
    a = live.arrays
    for name in ("counts", "bf", "adf", "sum_col", "sum_row", "frames", "pattern"):
        np.testing.assert_array_equal(getattr(a, name), want[name], err_msg=name)
    assert live.frames == scan.num_frames and live.events == scan.num_events
    assert a.bf.sum() > 0 and a.adf.sum() > 0
    com_x, com_y = a.com(g)
    assert np.all(np.abs(com_x) < 60) and np.all(np.abs(com_y) < 60)


def test_geometry_estimate_finds_the_disk(counted):
    cam, scan, _ = counted
    live = LiveImages(16, 12, estimate_frames=64)
    for batch in _batches(scan, 32, np.random.default_rng(2)):
        live.add(*batch)
    g = live.geometry
    assert g is not None
    cy, cx = cam.disk_center().reshape(-1, 2).mean(axis=0)
    assert abs(g.cx - cx) <= 6 and abs(g.cy - cy) <= 6
    assert abs(g.bf_radius - cam.config.disk_radius) <= 8
    assert g.bf_radius <= g.adf_inner < g.adf_outer
    assert estimate_geometry(np.zeros(576 * 576)).bf_radius == 72


def test_bad_batches_are_refused():
    live = LiveImages(4, 4, LiveGeometry(288, 288, 50, 60, 100))
    with pytest.raises(ValueError, match="out of range"):
        live.add(np.array([16]), np.array([15], np.uint8), np.array([0, 0]), np.empty(0, np.uint32))
    with pytest.raises(ValueError, match="offsets"):
        live.add(np.array([1]), np.array([15], np.uint8), np.array([0]), np.empty(0, np.uint32))
