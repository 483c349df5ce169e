"""The microscope's scale for a phase fit, from a scan file's /metadata/microscope attributes
(counting.microscope_meta): the scan step in nm and the detector's mrad per pixel.

As the session's analysis reads them (tasks.analysis.calibration.calibration_from_metadata, the flyback
column dropped): the step is step_x (Å; the mean with step_y when they differ by more than 1 %), scaled by the HAADF's width over the sample
columns' when the HAADF has another size; mrad per detector pixel is the convergence semi-angle over the BF
disk's radius in detector pixels.
"""

from __future__ import annotations

import math


def _positive(value: object) -> float | None:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def microscope_scale(attrs: dict | None, scan_width: int, bf_radius: float) -> tuple[float, float] | None:
    """(scan step nm, mrad per detector px) of a scan scan_width wide (its flyback column included) whose
    BF disk is bf_radius detector px; None when the attributes lack the step or the convergence angle."""
    if not attrs:
        return None
    step, step_y = _positive(attrs.get("step_x_angstrom")), _positive(attrs.get("step_y_angstrom"))
    alpha, radius = _positive(attrs.get("convergence_semiangle_mrad")), _positive(bf_radius)
    if step is None or alpha is None or radius is None:
        return None
    if step_y is not None and not math.isclose(step, step_y, rel_tol=0.01):
        step = (step + step_y) / 2  # a non-square step: the mean
    shape = attrs.get("haadf_shape")
    sample_width = scan_width - 1 if scan_width > 1 else scan_width
    if shape is not None and len(shape) == 2 and int(shape[1]) not in (sample_width, sample_width + 1):
        step *= int(shape[1]) / max(sample_width, 1)  # a HAADF of another sampling than the scan's
    return step / 10.0, alpha / radius
