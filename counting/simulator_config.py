"""What defines a simulated 4D Camera scan: the beam, the sample, the detector's noise and charge, the seed.

Equal configs give identical frames and ground truth (counting.simulator). Every field is checked on
construction, so a bad value fails here rather than deep inside the compiled kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from counting.geometry import FRAME_ROWS, ScanShape

BEAM_CENTER = (288.0, 288.0)  # (row, col) of the undeflected bright-field disk centre


@dataclass(frozen=True)
class SimulatorConfig:
    """Everything that defines a simulated scan; equal configs give identical frames and ground truth."""

    scan: ScanShape
    frames_per_position: int = 1
    dose: float = 200.0  # mean electrons per frame (Poisson)
    offset: float = 20.0  # mean dark level, ADU
    read_noise: float = 2.4  # per-frame Gaussian noise std, ADU
    dark_variation: float = 1.5  # std of the per-pixel fixed offset pattern, ADU
    electron_adu: float = 200.0  # mean total charge one electron deposits, ADU
    electron_adu_shape: float = 6.0  # gamma shape of that charge (std = mean / sqrt(shape))
    charge_sigma: float = 0.5  # Gaussian width of the charge cloud, pixels
    disk_radius: float = 180.0  # bright-field disk radius, pixels
    halo_width: float = 80.0  # scale of the scattered electrons' distance beyond the disk edge, pixels
    scatter_min: float = 0.05  # fraction scattered out of the disk at zero thickness
    scatter_max: float = 0.6  # ... and at thickness 1
    deflection: float = 20.0  # largest bright-field disk shift over the scan, pixels (about 10 % of the disk)
    particles: int = 8  # Gaussian "particles" on a thin support film
    xray_rate: float = 0.02  # mean x-ray hits per frame (Poisson)
    xray_adu: float = 5000.0  # mean ADU per x-ray pixel (uniform 0.5x..1.5x)
    xray_2x2_fraction: float = 0.25  # fraction of x-ray hits that cover 2x2 pixels instead of one
    seed: int = 0
    frame_number_start: int = 1
    pool_size: int = 128  # distinct noise backgrounds (memory: pool_size * 663 kB, more if batches are kept)

    def __post_init__(self) -> None:
        if not isinstance(self.scan, ScanShape):
            raise ValueError(f"scan must be a ScanShape, got {type(self.scan).__name__}")
        check_int("frames_per_position", self.frames_per_position, 1)
        check_int("particles", self.particles, 0)
        check_int("seed", self.seed, 0)
        check_int("frame_number_start", self.frame_number_start, 0)
        check_int("pool_size", self.pool_size, 1)
        _check_range("dose", self.dose, 0.0, 20000.0)
        _check_range("offset", self.offset, 0.0, 60000.0)
        _check_range("read_noise", self.read_noise, 0.0, 1000.0)
        _check_range("dark_variation", self.dark_variation, 0.0, 1000.0)
        _check_range("electron_adu", self.electron_adu, 0.0, 60000.0, low_open=True)
        _check_range("electron_adu_shape", self.electron_adu_shape, 0.0, 1e6, low_open=True)
        _check_range("charge_sigma", self.charge_sigma, 0.0, 2.0, low_open=True)
        _check_range("disk_radius", self.disk_radius, 0.0, 280.0, low_open=True)
        _check_range("halo_width", self.halo_width, 0.0, 1000.0)
        _check_range("scatter_min", self.scatter_min, 0.0, 1.0)
        _check_range("scatter_max", self.scatter_max, 0.0, 1.0)
        _check_range("deflection", self.deflection, 0.0, 280.0)
        _check_range("xray_rate", self.xray_rate, 0.0, 100.0)
        _check_range("xray_adu", self.xray_adu, 0.0, 60000.0, low_open=True)
        _check_range("xray_2x2_fraction", self.xray_2x2_fraction, 0.0, 1.0)
        # The 3x3 footprint of every bright-field electron must stay inside the frame.
        reach = self.disk_radius + self.deflection + 2.0
        if BEAM_CENTER[0] - reach < 0 or BEAM_CENTER[0] + reach > FRAME_ROWS - 1:
            raise ValueError(
                f"disk_radius + deflection = {self.disk_radius + self.deflection} px does not fit in the frame"
            )

    @property
    def total_frames(self) -> int:
        """Frames in the whole scan."""
        return self.scan.positions * self.frames_per_position


def check_int(name: str, value: object, low: int) -> None:
    """Raise ValueError unless value is an integer (not a bool) >= low."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_range(name: str, value: object, low: float, high: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    bad_low = v <= low if low_open else v < low
    if not math.isfinite(v) or bad_low or v > high:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value!r}")
