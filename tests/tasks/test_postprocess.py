"""tasks.analysis.analyse on simulated scans: the images exist and show the simulator's sample as physics says.

The simulated scans have a flyback column (the last of each row, as the 4D Camera records it), which the
analysis drops by default: images are SIDE x (SIDE - 1), the simulator's sample ground truth's shape."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from counting.geometry import ScanShape
from counting.kernel import Thresholds
from counting.pipeline import count_batches
from counting.simulator import SimulatedCamera, SimulatorConfig
from counting.simulator.config import BEAM_CENTER
from counting.sparse import CountedScan, write_counted_scan
from stemstream_testing.options import options
from stemstream_testing.sparse_images import virtual_images
from tasks.analysis.analyse import (
    AnalysisConfig,
    AnalysisResult,
    analyse_scan,
    analysis_config,
    build_datacube,
    densify,
    drop_flyback,
    fill_missing_positions,
)
from tasks.settings import AnalysisSettings

SIDE = 32
COLS = SIDE - 1  # the sample's columns: the last column of the scan is the flyback
DOSE = 1000.0  # electrons per frame: enough for the centre of mass to show the deflection at 32x32
OPTIONS = options(fixed=Thresholds(12.0, 2000.0), workers=2)
# The simulated camera has no scan/detector rotation and no defocus.
SIM = AnalysisConfig(com_rotation_deg=0.0, com_transpose=False, parallax_defocus_guess_angstrom=0.0)
IMAGE_NAMES = ("bf", "adf", "com", "dpc", "parallax", "dp_mean")  # the PNGs analyse_scan writes
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# py4DSTEM 0.14.18's parallax does float() on a 1-element array, which numpy 1.25+ deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def _simulate(side: int, dose: float, seed: int) -> tuple[SimulatedCamera, CountedScan]:
    camera = SimulatedCamera(SimulatorConfig(ScanShape(side, side), dose=dose, seed=seed, pool_size=64))
    counted = count_batches(camera.iter_batches(64), camera.scan, camera.dark(), OPTIONS)
    return camera, counted


def _r(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


@pytest.fixture(scope="module")
def simulated() -> tuple[SimulatedCamera, CountedScan]:
    return _simulate(SIDE, DOSE, seed=1)


@pytest.fixture(scope="module")
def scan_file(tmp_path_factory: pytest.TempPathFactory, simulated) -> Path:
    return write_counted_scan(tmp_path_factory.mktemp("scan") / "FOURD_scan.h5", simulated[1])


@pytest.fixture(scope="module")
def analysed(tmp_path_factory: pytest.TempPathFactory, scan_file: Path) -> AnalysisResult:
    return analyse_scan(scan_file, tmp_path_factory.mktemp("out"), SIM)


def _assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.01  # not a blank canvas


def test_all_images_written(analysed: AnalysisResult, scan_file: Path) -> None:
    assert set(analysed.images) == set(IMAGE_NAMES)
    for name, path in analysed.images.items():
        assert path.name == f"{scan_file.stem}_{name}.png"
        _assert_png(path)
    assert analysed.warnings == []
    assert {"read", "densify", "import", "datacube", "virtual", "dpc", "parallax", "plots", "total"} <= set(
        analysed.timings
    )
    assert analysed.timings["total"] < 60


def test_summary_and_calibration(analysed: AnalysisResult) -> None:
    s = analysed.summary
    assert (s["scan_width"], s["scan_height"], s["pattern_shape"]) == (COLS, SIDE, [36, 36])
    assert s["file_scan_width"] == SIDE and s["flyback_dropped"] is True
    assert s["completeness"] == 1.0 and s["positions_filled"] == 0
    # The disk is 180 px / 16 = 11.25 binned px; the deflection and the halo blur the mean pattern a little.
    assert 10.0 < analysed.probe_radius_px < 14.0
    assert analysed.q_pixel_mrad == pytest.approx(17.1 / analysed.probe_radius_px)
    assert s["dpc"]["error"] is None and s["dpc"]["rotation_deg"] == 0.0
    assert s["parallax"]["error"] is None and s["parallax"]["bf_pixels"] > 100
    assert np.isfinite(s["parallax"]["C1_angstrom"])


def test_virtual_images_show_the_sample(analysed: AnalysisResult, simulated) -> None:
    sample = simulated[0].sample_image()
    bf, adf = analysed.arrays["bf"], analysed.arrays["adf"]
    assert bf.shape == adf.shape == sample.shape == (SIDE, COLS)
    assert _r(bf, sample) < -0.6  # thicker scatters more electrons out of the disk
    assert _r(adf, sample) > 0.6  # ... and into the annulus
    assert _r(adf, bf) < -0.6


def test_centre_of_mass_follows_the_deflection(analysed: AnalysisResult, simulated) -> None:
    shift = simulated[0].disk_shift()  # (d_row, d_col); py4DSTEM's x is the first (row) axis
    assert _r(analysed.arrays["com_x"], shift[..., 0]) > 0.6
    assert _r(analysed.arrays["com_y"], shift[..., 1]) > 0.6
    assert abs(analysed.arrays["com_x"].mean()) < 1e-6  # relative to the scan mean
    # With the true (zero) rotation the integrated phase follows the thickness the deflection comes from.
    assert _r(analysed.arrays["dpc_phase"], simulated[0].sample_image()) > 0.5


def test_parallax_bf_matches_the_virtual_bf(analysed: AnalysisResult) -> None:
    par = analysed.arrays["parallax_bf"]
    assert par.shape == (SIDE, COLS)
    assert _r(par[4:-4, 4:-4], analysed.arrays["bf"][4:-4, 4:-4]) > 0.6  # edges are blended away


def test_sparse_virtual_images_cross_check(analysed: AnalysisResult, simulated) -> None:
    camera, counted = simulated
    counted = drop_flyback(counted)
    # BF well inside the disk wherever it is deflected (180 - 20 px); ADF beyond it.
    bf, adf = virtual_images(counted, inner=150, outer=280, center=BEAM_CENTER)
    assert bf.shape == adf.shape == (SIDE, COLS)
    assert bf.sum() + adf.sum() <= counted.num_events
    assert _r(bf, camera.sample_image()) < -0.6
    assert _r(adf, camera.sample_image()) > 0.6
    assert _r(bf, analysed.arrays["bf"]) > 0.8
    # The default centre is the centroid of all events: the beam centre, within a pixel or two.
    bf_c, _ = virtual_images(counted, inner=150, outer=280)
    assert _r(bf_c, bf) > 0.95


def test_datacube_shape_and_calibration(simulated) -> None:
    dense, filled = densify(simulated[1], SIM.bin_frames)
    assert filled == 0 and dense.dtype == np.float32
    dc, probe = build_datacube(dense, SIM)
    assert dc.data.shape == (SIDE, SIDE, 36, 36)
    cal = dc.calibration
    assert cal.get_R_pixel_size() == pytest.approx(0.36) and cal.get_R_pixel_units() == "A"
    assert cal.get_Q_pixel_size() == pytest.approx(17.1 / probe.radius) and cal.get_Q_pixel_units() == "mrad"
    # Binned pixel i covers detector pixels 16i..16i+15, so the beam centre (288) is at 17.5.
    assert probe.qx0 == pytest.approx(17.5, abs=0.5) and probe.qy0 == pytest.approx(17.5, abs=0.5)
    assert float(dense.sum()) == simulated[1].num_events


def test_missing_frames_are_filled(tmp_path: Path, simulated) -> None:
    camera, counted = simulated
    events, masks = counted.events.copy(), counted.sector_masks.copy()
    rng = np.random.default_rng(5)
    sample_positions = np.arange(counted.scan.positions).reshape(SIDE, SIDE)[:, :COLS].ravel()
    lost = rng.choice(sample_positions, 30, replace=False)
    for p in lost[:20]:  # frames that never arrived
        events[p, 0] = np.empty(0, np.uint32)
        masks[p, 0] = 0
    for p in lost[20:]:  # frames missing their last sector (rows 432..575)
        events[p, 0] = events[p, 0][events[p, 0] < 432 * 576]
        masks[p, 0] = 0b0111
    path = write_counted_scan(tmp_path / "lossy.h5", CountedScan(counted.scan, events, masks, {}))

    result = analyse_scan(path, tmp_path / "out", SIM)
    assert result.summary["positions_filled"] == 30
    assert any("30 positions" in w for w in result.warnings)
    assert set(result.images) == set(IMAGE_NAMES)
    bf = result.arrays["bf"]
    rows, cols = np.divmod(lost, SIDE)
    kept = np.ones((SIDE, COLS), bool)
    kept[rows, cols] = False
    # Filled patterns look like their neighbours: no dark holes, no stripes in the CoM.
    assert bf[~kept].min() > 0.8 * bf[kept].min() and bf[~kept].max() < 1.2 * bf[kept].max()
    assert _r(bf, camera.sample_image()) < -0.6
    com_x = result.arrays["com_x"]
    assert np.abs(com_x[~kept]).max() <= 1.5 * np.abs(com_x[kept]).max()


def test_fill_missing_positions_uses_neighbours() -> None:
    dense = np.arange(5 * 5 * 2 * 2, dtype=np.float32).reshape(5, 5, 2, 2)
    valid = np.ones((5, 5), bool)
    valid[1:4, 1:4] = False  # a 3x3 hole: the rim fills first, then the centre from the rim
    expected_corner = (dense[0, 1] + dense[1, 0]) / 2  # (1,1)'s valid neighbours: (0,1) and (1,0)
    assert fill_missing_positions(dense, valid) == 9
    np.testing.assert_allclose(dense[1, 1], expected_corner)
    assert np.isfinite(dense).all()
    nothing = np.zeros((2, 2, 2, 2), np.float32)
    assert fill_missing_positions(nothing, np.zeros((2, 2), bool)) == 0


def test_a_failing_parallax_costs_only_its_image(
    tmp_path: Path, scan_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import py4DSTEM.process.phase

    class Broken:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("no BF pixels above threshold")

    monkeypatch.setattr(py4DSTEM.process.phase, "Parallax", Broken)
    result = analyse_scan(scan_file, tmp_path, SIM)
    assert result.warnings == ["parallax failed: RuntimeError: no BF pixels above threshold"]
    assert result.summary["parallax"]["error"].startswith("RuntimeError")
    assert set(result.images) == set(IMAGE_NAMES) - {"parallax"}
    assert not (tmp_path / f"{scan_file.stem}_parallax.png").exists()


def test_tiny_low_dose_scan_with_paper_defaults(tmp_path: Path) -> None:
    _, counted = _simulate(8, 5.0, seed=2)
    path = write_counted_scan(tmp_path / "tiny.h5", counted)
    result = analyse_scan(path, tmp_path / "out", AnalysisConfig())  # paper rotation 256 deg, defocus 50 A
    assert {"bf", "adf", "com", "dpc", "dp_mean"} <= set(result.images)
    # Parallax either manages on 8x8 positions at 5 e-/frame or says why not.
    assert "parallax" in result.images or any(w.startswith("parallax failed") for w in result.warnings)


def test_steps_can_be_switched_off(tmp_path: Path, scan_file: Path) -> None:
    result = analyse_scan(scan_file, tmp_path, replace(SIM, dpc=False, parallax=False))
    assert set(result.images) == {"bf", "adf", "dp_mean"}
    assert "dpc" not in result.timings and "parallax" not in result.timings


def test_empty_scan_and_bad_config() -> None:
    with pytest.raises(ValueError, match="no electrons"):
        build_datacube(np.zeros((4, 4, 36, 36), np.float32), SIM)
    with pytest.raises(ValueError, match="bin_frames"):
        AnalysisConfig(bin_frames=7)


# ------------------------------------------------------------------------------------------- flyback
def test_the_flyback_column_is_dropped_by_default(
    analysed: AnalysisResult, simulated, scan_file: Path
) -> None:
    """As NCEM loads scans (stempy's keep_flyback=False): the last column's frames take no part."""
    from stempy.io.sparse_array import SparseArray

    _, counted = simulated
    cropped = drop_flyback(counted)
    assert cropped.scan == ScanShape(COLS, SIDE)
    flyback = np.arange(counted.scan.positions).reshape(SIDE, SIDE)[:, COLS:].ravel()
    kept = np.setdiff1d(np.arange(counted.scan.positions), flyback)
    assert cropped.num_events == counted.num_events - sum(len(e) for e in counted.events[flyback].ravel())
    for got, want in zip(cropped.events.ravel(), counted.events[kept].ravel(), strict=True):
        np.testing.assert_array_equal(got, want)
    # Exactly the frames stempy keeps.
    stempy = SparseArray.from_hdf5(str(scan_file), keep_flyback=False)
    assert tuple(stempy.scan_shape) == (SIDE, COLS)
    for got, want in zip(cropped.events.ravel(), stempy.data.ravel(), strict=True):
        np.testing.assert_array_equal(got, want)
    # The analysis saw only those frames: its mean pattern is theirs.
    dense, _ = densify(cropped, SIM.bin_frames)
    np.testing.assert_allclose(analysed.arrays["dp_mean"], dense.mean(axis=(0, 1), dtype=np.float64))
    full, _ = densify(counted, SIM.bin_frames)
    assert not np.allclose(analysed.arrays["dp_mean"], full.mean(axis=(0, 1), dtype=np.float64))
    assert all(a.shape == (SIDE, COLS) for k, a in analysed.arrays.items() if k != "dp_mean")


def test_keep_flyback_keeps_it_and_it_is_not_the_sample(tmp_path: Path, scan_file: Path) -> None:
    settings = AnalysisSettings(keep_flyback=True)
    config = replace(analysis_config(settings), com_rotation_deg=0.0, com_transpose=False, parallax=False)
    assert config.keep_flyback
    result = analyse_scan(scan_file, tmp_path, config)
    assert result.summary["scan_width"] == result.summary["file_scan_width"] == SIDE
    assert result.summary["flyback_dropped"] is False
    bf, com_x, com_y = (result.arrays[k] for k in ("bf", "com_x", "com_y"))
    assert bf.shape == com_x.shape == (SIDE, SIDE)
    # The flyback column's disk is displaced and smeared: outside the sample's centre-of-mass range.
    com = np.hypot(com_x - com_x[:, :COLS].mean(), com_y - com_y[:, :COLS].mean())
    assert com[:, COLS].min() > 1.5 * com[:, :COLS].max()
    assert com[:, COLS].mean() > 5 * com[:, :COLS].mean()


def test_analysis_settings() -> None:
    from flows.settings import Settings

    assert Settings().analysis.keep_flyback is False
    assert AnalysisConfig().keep_flyback is False and analysis_config(AnalysisSettings()) == AnalysisConfig()
    with pytest.raises(ValueError, match="only a flyback column"):
        drop_flyback(CountedScan(ScanShape(1, 2), np.empty((2, 1), object), np.zeros((2, 1), np.uint8)))
