"""The dark flow under Prefect: a dark from the simulated camera's beam-blanked frames, stored with its
statistics and recorded in the catalogue; a bad source fails the run with one clear message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from counting.dark import dark_reference
from counting.geometry import ScanShape
from counting.simulator import SimulatedCamera, SimulatorConfig
from flows.dark import dark

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.mark.timeout(120)
def test_dark_flow_stores_and_catalogues_a_simulated_dark(stemstream_env: Path) -> None:
    state = dark(source="simulated", frames=12, return_state=True)
    assert state.is_completed(), state.message
    info = state.result()
    path = Path(info["path"])
    assert (
        path.parent == stemstream_env / "darks" and info["frames"] == 12 and info["camera"] == "simulated:0"
    )
    frames = SimulatedCamera(SimulatorConfig(ScanShape(1, 1), seed=0)).dark_frames(12)
    np.testing.assert_array_equal(np.load(path), dark_reference(frames))

    from catalogue import open_catalogue
    from flows.settings import load_settings

    with open_catalogue(load_settings().catalogue, stemstream_env, create=False) as cat:
        stored = cat.newest_dark()
    assert stored is not None and stored.path == info["path"] and stored.frames == 12
    assert stored.hot_pixels == info["hot_pixels"] and stored.noise == pytest.approx(info["noise"])

    failed = dark(source="scan", scans_dir=str(stemstream_env / "nowhere"), return_state=True)
    assert failed.is_failed() and "no dark sums of any scan" in str(failed.message)
