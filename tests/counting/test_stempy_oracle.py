"""Identical events to stempy (the production counter) with the same fixed thresholds on the same frames."""

from __future__ import annotations

import numpy as np
import pytest

from counting.kernel import Counter, Thresholds
from counting.offline import count_raw_scan
from counting.raw import open_raw_scan, write_raw_scan
from counting.sparse import read_counted_scan, write_counted_scan
from stemstream_testing.options import options


def stempy_events(frames: np.ndarray, dark: np.ndarray, t: Thresholds) -> list[np.ndarray]:
    from stempy.image import electron_count_frame

    return [
        np.asarray(
            electron_count_frame(
                f, darkreference=dark, background_threshold=t.background, xray_threshold=t.xray
            ).data[0, 0]
        )
        for f in frames
    ]


@pytest.mark.parametrize("dark_kind", ["zeros", "integer"])
def test_events_identical_to_stempy_on_simulated_frames(camera, camera_dark, dark_kind):
    # stempy truncates the dark to an integer and wraps negative differences; with a zero or an integer
    # dark and an x-ray threshold below the wrapped values, both definitions agree exactly.
    dark = np.zeros_like(camera_dark) if dark_kind == "zeros" else np.floor(camera_dark)
    t = Thresholds(30.5 if dark_kind == "zeros" else 10.5, 600.0)
    batch = next(camera.iter_batches(48))
    ours = Counter(dark, t).count(batch.frames)
    theirs = stempy_events(batch.frames, dark, t)
    assert sum(len(e) for e in theirs) > 48 * 100  # real data, not empty frames
    for i, ref in enumerate(theirs):
        np.testing.assert_array_equal(ours[i], ref, err_msg=f"frame {batch.frame_numbers[i]}")


def test_offline_count_of_raw_files_matches_stempy_per_position(tmp_path, camera):
    """Two frames per position, written as raw files: compare per scan position, as order may differ."""
    from counting.geometry import ScanShape
    from counting.simulator import SimulatedCamera, SimulatorConfig

    cam = SimulatedCamera(SimulatorConfig(ScanShape(5, 4), frames_per_position=2, dose=150.0, seed=9))
    paths = write_raw_scan(tmp_path, 7, cam.scan, cam.iter_batches(16))
    t = Thresholds(30.5, 600.0)
    counted = count_raw_scan(open_raw_scan(paths), None, options(fixed=t, workers=2), batch_size=6)
    stored = read_counted_scan(write_counted_scan(tmp_path / "s.h5", counted))
    frames = np.stack([cam.frame(n) for n in cam.frame_numbers])
    ref = stempy_events(frames, np.zeros((576, 576), np.float32), t)
    for p in range(cam.scan.positions):
        got = sorted(stored.events[p, j].tolist() for j in range(2))
        want = sorted(ref[2 * p + j].tolist() for j in range(2))
        assert got == want, f"position {p}"
