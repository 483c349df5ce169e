"""Analyse a counted scan with py4DSTEM: probe, virtual BF/ADF, centre of mass, DPC phase, parallax; PNGs.

Plain code (no Prefect). Follows the Welborn 2024 paper's processing (swelborn/welborn-microscopy-streaming-
paper-with-code): frames binned by 16 (576² -> 36²), a dense ``py4DSTEM.DataCube``, DPC with a forced CoM
rotation and q_highpass 0.03, parallax with edge blending and a threshold of 0.8, then an aberration fit
(fitted defocus = -C1). Calibrations come from the microscope's metadata in the file (tasks.analysis.calibration:
the scan step in Å, and Q = convergence semi-angle / measured disk radius, so CoM is in mrad); without it
the nominal 0.36 Å and 17.1 mrad of the paper are used where py4DSTEM needs numbers, CoM is in detector
pixels, and every output says "uncalibrated". Iterations and padding are scaled down so a 64x64 scan takes
seconds on two cores. Every step after the DataCube is optional: a failure becomes a warning in the result
and the other images are still produced.

The flyback column (the last column of every scan row, recorded while the beam flies back to the next row)
is not sample data: it is dropped before the analysis, as NCEM's notebooks load scans with stempy's
``SparseArray.from_hdf5(..., keep_flyback=False)``, so the images are width - 1 wide. ``keep_flyback``
(setting ``analysis.keep_flyback``) keeps it. The HDF5 file always holds every column.

py4DSTEM (1.5-5 s to import) is imported only when an analysis runs.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from counting.geometry import FRAME_COLS
from counting.sparse import CountedScan, read_counted_scan
from tasks.analysis.calibration import ScanCalibration, calibration_from_metadata
from tasks.analysis.data import densify, drop_flyback, fill_missing_positions  # noqa: F401 (its API)
from tasks.analysis.images import save_pngs
from tasks.settings import AnalysisSettings

if TYPE_CHECKING:
    from py4DSTEM import DataCube

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnalysisConfig:
    """What to compute and with which parameters; defaults follow the paper, scaled for small scans."""

    energy_ev: float = 300e3
    convergence_semiangle_mrad: float = 17.1  # Q calibration = this / measured probe radius (paper)
    r_pixel_size_angstrom: float = 0.36  # scan step (paper: 0.03615877 nm)
    bin_frames: int = 16  # 576² -> 36² patterns, as the paper
    fill_incomplete: bool = True  # positions without all their frames get the mean of their neighbours
    probe_thresh_upper: float = 0.95  # get_probe_size threshold (paper)
    # virtual detectors, in units of the measured probe radius
    virtual: bool = True
    bf_radius_factor: float = 1.0
    adf_inner_factor: float = 1.2  # outside the disk, and its deflection
    adf_outer_factor: float | None = None  # None: out to the detector edge
    # centre of mass and DPC
    dpc: bool = True
    com_rotation_deg: float | None = 256.0  # scan-to-detector rotation (paper's instrument); None: fitted
    com_transpose: bool | None = False
    dpc_q_highpass: float = 0.03
    dpc_max_iter: int = 16
    # parallax
    parallax: bool = True
    parallax_padding_px: int = 8  # paper 16 on a 400² scan
    parallax_edge_blend: int = 4  # paper 8
    parallax_threshold_intensity: float = 0.8
    parallax_defocus_guess_angstrom: float = 50.0  # paper; pre-shifts the BF images before alignment
    parallax_min_alignment_bin: int = 4
    parallax_iter_at_min_bin: int = 2  # paper 12; cost grows linearly
    parallax_aberration_fit: bool = True
    parallax_aberration_correct: bool = True
    parallax_max_positions: int = 256 * 256  # beyond this parallax is skipped (time and memory grow with it)
    png_dpi: int = 100
    # Analyse the flyback column too; the default is the setting's (AnalysisSettings: its one default).
    keep_flyback: bool = AnalysisSettings.model_fields["keep_flyback"].default

    def __post_init__(self) -> None:
        if self.bin_frames < 1 or FRAME_COLS % self.bin_frames:
            raise ValueError(f"bin_frames must divide {FRAME_COLS}, got {self.bin_frames}")
        if self.energy_ev <= 0 or self.convergence_semiangle_mrad <= 0 or self.r_pixel_size_angstrom <= 0:
            raise ValueError("energy, convergence semiangle and R pixel size must be positive")


def analysis_config(settings: AnalysisSettings, **paper: Any) -> AnalysisConfig:
    """What analyse_scan runs with, from the analysis settings; ``paper`` overrides other parameters."""
    return AnalysisConfig(keep_flyback=settings.keep_flyback, **paper)


@dataclass
class AnalysisResult:
    """PNG paths by name (bf, adf, com, dpc, parallax, dp_mean), calibration, step timings and warnings."""

    images: dict[str, Path]
    probe_radius_px: float
    q_pixel_mrad: float
    timings: dict[str, float]
    warnings: list[str]
    summary: dict
    arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # the scan-sized maps
    calibration: dict = field(default_factory=dict)  # ScanCalibration.as_dict: "calibrated" or why not
    fitted: dict = field(default_factory=dict)  # fitted numbers: defocus, rotations (for the catalogue)


@dataclass(frozen=True)
class Probe:
    """Bright-field disk in the binned pattern: radius and centre (qx = row, qy = column), pixels."""

    radius: float
    qx0: float
    qy0: float


# ------------------------------------------------------------------------------------------- datacube
def build_datacube(dense: np.ndarray, config: AnalysisConfig) -> tuple[DataCube, Probe]:
    """A calibrated py4DSTEM DataCube and the probe measured on its mean pattern (Q = semiangle / radius)."""
    import py4DSTEM

    dc = py4DSTEM.DataCube(data=dense)
    dc.calibration.set_R_pixel_size(config.r_pixel_size_angstrom)
    dc.calibration.set_R_pixel_units("A")
    probe = _measure_probe(dc, config)
    dc.calibration.set_Q_pixel_size(config.convergence_semiangle_mrad / probe.radius)
    dc.calibration.set_Q_pixel_units("mrad")
    return dc, probe


def _measure_probe(dc: DataCube, config: AnalysisConfig) -> Probe:
    dp_mean = np.asarray(dc.get_dp_mean().data, np.float64)
    if not np.isfinite(dp_mean).all() or dp_mean.max() <= 0:
        raise ValueError("the scan holds no electrons: the mean diffraction pattern is empty")
    try:
        r, qx0, qy0 = dc.get_probe_size(dp_mean, thresh_upper=config.probe_thresh_upper, plot=False)
        if np.isfinite([r, qx0, qy0]).all() and r > 0:
            return Probe(float(r), float(qx0), float(qy0))
        reason = f"non-finite result {r, qx0, qy0}"
    except Exception as exc:  # py4DSTEM fails on patterns without a clear disk; fall back, below
        reason = f"{type(exc).__name__}: {exc}"
    log.warning("get_probe_size failed (%s); using the half-maximum area and centroid", reason)
    disk = dp_mean > 0.5 * dp_mean.max()
    rows, cols = np.nonzero(disk)
    return Probe(float(np.sqrt(disk.sum() / np.pi)), float(rows.mean()), float(cols.mean()))


# ------------------------------------------------------------------------------------------- analysis
def analyse_scan(
    h5_path: str | os.PathLike, out_dir: str | os.PathLike, config: AnalysisConfig = AnalysisConfig()
) -> AnalysisResult:
    """Analyse one counted scan file and write ``<stem>_{bf,adf,com,dpc,parallax,dp_mean}.png`` to out_dir.

    Unless ``config.keep_flyback``, the last scan column (the flyback) is dropped first: every image and the
    summary's scan_width are then the file's width - 1 (``file_scan_width`` is the file's).
    Raises ``counting.sparse.SparseFormatError`` for an unreadable file and ValueError for a scan without
    electrons (or only a flyback column); any later step that fails is reported in ``warnings`` instead."""
    _use_agg()
    h5_path, out_dir = Path(h5_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = _Run(config)
    t_total = time.perf_counter()

    counted = run.timed("read", read_counted_scan, h5_path)
    file_width = counted.scan.width
    if not config.keep_flyback:
        counted = drop_flyback(counted)
    cal = calibration_from_metadata(
        counted.metadata.get("microscope"), counted.scan.height, counted.scan.width, not config.keep_flyback
    )
    config = calibrated_config(config, cal)
    log.info("%s: %s", h5_path.name, cal.describe())
    dense, filled = run.timed("densify", densify, counted, config.bin_frames, config.fill_incomplete)
    if filled:
        run.warn(f"{filled} positions without complete frames were filled with their neighbours' mean")
    run.timed("import", _import_py4dstem)
    # py4DSTEM divides by empty sums on sparse, low-dose patterns: the NaNs are handled, the console noise
    # is not wanted.
    with np.errstate(divide="ignore", invalid="ignore"):
        summary = _reconstruct(run, counted, dense, filled, config, cal)
    summary["file_scan_width"] = file_width
    fitted = summary["fitted"]
    images = run.timed(
        "plots", save_pngs, run.arrays, out_dir, h5_path.stem, config.png_dpi, cal, run.warn,
        fitted.get("defocus_angstrom"),
    )  # fmt: skip
    run.timings["total"] = time.perf_counter() - t_total
    log.info("analysed %s in %.1f s (%d warnings)", h5_path.name, run.timings["total"], len(run.warnings))
    return AnalysisResult(
        images=images,
        probe_radius_px=summary["probe_radius_px"],
        q_pixel_mrad=summary["q_pixel_mrad"],
        timings={k: round(v, 4) for k, v in run.timings.items()},
        warnings=run.warnings,
        summary=summary,
        arrays=run.arrays,
        calibration=summary["calibration"],
        fitted=fitted,
    )


def calibrated_config(config: AnalysisConfig, cal: ScanCalibration) -> AnalysisConfig:
    """The config with the scan's own calibrations in place of the nominal constants, where known."""
    values = {
        "r_pixel_size_angstrom": cal.step_angstrom,
        "convergence_semiangle_mrad": cal.convergence_semiangle_mrad,
        "energy_ev": cal.energy_ev,
    }
    return replace(config, **{k: v for k, v in values.items() if v is not None})


def _reconstruct(
    run: _Run,
    counted: CountedScan,
    dense: np.ndarray,
    filled: int,
    config: AnalysisConfig,
    cal: ScanCalibration,
) -> dict:
    """DataCube and probe (required), then the optional reconstructions; returns the summary."""
    dc, probe = run.timed("datacube", build_datacube, dense, config)
    # CoM in mrad when the semi-angle is known, else in detector pixels (binned pixels x the binning).
    com_scale = cal.q_pixel_mrad(probe.radius) or float(config.bin_frames)
    run.arrays["dp_mean"] = dense.mean(axis=(0, 1), dtype=np.float64)
    summary = _base_summary(counted, dense, filled, probe, config)
    summary["calibration"] = cal.as_dict(probe.radius)
    summary["com_units"] = "mrad" if cal.reciprocal_space else "detector px"

    if config.virtual:
        summary["virtual"] = run.optional("virtual", _virtual, dc, probe, config)
    if config.dpc:
        summary["dpc"] = run.optional("dpc", _dpc, dc, config, com_scale)
    if config.parallax:
        summary["parallax"] = run.optional("parallax", _parallax, dc, config)
    summary["fitted"] = _fitted(summary, cal)
    return summary


def _fitted(summary: dict, cal: ScanCalibration) -> dict:
    """The fitted numbers worth keeping per scan (py4DSTEM: defocus = -C1), and whether they are physical."""
    out: dict = {"calibrated": cal.calibrated}
    dpc, par = summary.get("dpc") or {}, summary.get("parallax") or {}
    if dpc.get("error") is None and "rotation_deg" in dpc:
        out["dpc_rotation_deg"] = dpc["rotation_deg"]
    if par.get("error") is None and "C1_angstrom" in par:
        out["defocus_angstrom"] = -par["C1_angstrom"]
        out["parallax_rotation_deg"] = par.get("rotation_deg")
    return out


class _Run:
    """Timings, warnings and result arrays of one analysis."""

    def __init__(self, config: AnalysisConfig):
        self.config = config
        self.timings: dict[str, float] = {}
        self.warnings: list[str] = []
        self.arrays: dict[str, np.ndarray] = {}

    def timed(self, step: str, fn: Callable, *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.timings[step] = time.perf_counter() - t0

    def optional(self, step: str, fn: Callable, *args: Any) -> dict:
        """Run a step that may fail; its arrays go to ``self.arrays``, its facts are returned."""
        try:
            arrays, info = self.timed(step, fn, *args)
        except Exception as exc:  # one failed reconstruction must not cost the others
            log.debug("%s failed", step, exc_info=True)
            self.warn(f"{step} failed: {type(exc).__name__}: {exc}")
            return {"error": f"{type(exc).__name__}: {exc}"}
        self.arrays.update(arrays)
        return {**info, "error": None}

    def warn(self, message: str) -> None:
        log.warning(message)
        self.warnings.append(message)


def _use_agg() -> None:
    """Non-interactive plotting: py4DSTEM imports pyplot, and this runs on nodes without a display."""
    import matplotlib

    matplotlib.use("Agg")


def _import_py4dstem() -> None:
    import py4DSTEM  # noqa: F401  (timed separately: the import alone takes seconds)


def _base_summary(
    counted: CountedScan, dense: np.ndarray, filled: int, probe: Probe, config: AnalysisConfig
) -> dict:
    return {
        "scan_width": counted.scan.width,  # as analysed: without the flyback column unless keep_flyback
        "scan_height": counted.scan.height,
        "flyback_dropped": not config.keep_flyback,
        "frames_per_position": counted.frames_per_position,
        "completeness": counted.completeness,
        "events_per_position": counted.num_events / counted.scan.positions,
        "positions_filled": filled,
        "bin_frames": config.bin_frames,
        "pattern_shape": [int(dense.shape[2]), int(dense.shape[3])],
        "probe_radius_px": probe.radius,
        "probe_center_px": [probe.qx0, probe.qy0],
        "q_pixel_mrad": config.convergence_semiangle_mrad / probe.radius,
        "r_pixel_angstrom": config.r_pixel_size_angstrom,
        "energy_ev": config.energy_ev,
    }


def _virtual(dc: DataCube, probe: Probe, config: AnalysisConfig) -> tuple[dict, dict]:
    centre = (probe.qx0, probe.qy0)
    r_bf = config.bf_radius_factor * probe.radius
    r_in = config.adf_inner_factor * probe.radius
    edge = min(dc.data.shape[2], dc.data.shape[3]) / 2
    r_out = edge if config.adf_outer_factor is None else config.adf_outer_factor * probe.radius
    bf = dc.get_virtual_image(mode="circle", geometry=(centre, r_bf), name="bf", verbose=False)
    adf = dc.get_virtual_image(mode="annulus", geometry=(centre, (r_in, r_out)), name="adf", verbose=False)
    arrays = {"bf": np.asarray(bf.data, np.float64), "adf": np.asarray(adf.data, np.float64)}
    return arrays, {"bf_radius_px": r_bf, "adf_radii_px": [r_in, r_out]}


def _dpc(dc: DataCube, config: AnalysisConfig, scale: float) -> tuple[dict, dict]:
    from py4DSTEM.process.phase import DPC

    dpc = DPC(datacube=dc, energy=config.energy_ev, device="cpu", verbose=False)
    dpc.preprocess(
        force_com_rotation=config.com_rotation_deg,
        force_com_transpose=config.com_transpose,
        plot_center_of_mass=False,
        plot_rotation=False,
    )
    # Measured CoM (binned pixels) relative to its scan mean, times ``scale``: the beam deflection in the
    # detector frame, in mrad (calibrated) or detector pixels.
    com_x = np.asarray(dpc._com_measured_x, np.float64)
    com_y = np.asarray(dpc._com_measured_y, np.float64)
    arrays = {"com_x": (com_x - com_x.mean()) * scale, "com_y": (com_y - com_y.mean()) * scale}
    dpc.reconstruct(
        max_iter=config.dpc_max_iter, q_highpass=config.dpc_q_highpass, reset=True, progress_bar=False
    )
    arrays["dpc_phase"] = np.asarray(dpc.object_phase, np.float64)
    info = {
        "rotation_deg": float(np.rad2deg(dpc._rotation_best_rad)),
        "transpose": bool(dpc._rotation_best_transpose),
        "iterations": len(getattr(dpc, "error_iterations", []) or []),
    }
    return arrays, info


def _parallax(dc: DataCube, config: AnalysisConfig) -> tuple[dict, dict]:
    from py4DSTEM.process.phase import Parallax

    h, w = dc.data.shape[:2]
    if h * w > config.parallax_max_positions:
        raise ValueError(f"{h * w} positions exceed parallax_max_positions={config.parallax_max_positions}")
    rotation = config.com_rotation_deg or 0.0
    pad = config.parallax_padding_px
    par = Parallax(
        energy=config.energy_ev,
        datacube=dc,
        device="cpu",
        verbose=False,
        object_padding_px=(pad, pad),
        defocus=config.parallax_defocus_guess_angstrom,
    )
    par.preprocess(
        edge_blend=config.parallax_edge_blend,
        threshold_intensity=config.parallax_threshold_intensity,
        force_rotation_angle_deg=rotation,
        force_transpose=bool(config.com_transpose),
        plot_average_bf=False,
    )
    par.reconstruct(
        min_alignment_bin=config.parallax_min_alignment_bin,
        num_iter_at_min_bin=config.parallax_iter_at_min_bin,
        plot_aligned_bf=False,
        plot_convergence=False,
        progress_bar=False,
    )
    arrays = {"parallax_bf": _crop(par.recon_BF, h, w, pad)}
    info: dict = {"bf_pixels": int(par._num_bf_images)}
    if config.parallax_aberration_fit:
        par.aberration_fit(plot_CTF_comparison=False)
        info["rotation_deg"] = float(np.rad2deg(par.rotation_Q_to_R_rads))
        info["C1_angstrom"] = float(par.aberrations_C1)
        info["aberrations_polar"] = {k: float(v) for k, v in par.aberrations_dict_polar.items()}
        if config.parallax_aberration_correct:
            par.aberration_correct(plot_corrected_phase=False, upsampled=False)
            arrays["parallax_phase"] = _crop(par.recon_phase_corrected, h, w, pad)
    return arrays, info


def _crop(image: np.ndarray, h: int, w: int, pad: int) -> np.ndarray:
    """The scan field of view of a padded parallax image (py4DSTEM centres it, pad // 2 on each side)."""
    image = np.asarray(image, np.float64)
    if image.shape == (h, w):
        return image
    return image[pad // 2 : pad // 2 + h, pad // 2 : pad // 2 + w]
