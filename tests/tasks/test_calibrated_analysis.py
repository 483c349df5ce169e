"""Calibrated analysis: the microscope's DM4 (known step and convergence semi-angle) gives py4DSTEM its
real- and reciprocal-space calibrations, so a simulated scan's known deflection comes out as the expected
CoM in mrad; without metadata every output says "uncalibrated"."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from counting.geometry import ScanShape
from counting.kernel import Thresholds
from counting.pipeline import count_batches
from counting.simulator import SimulatedCamera, SimulatorConfig
from counting.sparse import write_counted_scan
from stemstream_testing.dm4 import write_dm4
from stemstream_testing.options import options
from tasks.analysis.analyse import AnalysisConfig, analyse_scan, build_datacube, calibrated_config, densify
from tasks.analysis.calibration import ScanCalibration, calibration_from_metadata
from tasks.analysis.images import panels
from tasks.microscope import read_microscope_file
from tasks.settings import MicroscopeSettings

SIDE = 24
ALPHA = 20.0  # mrad: the convergence semi-angle written in the DM4
STEP_NM = 0.05  # 0.5 Å
DISK = 180.0  # the simulated bright-field disk radius, detector pixels
# The simulated camera has no scan/detector rotation and no defocus.
SIM = AnalysisConfig(com_rotation_deg=0.0, com_transpose=False, parallax_defocus_guess_angstrom=0.0)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


@pytest.fixture(scope="module")
def camera() -> SimulatedCamera:
    # Nothing scattered out of the disk: every electron is in the deflected disk, whose centre is the truth.
    config = SimulatorConfig(ScanShape(SIDE, SIDE), dose=1500.0, seed=3, scatter_min=0.0, scatter_max=0.0)
    return SimulatedCamera(config)


@pytest.fixture(scope="module")
def calibrated_file(tmp_path_factory: pytest.TempPathFactory, camera: SimulatedCamera) -> Path:
    """The counted scan with the microscope's DM4 added, as a session leaves it."""
    from counting.microscope_meta import attach_microscope

    d = tmp_path_factory.mktemp("cal")
    counted = count_batches(
        camera.iter_batches(64), camera.scan, camera.dark(), options(Thresholds(12.0, 2000.0), 2)
    )
    h5 = write_counted_scan(d / "FOURD_cal.h5", counted)
    haadf = camera.sample_image().astype(np.float32)  # the sample columns, as the microscope's HAADF
    tags = {
        "Microscope Info": {"Voltage": 300e3},
        "4Dcamera Parameters": {"convergence_semiangle_mrad": ALPHA},
    }
    dm4 = write_dm4(d / "scan1.dm4", haadf, STEP_NM, "nm", tags)
    attach_microscope(h5, read_microscope_file(dm4, MicroscopeSettings(dir=d)), None)
    return h5


def test_known_deflection_gives_the_expected_com_in_mrad(
    tmp_path: Path, camera: SimulatedCamera, calibrated_file: Path
) -> None:
    result = analyse_scan(calibrated_file, tmp_path, SIM)
    assert result.calibration["calibrated"] is True and result.summary["com_units"] == "mrad"
    shift = camera.disk_shift()  # (d_row, d_col), detector pixels, the sample columns
    for axis, name in ((0, "com_x"), (1, "com_y")):
        expected = (shift[..., axis] - shift[..., axis].mean()) * ALPHA / DISK  # mrad
        measured = result.arrays[name]
        assert measured.shape == expected.shape
        assert np.abs(expected).max() > 1.0  # a deflection worth measuring: over 1 mrad
        slope = float((measured * expected).sum() / (expected * expected).sum())
        assert slope == pytest.approx(1.0, abs=0.05), f"{name}: CoM is {slope:.3f} of the expected mrad"
        assert np.corrcoef(measured.ravel(), expected.ravel())[0, 1] > 0.9  # per-position shot noise


