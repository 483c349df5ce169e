"""The parallax fit against the simulator's known aberrations (64x64 at 200 e/frame), the tilt-corrected
BF against the simulated sample, the model's decomposition and the calibration."""

from __future__ import annotations

import numpy as np
import pytest

from counting.geometry import ScanShape
from counting.phase.fit import PX_UNITS, ParallaxFitError, fit_aberrations
from counting.phase.model import aberration_matrix, decompose
from counting.phase.shift_sum import shift_sum, tilt_corrected_bf, virtual_bf
from counting.simulator import SimulatorConfig
from tests.counting.phase.conftest import SIDE, Scan, noise_free_copies, simulate

ASTIGMATIC = {"defocus": 0.05, "astigmatism": 0.02, "astigmatism_angle": 30.0, "rotation": 20.0}


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.parametrize(
    "c1, a1, phi, theta", [(0.05, 0.02, 30.0, 20.0), (-0.03, 0.0, 0.0, -40.0), (0.02, 0.03, -70.0, 85.0)]
)
def test_decomposition_inverts_the_model(c1, a1, phi, theta):
    got = decompose(aberration_matrix(c1, a1, phi, theta))
    np.testing.assert_allclose(got, (c1, a1, phi, theta), atol=1e-9)


def test_fit_recovers_the_simulated_defocus_astigmatism_and_rotation(astigmatic):
    fit = fit_aberrations(astigmatic.snapshot, astigmatic.mask)
    assert abs(fit.defocus / 0.05 - 1) < 0.05
    assert abs(fit.astigmatism / 0.02 - 1) < 0.10
    assert abs(fit.astigmatism_angle - 30.0) < 5.0
    assert abs(fit.rotation - 20.0) < 3.0
    assert fit.units == PX_UNITS and not fit.calibrated and fit.positions == 64 * 63
    for err in (fit.defocus_err, fit.astigmatism_err, fit.astigmatism_angle_err, fit.rotation_err):
        assert 0 < err < 10  # finite, positive uncertainties
    assert fit.defocus_err < 0.05 * 0.05
    np.testing.assert_allclose(fit.matrix, astigmatic.camera.config.parallax_matrix(), atol=0.005)


def test_fit_keeps_the_defocus_sign(strong_defocus):
    fit = fit_aberrations(strong_defocus.snapshot, strong_defocus.mask)
    assert abs(fit.defocus / -0.08 - 1) < 0.05 and abs(fit.rotation) < 3.0
    assert fit.astigmatism < 0.1 * 0.08


def test_fit_of_a_partly_filled_scan_uses_only_the_positions_seen():
    half = simulate(rows=32, defocus=0.05, astigmatism=0.02, astigmatism_angle=30.0, rotation=20.0)
    assert half.snapshot.seen().sum() == 32 * 64
    fit = fit_aberrations(half.snapshot, half.mask)
    assert fit.positions == 32 * 63
    assert abs(fit.defocus / 0.05 - 1) < 0.10 and abs(fit.rotation - 20.0) < 5.0


def test_the_first_rows_of_a_scan_give_a_clear_error_never_a_perfect_fit(astigmatic):
    """A few rows and a defocus whose shifts exceed them: no position every moved bin covers. Each bin's
    peak would then sit at its guess and the fit reproduce it with zero residual and zero uncertainty; it
    is refused instead (the live fits of a scan's first rows fail with that reason)."""
    refused = 0
    for rows in (9, 10, 12, 16, 24):
        mask = np.zeros((64, 64), bool)
        mask[:rows, :-1] = True
        try:
            fit = fit_aberrations(astigmatic.snapshot, mask)
        except ParallaxFitError as exc:
            assert "too few rows for these shifts" in str(exc)
            refused += 1
            continue
        assert fit.residual_rms() > 1e-6 and fit.defocus_err > 1e-6, rows
    assert refused > 0


def test_too_little_data_is_a_clear_error(astigmatic):
    mask = np.zeros((64, 64), bool)
    mask[:5, :5] = True
    with pytest.raises(ParallaxFitError):
        fit_aberrations(astigmatic.snapshot, mask)


