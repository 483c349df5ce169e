"""The detector simulator: a deterministic simulated 4D Camera scan (camera), its configuration and physics
(config, model: the sample, the bright-field disk, the parallax of a known defocus and astigmatism), the
compiled rendering kernels (kernels) and raw v5 files written from it (files).

Its public names resolve on first use (PEP 562): importing the configuration loads no rendering kernel."""

from __future__ import annotations

from typing import TYPE_CHECKING

from counting.lazy import lazy_exports

_WHERE = {
    "SimulatedCamera": "counting.simulator.camera",
    "SimulatorConfig": "counting.simulator.config",
    "scan_seed": "counting.simulator.config",
    "write_simulated_scan": "counting.simulator.files",
}
__all__ = ["SimulatedCamera", "SimulatorConfig", "scan_seed", "write_simulated_scan"]

if TYPE_CHECKING:
    from counting.simulator.camera import SimulatedCamera
    from counting.simulator.config import SimulatorConfig, scan_seed
    from counting.simulator.files import write_simulated_scan


__getattr__ = lazy_exports(__name__, _WHERE)
