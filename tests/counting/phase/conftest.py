"""Shared fixtures: small simulated scans with a known parallax, counted by the simulator's fast path."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from counting.geometry import ScanShape
from counting.live_images import LiveGeometry, LiveImages
from counting.phase.accumulate import ParallaxAccumulator, ParallaxSnapshot
from counting.phase.bins import ParallaxBins
from counting.phase.model import aberration_matrix
from counting.simulator import SimulatedCamera, SimulatorConfig

GEOMETRY = LiveGeometry(288.0, 288.0, 180.0, 200.0, 400.0)  # the simulator's disk (BEAM_CENTER, radius)
SIDE = 64


class Scan:
    """A simulated scan's camera, its parallax sums, live images and the sample-column mask."""

    def __init__(self, config: SimulatorConfig, rows: int | None = None) -> None:
        self.camera = SimulatedCamera(config)
        h, w = config.scan.height, config.scan.width
        self.acc = ParallaxAccumulator(h, w, ParallaxBins.from_geometry(GEOMETRY))
        self.live = LiveImages(w, h, GEOMETRY)
        for batch in self.camera.iter_counted(1024):
            keep = batch[0] < (rows or h) * w
            if keep.all():
                self.acc.add(*batch)
                self.live.add(*batch)
        self.snapshot = self.acc.snapshot()
        self.mask = np.ones((h, w), bool)
        self.mask[:, -1] = False  # the flyback column is not the sample

    def object(self) -> np.ndarray:
        """The true bright-field transmission (1 - scattered fraction) on the sample columns."""
        return 1.0 - self.camera.scatter_fraction()[:, :-1]


def simulate(rows: int | None = None, **parallax) -> Scan:
    """A 64x64 scan at 200 e/frame with this parallax (first `rows` rows only, if given)."""
    return Scan(SimulatorConfig(ScanShape(SIDE, SIDE), dose=200.0, seed=3, **parallax), rows)


@pytest.fixture(scope="package")
def astigmatic() -> Scan:
    return simulate(defocus=0.05, astigmatism=0.02, astigmatism_angle=30.0, rotation=20.0)


@pytest.fixture(scope="package")
def strong_defocus() -> Scan:
    return simulate(defocus=-0.08)


def noise_free_copies(side: int, seed: int) -> ParallaxSnapshot:
    """A snapshot whose every bin is the same sample seen at r + M k_b (M of defocus 0.05, A1 0.02 at
    30 deg, rotation 20 deg), no counting noise: large Gaussian particles, some across the scan's edge."""
    bins = ParallaxBins.from_geometry(GEOMETRY)
    m = aberration_matrix(0.05, 0.02, 30.0, 20.0)
    rng = np.random.default_rng(seed)
    pad = 24
    y, x = np.mgrid[-pad : side + pad, -pad : side + pad].astype(np.float64)
    thickness = np.zeros_like(x)
    for cx, cy, sigma in zip(
        rng.uniform(-5, side + 5, 10), rng.uniform(-5, side + 5, 10), rng.uniform(4, 9, 10)
    ):
        thickness += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
    sample = 1.0 - 0.6 * (1.0 - np.exp(-thickness))
    rows, cols = np.mgrid[0:side, 0:side] + pad
    counts = np.empty((side * side, bins.count), np.float32)
    for b, shift in enumerate(bins.k @ m.T):
        seen = ndimage.map_coordinates(sample, [rows + shift[1], cols + shift[0]], order=3)
        counts[:, b] = (1000.0 * seen).ravel()
    return ParallaxSnapshot(side, side, bins, counts, np.ones(side * side, np.int32))
