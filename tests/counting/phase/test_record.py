"""The whole-scan phase fit of a written counted scan (counting.phase.record) against the simulator's known
aberrations, its /phase group read back as written, and a fit that fails for too few positions."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from counting.geometry import ScanShape
from counting.phase.fit import PX_UNITS
from counting.phase.record import PHASE_GROUP, phase_of_scan, read_phase, write_phase
from counting.simulator import SimulatedCamera, SimulatorConfig
from counting.sparse import CountedScan, read_counted_scan, write_counted_scan

PARALLAX = {"defocus": 0.05, "astigmatism": 0.02, "astigmatism_angle": 30.0, "rotation": 20.0}


def counted_scan(width: int, height: int, **parallax) -> CountedScan:
    """A simulated scan at 200 e/frame, its frames' true electrons as the counted events (the fast path)."""
    camera = SimulatedCamera(SimulatorConfig(ScanShape(width, height), dose=200.0, seed=3, **parallax))
    events = np.empty((width * height, 1), object)
    masks = np.zeros((width * height, 1), np.uint8)
    for positions, sectors, offsets, indices in camera.iter_counted(4096):
        for i, p in enumerate(positions):
            events[p, 0] = indices[offsets[i] : offsets[i + 1]].copy()
            masks[p, 0] = sectors[i]
    return CountedScan(ScanShape(width, height), events, masks, {"stemstream": {"scan_number": 1}})


def write_simulated(path: Path, width: int, height: int, **parallax) -> Path:
    """A simulated counted scan written as the writer writes it (counting.sparse)."""
    return write_counted_scan(path, counted_scan(width, height, **parallax))


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_simulated(tmp_path_factory.mktemp("phase") / "scan.h5", 64, 64, **PARALLAX)


@pytest.fixture(scope="module")
def fitted(written: Path):
    return phase_of_scan(read_counted_scan(written))


def test_the_written_scan_fits_the_simulated_aberrations(fitted) -> None:
    fit = fitted.fit
    assert fitted.status == "ok" and fitted.reason is None
    assert abs(fit.defocus / 0.05 - 1) < 0.05 and abs(fit.astigmatism / 0.02 - 1) < 0.10
    assert abs(fit.astigmatism_angle - 30.0) < 5.0 and abs(fit.rotation - 20.0) < 3.0
    assert fit.units == PX_UNITS and not fit.calibrated
    assert fit.positions == 64 * 63 and fitted.flyback_masked  # the flyback column left out
    assert (fitted.bins, len(fitted.k)) == (8, 60) and fitted.weights.shape == (60,)
    g = fitted.geometry  # estimated from the summed pattern: the simulator's disk
    assert abs(g.cx - 288) <= 6 and abs(g.cy - 288) <= 6 and abs(g.bf_radius / 180 - 1) < 0.05
    assert fitted.tcbf.shape == fitted.idpc.shape == (64, 64)
    assert np.isfinite(fitted.tcbf).all() and np.isfinite(fitted.idpc).all()
    summary = fitted.summary()
    assert summary["status"] == "ok" and summary["defocus"] == pytest.approx(fit.defocus)
    assert summary["units"] == PX_UNITS and summary["calibrated"] is False


def test_calibrated_with_the_scan_step_and_convergence_angle(written: Path, fitted) -> None:
    rec = phase_of_scan(read_counted_scan(written), fitted.geometry, scan_step_nm=0.04, convergence_mrad=22.0)
    mrad_per_px = 22.0 / fitted.geometry.bf_radius
    assert rec.fit.units == "nm" and rec.fit.calibrated and rec.fit.mrad_per_px == pytest.approx(mrad_per_px)
    nm_per_px = 0.04 * 1000.0 / mrad_per_px
    assert rec.fit.defocus == pytest.approx(fitted.fit.defocus * nm_per_px, rel=1e-9)
    assert rec.fit.astigmatism_err == pytest.approx(fitted.fit.astigmatism_err * nm_per_px, rel=1e-9)


def test_the_phase_group_reads_back_as_written(tmp_path: Path, written: Path, fitted) -> None:
    copy = tmp_path / "copy.h5"
    copy.write_bytes(written.read_bytes())
    with h5py.File(copy, "a") as f:
        write_phase(f, fitted)
        with pytest.raises(ValueError, match="already has /phase"):
            write_phase(f, fitted)  # never replaced
    back = read_phase(copy)
    assert read_phase(written) is None
    assert (back.status, back.reason, back.geometry, back.bins, back.inner) == (
        "ok", None, fitted.geometry, 8, fitted.inner,
    )  # fmt: skip
    assert (back.flyback_masked, back.scan_shape, back.code_version) == (True, (64, 64), fitted.code_version)
    for name in (
        "defocus",
        "astigmatism",
        "astigmatism_angle",
        "rotation",
        "positions",
        "units",
        "calibrated",
    ):
        assert getattr(back.fit, name) == getattr(fitted.fit, name), name
        err = f"{name}_err"
        assert getattr(back.fit, err, None) == getattr(fitted.fit, err, None), err
    for a, b in (
        (back.k, fitted.k),
        (back.fit.measured, fitted.fit.measured),
        (back.weights, fitted.weights),
    ):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(back.fit.matrix, fitted.fit.matrix)
    np.testing.assert_array_equal(back.tcbf, fitted.tcbf)
    np.testing.assert_array_equal(back.idpc, fitted.idpc)
    with h5py.File(copy) as f:
        g = f[PHASE_GROUP]
        assert set(g) == {"k", "shifts", "weights", "tcbf", "idpc"}
        assert g.attrs["units"] == PX_UNITS and g.attrs["defocus_err"] > 0
        geo = fitted.geometry
        np.testing.assert_array_equal(
            g.attrs["geometry"], [geo.cx, geo.cy, geo.bf_radius, geo.adf_inner, geo.adf_outer]
        )


def test_too_few_positions_is_a_failed_record_with_its_reason(tmp_path: Path) -> None:
    path = write_simulated(tmp_path / "small.h5", 8, 8, defocus=0.05)
    rec = phase_of_scan(read_counted_scan(path))  # 8 x 7 sample positions: a fit needs 8 x 8
    assert rec.status == "failed" and rec.fit is None and rec.tcbf is None
    assert "ParallaxFitError" in rec.reason and "8x8 used positions" in rec.reason
    assert rec.idpc.shape == (8, 8) and np.isfinite(rec.idpc).all()
    summary = rec.summary()
    assert summary["status"] == "failed" and "defocus" not in summary and summary["reason"] == rec.reason
    with h5py.File(path, "a") as f:
        write_phase(f, rec)
    back = read_phase(path)
    assert (back.status, back.reason, back.fit, back.tcbf) == ("failed", rec.reason, None, None)
    np.testing.assert_array_equal(back.idpc, rec.idpc)
