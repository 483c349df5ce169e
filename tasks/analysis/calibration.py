"""The analysis' calibrations, from the microscope's metadata in the scan file (pure; no py4DSTEM).

Real space: the step between scan positions, in Å, from the HAADF image's calibration in the microscope's
file (the HAADF is recorded on the same scan grid as the 4D Camera, less the flyback column; a HAADF of
another size than the analysed scan scales the step by the ratio of the sizes).

Reciprocal space: the bright-field disk's edge is the convergence semi-angle α, so one detector pixel is
α / R mrad, with R the disk radius measured on the scan's own mean pattern (binned pixels, so the mrad
per binned pixel comes out directly). Beam energy: the microscope's voltage.

Without metadata (or without one of the two) that space is *uncalibrated*: the analysis still runs, with
the nominal constants of AnalysisConfig where py4DSTEM needs numbers, and every output says so (image
titles, result summary, artifact); centre-of-mass maps are then in detector pixels, not mrad.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ScanCalibration:
    """What the analysis is calibrated with; None: that quantity is unknown (uncalibrated)."""

    step_angstrom: float | None = None  # real-space pixel size of the analysed scan
    convergence_semiangle_mrad: float | None = None
    energy_ev: float | None = None
    source: str = ""  # the microscope's file the values came from
    notes: list[str] = field(default_factory=list)

    @property
    def real_space(self) -> bool:
        """The scan step is known."""
        return self.step_angstrom is not None

    @property
    def reciprocal_space(self) -> bool:
        """The convergence semi-angle is known (with the measured disk: mrad per detector pixel)."""
        return self.convergence_semiangle_mrad is not None

    @property
    def calibrated(self) -> bool:
        """Both spaces calibrated."""
        return self.real_space and self.reciprocal_space

    def q_pixel_mrad(self, probe_radius_px: float) -> float | None:
        """mrad per (binned) detector pixel, from the semi-angle and the measured disk radius."""
        if self.convergence_semiangle_mrad is None or not probe_radius_px > 0:
            return None
        return self.convergence_semiangle_mrad / probe_radius_px

    @property
    def status(self) -> str:
        """'calibrated', or 'uncalibrated' with what is missing."""
        if self.calibrated:
            return "calibrated"
        missing = [
            w for w, ok in (("step", self.real_space), ("convergence angle", self.reciprocal_space)) if not ok
        ]
        if len(missing) == 2:
            return "uncalibrated"
        return f"uncalibrated: no {missing[0]}"

    def describe(self) -> str:
        """One line for image titles and artifacts."""
        if not (self.real_space or self.reciprocal_space):
            return "uncalibrated (no microscope metadata): nominal constants, CoM in detector pixels"
        parts = []
        if self.step_angstrom is not None:
            parts.append(f"step {self.step_angstrom:.4g} Å")
        if self.convergence_semiangle_mrad is not None:
            parts.append(f"α {self.convergence_semiangle_mrad:.4g} mrad")
        if self.energy_ev is not None:
            parts.append(f"{self.energy_ev / 1e3:.4g} keV")
        where = f" from {Path(self.source).name}" if self.source else ""
        text = ", ".join(parts) + where
        return text if self.calibrated else f"{self.status} ({text})"

    def as_dict(self, probe_radius_px: float | None = None) -> dict:
        """JSON-ready form for result records (with the mrad per pixel when the disk radius is given)."""
        out = {
            "calibrated": self.calibrated,
            "status": self.status,
            "step_angstrom": self.step_angstrom,
            "convergence_semiangle_mrad": self.convergence_semiangle_mrad,
            "energy_ev": self.energy_ev,
            "source": self.source or None,
            "notes": list(self.notes),
        }
        if probe_radius_px is not None:
            out["q_pixel_mrad"] = self.q_pixel_mrad(probe_radius_px)
        return out


def calibration_from_metadata(
    microscope: dict | None, scan_height: int, scan_width: int, flyback_dropped: bool = True
) -> ScanCalibration:
    """The calibration of an analysed scan of (height, width) from the file's /metadata/microscope
    attributes (counting.microscope_meta); an empty ScanCalibration when there are none."""
    if not microscope:
        return ScanCalibration()
    notes: list[str] = []
    step = _positive(microscope.get("step_x_angstrom"))
    step_y = _positive(microscope.get("step_y_angstrom"))
    if step is not None and step_y is not None and not math.isclose(step, step_y, rel_tol=0.01):
        notes.append(f"non-square step ({step_y:.4g} x {step:.4g} Å): the mean is used")
        step = (step + step_y) / 2
    shape = microscope.get("haadf_shape")
    if step is not None and shape is not None and len(shape) == 2:
        # The HAADF covers the sample columns (no flyback); with keep_flyback the scan is one wider.
        sample_width = scan_width - (0 if flyback_dropped else 1)
        # Same sampling when it is as wide as the sample columns, or as the scan with its flyback column.
        same = int(shape[1]) in (sample_width, sample_width + 1)
        ratio = 1.0 if same else int(shape[1]) / max(sample_width, 1)
        if not same:
            notes.append(
                f"HAADF {shape[1]} px wide for {sample_width} scan columns: step scaled by {ratio:.4g}"
            )
            step *= ratio
    return ScanCalibration(
        step_angstrom=step,
        convergence_semiangle_mrad=_positive(microscope.get("convergence_semiangle_mrad")),
        energy_ev=_positive(microscope.get("energy_ev")),
        source=str(microscope.get("source_file", "")),
        notes=notes,
    )


def _positive(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None
