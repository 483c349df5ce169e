"""Shared fixtures: small simulated scans (the simulator is the project's own first-class fake camera)."""

from __future__ import annotations

import numpy as np
import pytest

from counting.dark import dark_reference
from counting.geometry import ScanShape
from counting.simulator import SimulatedCamera, SimulatorConfig


@pytest.fixture(scope="session")
def camera() -> SimulatedCamera:
    return SimulatedCamera(SimulatorConfig(ScanShape(12, 10), dose=200.0, seed=3))


@pytest.fixture(scope="session")
def camera_dark(camera: SimulatedCamera) -> np.ndarray:
    return dark_reference(camera.dark_frames(40))
