"""What defines a simulated 4D Camera scan: the beam, the sample, the detector's noise and charge, the seed.

Equal configs give identical frames and ground truth (counting.simulator). Every field is checked on
construction, so a bad value fails here rather than deep inside the compiled kernels.

Flyback: the 4D Camera records one more frame at the end of every scan row, while the beam flies back to
the start of the next row. With ``flyback`` the last column of the scan is that column (the scan width
includes it): the sample occupies the first width - 1 columns, and in the flyback column the bright-field
disk is displaced by FLYBACK_SHIFT and smeared over FLYBACK_SMEAR pixels (the descan cannot follow the
beam's fast return), with the row's mean scattered fraction (the beam crosses the whole row).

Seeds: ``seed`` draws the sample, the noise and every frame's electrons; ``detector_seed`` (default: the
seed) draws the detector's fixed dark pattern and its dark frames. ``for_scan(n)`` gives scan n of a
session its own sample and electrons on the same detector, so one dark reference serves every scan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from counting.geometry import FRAME_ROWS, ScanShape
from counting.phase.model import aberration_matrix

BEAM_CENTER = (288.0, 288.0)  # (row, col) of the undeflected bright-field disk centre
FLYBACK_SHIFT = (40.0, 48.0)  # (row, col) disk displacement in flyback frames, pixels (3x the sample's)
FLYBACK_SMEAR = 160.0  # length along the columns over which a flyback frame's disk is smeared, pixels


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
    # A fine random texture of the film (as amorphous carbon has), its thickness in units of the film's:
    # it scatters but does not deflect the disk (the DPC signal stays the particles'); 0: none, frames as
    # before bit for bit. Features about 3 scan px across whatever the scan's size.
    texture: float = 0.0
    xray_rate: float = 0.02  # mean x-ray hits per frame (Poisson)
    xray_adu: float = 5000.0  # mean ADU per x-ray pixel (uniform 0.5x..1.5x)
    xray_2x2_fraction: float = 0.25  # fraction of x-ray hits that cover 2x2 pixels instead of one
    seed: int = 0
    frame_number_start: int = 1
    pool_size: int = 128  # distinct noise backgrounds (memory: pool_size * 663 kB, more if batches are kept)
    # The last column of the scan is the flyback column (the real camera always records it); as
    # SimulatorSettings.flyback, kept here so that the many SimulatorConfig(scan, ...) callers get it too.
    flyback: bool = True
    detector_seed: int | None = None  # seed of the dark pattern and dark frames; None: the seed
    # Parallax (a defocused probe; counting.phase.model): a bright-field electron at detector offset k from
    # the disk centre sees the sample at r + M k, M = R(rotation) (defocus I + astigmatism at its angle),
    # scan px per detector px, vectors (x, y) = (column, row), angles in degrees from +x towards +y. The
    # rotation (detector -> scan axes) also turns the disk deflection. All 0: today's frames, bit for bit.
    defocus: float = 0.0
    astigmatism: float = 0.0
    astigmatism_angle: float = 0.0
    rotation: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.scan, ScanShape):
            raise ValueError(f"scan must be a ScanShape, got {type(self.scan).__name__}")
        check_int("frames_per_position", self.frames_per_position, 1)
        check_int("particles", self.particles, 0)
        check_int("seed", self.seed, 0)
        if self.detector_seed is not None:
            check_int("detector_seed", self.detector_seed, 0)
        if not isinstance(self.flyback, bool):
            raise ValueError(f"flyback must be True or False, got {self.flyback!r}")
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
        _check_range("texture", self.texture, 0.0, 10.0)
        _check_range("xray_rate", self.xray_rate, 0.0, 100.0)
        _check_range("xray_adu", self.xray_adu, 0.0, 60000.0, low_open=True)
        _check_range("xray_2x2_fraction", self.xray_2x2_fraction, 0.0, 1.0)
        _check_range("defocus", self.defocus, -1.0, 1.0)
        _check_range("astigmatism", self.astigmatism, 0.0, 1.0)
        _check_range("astigmatism_angle", self.astigmatism_angle, -360.0, 360.0)
        _check_range("rotation", self.rotation, -360.0, 360.0)
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

    @property
    def sample_width(self) -> int:
        """Scan columns on the sample: the width less the flyback column (0 for a 1-column flyback scan)."""
        return self.scan.width - 1 if self.flyback else self.scan.width

    @property
    def parallax(self) -> bool:
        """Whether bright-field electrons see a shifted sample (a defocus or astigmatism is set)."""
        return self.defocus != 0.0 or self.astigmatism != 0.0

    def parallax_matrix(self) -> np.ndarray:
        """The simulated M (2x2, (x, y) basis, scan px per detector px): shift(k) = M k."""
        return aberration_matrix(self.defocus, self.astigmatism, self.astigmatism_angle, self.rotation)

    @property
    def dark_seed(self) -> int:
        """The seed of the detector's dark pattern and dark frames."""
        return self.seed if self.detector_seed is None else self.detector_seed

    def for_scan(self, scan_number: int) -> SimulatorConfig:
        """This camera's config for scan ``scan_number`` of a session: its own sample and electrons
        (seed scan_seed(seed, scan_number)) on the same detector (the dark pattern stays this config's)."""
        return replace(self, seed=scan_seed(self.seed, scan_number), detector_seed=self.dark_seed)


def scan_seed(base_seed: int, scan_number: int) -> int:
    """A seed for scan ``scan_number`` of a session seeded with ``base_seed``: deterministic, different for
    every (base_seed, scan_number), in [0, 2**63)."""
    check_int("base_seed", base_seed, 0)
    check_int("scan_number", scan_number, 0)
    state = np.random.SeedSequence((int(base_seed), int(scan_number))).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


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
