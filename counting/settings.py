"""Settings sections for counting and the simulated camera; composed into the one Settings object in flows/settings.py."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from counting.kernel import Thresholds
from counting.pipeline import CountingOptions
from counting.thresholds import ThresholdConfig


class CountingSettings(BaseModel):
    """Electron-counting parameters (production defaults from NERSC)."""

    dark: Path | None = Field(
        None, description="dark reference .npy (576x576); none: a zero dark with fitted thresholds"
    )
    background_threshold: float | None = Field(None, description="fixed background threshold in ADU")
    xray_threshold: float | None = Field(None, description="fixed x-ray threshold in ADU")
    background_n_sigma: float = 4.5
    xray_n_sigma: float = 175.0
    number_of_samples: int = Field(1200, ge=1)
    sample_frames: int = Field(20, ge=1, description="distinct frames the threshold samples come from")
    seed: int = 0
    workers: int = Field(0, ge=0, description="threads for counting; 0 = all cores")
    batch_size: int = Field(64, ge=1, description="frames counted per batch (bounds memory)")


class SimulatorSettings(BaseModel):
    """The simulated 4D Camera used by the demo, tests and benchmarks."""

    scan_width: int = Field(64, ge=1)
    scan_height: int = Field(64, ge=1)
    frames_per_position: int = Field(1, ge=1)
    dose: float = Field(200.0, ge=0, description="mean electrons per frame")
    seed: int = Field(0, ge=0, description="the session's seed; scan n uses SimulatorConfig.for_scan(n)")
    dark_frames: int = Field(100, ge=1)
    flyback: bool = Field(
        True,
        description="the last column of every scan row is the beam's flyback, as the 4D Camera records it "
        "(the scan width includes it; analysis drops it unless analysis.keep_flyback)",
    )


def threshold_config(counting: CountingSettings) -> ThresholdConfig:
    """How thresholds are estimated, from the counting settings (same field names)."""
    return ThresholdConfig(
        number_of_samples=counting.number_of_samples,
        sample_frames=counting.sample_frames,
        background_n_sigma=counting.background_n_sigma,
        xray_n_sigma=counting.xray_n_sigma,
        seed=counting.seed,
    )


def fixed_thresholds(counting: CountingSettings) -> Thresholds | None:
    """The fixed thresholds, when both are set."""
    if counting.background_threshold is None or counting.xray_threshold is None:
        return None
    return Thresholds(counting.background_threshold, counting.xray_threshold)


def counting_options(counting: CountingSettings) -> CountingOptions:
    """What offline counting counts with, from the counting settings."""
    return CountingOptions(fixed_thresholds(counting), threshold_config(counting), counting.workers)
