"""The py4DSTEM steps of an analysis: the DataCube and its probe, then virtual images, DPC and parallax.

Each reconstruction takes the DataCube and returns (scan-sized arrays by name, facts for the summary); the
caller runs them as optional steps, so one that fails costs none of the others. py4DSTEM is imported
inside them: it takes seconds to import.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tasks.analysis.config import AnalysisConfig

if TYPE_CHECKING:
    from py4DSTEM import DataCube

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Probe:
    """Bright-field disk in the binned pattern: radius and centre (qx = row, qy = column), pixels."""

    radius: float
    qx0: float
    qy0: float


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


def virtual_images(dc: DataCube, probe: Probe, config: AnalysisConfig) -> tuple[dict, dict]:
    """Virtual bright field (the disk) and annular dark field (outside it)."""
    centre = (probe.qx0, probe.qy0)
    r_bf = config.bf_radius_factor * probe.radius
    r_in = config.adf_inner_factor * probe.radius
    edge = min(dc.data.shape[2], dc.data.shape[3]) / 2
    r_out = edge if config.adf_outer_factor is None else config.adf_outer_factor * probe.radius
    bf = dc.get_virtual_image(mode="circle", geometry=(centre, r_bf), name="bf", verbose=False)
    adf = dc.get_virtual_image(mode="annulus", geometry=(centre, (r_in, r_out)), name="adf", verbose=False)
    arrays = {"bf": np.asarray(bf.data, np.float64), "adf": np.asarray(adf.data, np.float64)}
    return arrays, {"bf_radius_px": r_bf, "adf_radii_px": [r_in, r_out]}


def dpc_phase(dc: DataCube, config: AnalysisConfig, scale: float) -> tuple[dict, dict]:
    """Centre of mass (times ``scale``) and the DPC phase, with a forced CoM rotation as the paper."""
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


def parallax(dc: DataCube, config: AnalysisConfig) -> tuple[dict, dict]:
    """Parallax bright field and, with the aberration fit, the corrected phase and the fitted C1."""
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