def test_dm4_calibrations_reach_py4dstem(tmp_path: Path, calibrated_file: Path) -> None:
    result = analyse_scan(calibrated_file, tmp_path, SIM)
    cal = result.calibration
    assert cal["step_angstrom"] == pytest.approx(10 * STEP_NM)
    assert cal["convergence_semiangle_mrad"] == pytest.approx(ALPHA) and cal["energy_ev"] == 300e3
    assert cal["source"].endswith("scan1.dm4") and cal["status"] == "calibrated"
    assert cal["q_pixel_mrad"] == pytest.approx(ALPHA / result.probe_radius_px)
    assert result.summary["r_pixel_angstrom"] == pytest.approx(0.5)
    assert result.summary["energy_ev"] == 300e3
    assert np.isfinite(result.fitted["defocus_angstrom"]) and result.fitted["calibrated"] is True
    assert result.fitted["defocus_angstrom"] == pytest.approx(-result.summary["parallax"]["C1_angstrom"])

    # The DataCube py4DSTEM works on carries them.
    from counting.sparse import read_counted_scan
    from tasks.analysis.data import drop_flyback

    counted = drop_flyback(read_counted_scan(calibrated_file))
    c = calibration_from_metadata(counted.metadata["microscope"], SIDE, SIDE - 1)
    dense, _ = densify(counted, SIM.bin_frames)
    dc, probe = build_datacube(dense, calibrated_config(SIM, c))
    assert (
        dc.calibration.get_R_pixel_size() == pytest.approx(0.5) and dc.calibration.get_R_pixel_units() == "A"
    )
    assert dc.calibration.get_Q_pixel_size() == pytest.approx(ALPHA / probe.radius)
    assert dc.calibration.get_Q_pixel_units() == "mrad"
    assert probe.radius == pytest.approx(DISK / 16, rel=0.03)  # the measured disk: 11.25 binned pixels


def test_without_metadata_every_output_says_uncalibrated(tmp_path: Path, camera: SimulatedCamera) -> None:
    counted = count_batches(
        camera.iter_batches(64), camera.scan, camera.dark(), options(Thresholds(12.0, 2000.0), 2)
    )
    h5 = write_counted_scan(tmp_path / "FOURD_plain.h5", counted)
    result = analyse_scan(h5, tmp_path / "out", SIM)
    assert result.calibration["calibrated"] is False and result.calibration["status"] == "uncalibrated"
    assert result.summary["com_units"] == "detector px" and result.fitted["calibrated"] is False
    cal = ScanCalibration()
    assert "uncalibrated" in cal.describe()
    titles = [t for rows in panels(cal).values() for _, t, _ in rows]
    assert titles and all("uncalibrated" in t for t in titles)
    calibrated = ScanCalibration(0.5, 20.0, 3e5, "scan1.dm4")
    assert not any("uncalibrated" in t for rows in panels(calibrated).values() for _, t, _ in rows)
    assert calibrated.describe() == "step 0.5 Å, α 20 mrad, 300 keV from scan1.dm4"
    # CoM in detector pixels: the binned CoM times the binning, the simulator's disk shift in pixels.
    shift = camera.disk_shift()[..., 0]
    slope = float(
        (result.arrays["com_x"] * (shift - shift.mean())).sum() / ((shift - shift.mean()) ** 2).sum()
    )
    assert slope == pytest.approx(1.0, abs=0.05)


def test_partial_and_scaled_calibrations() -> None:
    only_step = calibration_from_metadata({"step_x_angstrom": 0.4, "step_y_angstrom": 0.4}, 8, 8)
    assert only_step.status == "uncalibrated: no convergence angle"
    assert "uncalibrated" in only_step.describe() and only_step.q_pixel_mrad(10.0) is None
    # A HAADF at half the scan's sampling: the scan step is half its pixel.
    half = calibration_from_metadata(
        {"step_x_angstrom": 1.0, "haadf_shape": [4, 4], "convergence_semiangle_mrad": 10}, 8, 8
    )
    assert half.step_angstrom == pytest.approx(0.5) and half.notes
