"""Shared fixtures: small simulated scans with a known parallax, counted by the simulator's fast path."""

from __future__ import annotations

import numpy as np
import pytest

from counting.geometry import ScanShape
from counting.live_images import LiveGeometry, LiveImages
from counting.phase.accumulate import ParallaxAccumulator
from counting.phase.bins import ParallaxBins
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
