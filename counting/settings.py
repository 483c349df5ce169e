"""Settings sections for counting and the simulated camera; composed into the one Settings object in flows/settings.py.

Pure pydantic: the configs the counting code takes are built from these in streaming/components.py, so that
loading settings never imports the kernel (numba) or the threshold fit (scipy).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field


class CountingSettings(BaseModel):
    """Electron-counting parameters (production defaults from NERSC)."""

    dark: Path | None = Field(
        None, description="dark reference .npy (576x576); none: a zero dark with fitted thresholds"
    )
    background_threshold: float | None = Field(None, description="fixed background threshold in ADU")
    xray_threshold: float | None = Field(None, description="fixed x-ray threshold in ADU")
    background_n_sigma: float = Field(4.5, description="background threshold: fitted noise mean + n sigma")
    xray_n_sigma: float = Field(175.0, description="x-ray threshold: sample mean + n standard deviations")
    number_of_samples: int = Field(1200, ge=1, description="pixel values sampled to estimate the thresholds")
    sample_frames: int = Field(20, ge=1, description="distinct frames the threshold samples come from")
    seed: int = Field(0, description="seed of the threshold sampling (estimates are reproducible)")
    workers: int = Field(0, ge=0, description="threads for counting; 0 = all cores")
    batch_size: int = Field(64, ge=1, description="frames counted per batch (bounds memory)")


class SimulatorSettings(BaseModel):
    """The simulated 4D Camera used by the demo, tests and benchmarks."""

    scan_width: int = Field(64, ge=1, description="scan positions per row (the flyback column included)")
    scan_height: int = Field(64, ge=1, description="scan rows")
    frames_per_position: int = Field(1, ge=1, description="frames the camera takes at each position")
    dose: float = Field(200.0, ge=0, description="mean electrons per frame")
    seed: int = Field(0, ge=0, description="the session's seed; scan n uses SimulatorConfig.for_scan(n)")
    dark_frames: int = Field(100, ge=1, description="beam-blanked frames for the simulated dark reference")
    flyback: bool = Field(
        True,
        description="the last column of every scan row is the beam's flyback, as the 4D Camera records it "
        "(the scan width includes it; analysis drops it unless analysis.keep_flyback)",
    )
