"""Counting accuracy of stemstream and of stempy's production pipeline on the same simulated frames."""

from __future__ import annotations

from dataclasses import dataclass

from counting.dark import dark_reference
from counting.geometry import ScanShape
from counting.kernel import Counter
from counting.simulator import SimulatedCamera, SimulatorConfig
from counting.thresholds import estimate_thresholds
from stemstream_testing.accuracy import Accuracy, match_frames
from stemstream_testing.options import estimation
from stemstream_testing.oracle import stempy_count_frames, stempy_thresholds


@dataclass(frozen=True)
class DoseResult:
    """Accuracy of both counters at one dose."""

    dose: float
    ours: Accuracy
    stempy: Accuracy
    ours_background: float
    stempy_background: float


def evaluate_dose(dose: float, side: int = 12, seed: int = 2) -> DoseResult:
    """Count a side x side simulated scan both ways: ours with a dark reference, stempy as production runs it."""
    cam = SimulatedCamera(SimulatorConfig(ScanShape(side, side), dose=dose, seed=seed))
    dark = dark_reference(cam.dark_frames(50))
    batch, truth = next(cam.iter_batches_with_truth(side * side))
    est = estimate_thresholds(batch.frames[:20], dark, estimation())
    ours = match_frames(Counter(dark, est.thresholds).count(batch.frames).to_list(), truth)
    # Production stempy: zero dark, thresholds from its own fit (1200 samples over 20 frames, 4.5 / 175 sigma).
    st = stempy_thresholds(batch.frames[:20])
    theirs = match_frames(stempy_count_frames(batch.frames, None, st), truth)
    return DoseResult(dose, ours, theirs, est.background_threshold, st.background)
