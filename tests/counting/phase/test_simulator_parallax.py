"""The simulator's parallax settings: off by default, checked, the counted fast path equals the ground
truth, and the rotation turns the disk's deflection as well as the parallax."""

from __future__ import annotations

import numpy as np
import pytest

from counting.geometry import ScanShape
from counting.phase.model import rotation
from counting.simulator import SimulatedCamera, SimulatorConfig


def test_parallax_is_off_by_default_and_checked():
    config = SimulatorConfig(ScanShape(4, 3))
    assert not config.parallax
    np.testing.assert_array_equal(config.parallax_matrix(), np.zeros((2, 2)))
    assert SimulatorConfig(ScanShape(4, 3), astigmatism=0.01).parallax
    for bad in ({"defocus": 2.0}, {"astigmatism": -0.1}, {"rotation": float("nan")}, {"defocus": True}):
        with pytest.raises(ValueError):
            SimulatorConfig(ScanShape(4, 3), **bad)


@pytest.mark.parametrize("defocus", [0.0, 0.05])
def test_counted_fast_path_is_the_ground_truth(defocus):
    cam = SimulatedCamera(SimulatorConfig(ScanShape(6, 5), frames_per_position=2, seed=2, defocus=defocus))
    seen = []
    for positions, masks, offsets, indices in cam.iter_counted(7):
        assert positions.dtype == np.int64 and masks.dtype == np.uint8 and indices.dtype == np.uint32
        assert (masks == 15).all() and offsets[0] == 0 and offsets[-1] == len(indices)
        for j in range(len(positions)):
            seen.append((int(positions[j]), indices[offsets[j] : offsets[j + 1]]))
    assert len(seen) == cam.total_frames
    for i, fn in enumerate(cam.frame_numbers):
        assert seen[i][0] == cam.position_of(fn)
        np.testing.assert_array_equal(seen[i][1], cam.ground_truth(fn))


def test_rotation_turns_the_disk_deflection():
    plain = SimulatedCamera(SimulatorConfig(ScanShape(8, 6), seed=4)).disk_shift()
    turned = SimulatedCamera(SimulatorConfig(ScanShape(8, 6), seed=4, rotation=30.0)).disk_shift()
    r = rotation(-30.0)  # detector axes: R(-theta) of the scan's gradient, (x, y) = (d_col, d_row)
    want_col = r[0, 0] * plain[..., 1] + r[0, 1] * plain[..., 0]
    want_row = r[1, 0] * plain[..., 1] + r[1, 1] * plain[..., 0]
    np.testing.assert_allclose(turned[..., 1], want_col, atol=1e-12)
    np.testing.assert_allclose(turned[..., 0], want_row, atol=1e-12)


def test_a_defocused_scan_keeps_the_dose_and_the_in_focus_sample():
    a = SimulatedCamera(SimulatorConfig(ScanShape(8, 6), seed=4))
    b = SimulatedCamera(SimulatorConfig(ScanShape(8, 6), seed=4, defocus=0.05))
    np.testing.assert_array_equal(a.sample_image(), b.sample_image())
    electrons = [
        sum(len(x) for x in cam_batches)
        for cam_batches in ([e[3] for e in c.iter_counted(16)] for c in (a, b))
    ]
    assert abs(electrons[1] / electrons[0] - 1) < 0.05


def test_film_texture_is_off_by_default_scatters_but_does_not_deflect():
    plain = SimulatedCamera(SimulatorConfig(ScanShape(16, 12), seed=4, defocus=0.05))
    textured = SimulatedCamera(SimulatorConfig(ScanShape(16, 12), seed=4, defocus=0.05, texture=1.0))
    assert SimulatorConfig(ScanShape(4, 3)).texture == 0.0
    for bad in (-0.1, 11.0, float("nan")):
        with pytest.raises(ValueError):
            SimulatorConfig(ScanShape(4, 3), texture=bad)
    np.testing.assert_array_equal(plain.disk_shift(), textured.disk_shift())
    difference = (textured.scatter_fraction() - plain.scatter_fraction())[:, :-1]
    assert difference.std() > 0.005 and difference.min() >= 0.0  # the film is thicker, in fine detail


def test_the_parallax_sees_the_same_textured_film_as_the_in_focus_scan():
    """The parallax draws from its own padded copy of the sample: with the film's texture (no particles) and
    a defocus too small to move any view by a pixel, the bright-field counts follow the in-focus scan's
    transmission as the in-focus counts do."""
    shape = ScanShape(12, 10)
    base = {"seed": 5, "texture": 2.0, "dose": 1500.0, "particles": 0, "pool_size": 1}
    for defocus in (0.0, 1e-6):
        cam = SimulatedCamera(SimulatorConfig(shape, defocus=defocus, **base))
        bf = np.zeros(shape.positions)
        for positions, _, offsets, indices in cam.iter_counted(64):
            row, col = np.divmod(indices.astype(np.int64), 576)
            inside = (row - 288) ** 2 + (col - 288) ** 2 < 170**2
            np.add.at(bf, np.repeat(positions, np.diff(offsets)), inside)
        transmission = 1.0 - cam.scatter_fraction()
        r = np.corrcoef(bf.reshape(shape.height, shape.width)[:, :-1].ravel(), transmission[:, :-1].ravel())
        assert r[0, 1] > 0.6, (defocus, r[0, 1])
