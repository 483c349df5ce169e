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
from typing import Any

import numpy as np

from counting.sparse import CountedScan, read_counted_scan
from tasks.analysis.calibration import ScanCalibration, calibration_from_metadata
from tasks.analysis.config import AnalysisConfig, analysis_config  # noqa: F401 (its API)
from tasks.analysis.data import densify, drop_flyback, fill_missing_positions  # noqa: F401 (its API)
from tasks.analysis.images import save_pngs
from tasks.analysis.reconstructions import (  # noqa: F401 (build_datacube: its API)
    Probe,
    build_datacube,
    dpc_phase,
    parallax,
    virtual_images,
)

log = logging.getLogger(__name__)


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
        summary["virtual"] = run.optional("virtual", virtual_images, dc, probe, config)
    if config.dpc:
        summary["dpc"] = run.optional("dpc", dpc_phase, dc, config, com_scale)
    if config.parallax:
        summary["parallax"] = run.optional("parallax", parallax, dc, config)
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