def test_tilt_corrected_bf_is_sharper_than_the_virtual_bf_where_defocus_blurs_it(strong_defocus):
    scan = strong_defocus
    fit = fit_aberrations(scan.snapshot, scan.mask)
    tc = tilt_corrected_bf(scan.snapshot, fit.model_shifts(), scan.mask)[:, :-1]
    vbf = virtual_bf(scan.snapshot, scan.mask)[:, :-1]
    assert _corr(tc, scan.object()) > _corr(vbf, scan.object()) + 0.05


def test_tilt_corrected_bf_is_at_least_as_good_as_the_virtual_bf(astigmatic):
    scan = astigmatic
    fit = fit_aberrations(scan.snapshot, scan.mask)
    tc = tilt_corrected_bf(scan.snapshot, fit.model_shifts(), scan.mask)[:, :-1]
    vbf = virtual_bf(scan.snapshot, scan.mask)[:, :-1]
    assert _corr(tc, scan.object()) >= _corr(vbf, scan.object())


def test_shift_sum_moves_each_image_back_by_its_shift():
    y, x = np.mgrid[0:40, 0:48]
    blob = lambda cx, cy: np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 18.0)  # noqa: E731
    shifts = np.array([[2.5, -1.25], [-3.0, 2.0]])  # I_b(r) = O(r + s_b): O's blob at (24, 20) - s_b
    images = np.stack([blob(24 - sx, 20 - sy) for sx, sy in shifts])
    np.testing.assert_allclose(shift_sum(images, shifts), 2 * blob(24, 20), atol=1e-4)


def test_calibration_turns_pixels_into_nm(astigmatic):
    fit = fit_aberrations(astigmatic.snapshot, astigmatic.mask)
    cal = fit.calibrate(scan_step_nm=0.5, mrad_per_px=0.1)
    factor = 0.5 * 1000 / 0.1  # shift_nm = C1_nm * k * mrad_per_px / 1000 = shift_px * step_nm
    assert cal.calibrated and cal.units == "nm"
    assert cal.defocus == pytest.approx(fit.defocus * factor) and cal.defocus_err == pytest.approx(
        fit.defocus_err * factor
    )
    assert cal.astigmatism == pytest.approx(fit.astigmatism * factor)
    assert cal.rotation == fit.rotation and cal.astigmatism_angle == fit.astigmatism_angle
    np.testing.assert_array_equal(cal.matrix, fit.matrix)  # M stays in px
    assert cal.as_dict()["defocus"] == cal.defocus
    with pytest.raises(ValueError):
        fit.calibrate(0.0, 0.1)
    with pytest.raises(ValueError):
        cal.calibrate(0.5, 0.1)


def test_fit_is_unbiased_on_noise_free_copies_of_a_sample_with_features_at_its_edge():
    """Each bin an exact shifted copy of one sample whose large particles cross the scan's edge: what a
    shift brings into the field changes each bin's mean there, and that offset (times the window) once
    pulled the peaks along the particles."""
    snap = noise_free_copies(side=64, seed=7)
    fit = fit_aberrations(snap, None)
    assert abs(fit.defocus / 0.05 - 1) < 0.005  # without the zero mean: -1.3 %
    assert abs(fit.astigmatism / 0.02 - 1) < 0.01  # -1.2 %
    assert abs(fit.rotation - 20.0) < 0.2


@pytest.mark.parametrize("seed", [0, 1])
def test_refining_on_every_position_brings_noisy_scans_within_the_targets(seed):
    """Seeds whose samples leave the correlation alone 12..14 % off in A1 at 64x64 and 200 e/frame: its
    margin drops the positions within the largest shift of the edge; the refinement (counting.phase.refine)
    uses them and lands within the issue's targets (C1 5 %, A1 10 %)."""
    scan = Scan(SimulatorConfig(ScanShape(SIDE, SIDE), dose=200.0, seed=seed, **ASTIGMATIC))
    coarse = fit_aberrations(scan.snapshot, scan.mask, refine=False)
    fit = fit_aberrations(scan.snapshot, scan.mask)
    a1_error = abs(fit.astigmatism / 0.02 - 1)
    assert abs(fit.defocus / 0.05 - 1) < 0.05 and a1_error < 0.10
    assert a1_error < abs(coarse.astigmatism / 0.02 - 1) - 0.03
    assert abs(fit.astigmatism_angle - 30.0) < 5.0 and abs(fit.rotation - 20.0) < 3.0
    # The fit's own A1 uncertainty is of the size of the error, not a tenth of it.
    assert 0.02 < fit.astigmatism_err / 0.02 < 0.10
