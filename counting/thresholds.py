"""Counting thresholds estimated from sampled frames, the way stempy's calculateThresholds does it.

Differences from stempy, on purpose: values are ``(raw - dark) / gain`` in float64 (no uint16 wrap for a
dark above the raw value), and the frame sampling uses a seeded generator, so the same data and seed
always give the same thresholds.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import numba as nb
import numpy as np
from scipy.optimize import curve_fit

from counting.errors import PermanentError
from counting.geometry import FRAME_SHAPE
from counting.kernel import Thresholds


class ThresholdError(PermanentError, RuntimeError):
    """Thresholds could not be estimated from the given frames."""


@dataclass(frozen=True)
class ThresholdConfig:
    """How to estimate thresholds; built from CountingSettings (streaming.components.threshold_config), where
    the production defaults live."""

    number_of_samples: int
    sample_frames: int  # distinct frames the samples are drawn from (stempy: threshold_num_blocks)
    background_n_sigma: float
    xray_n_sigma: float
    seed: int

    def __post_init__(self) -> None:
        if self.number_of_samples < 1 or self.sample_frames < 1:
            raise ValueError("number_of_samples and sample_frames must be at least 1")
        if self.background_n_sigma <= 0 or self.xray_n_sigma <= 0:
            raise ValueError("n-sigma values must be positive")


@dataclass(frozen=True)
class ThresholdEstimate:
    """Estimated thresholds with the statistics stempy records under /metadata/electron_counting."""

    background_threshold: float
    x_ray_threshold: float
    number_of_samples: int
    min_sample: float
    max_sample: float
    mean: float
    variance: float
    std_dev: float
    number_of_bins: int
    background_threshold_n_sigma: float
    x_ray_threshold_n_sigma: float
    optimized_mean: float
    optimized_std_dev: float

    @property
    def thresholds(self) -> Thresholds:
        """The thresholds to count with."""
        return Thresholds(self.background_threshold, self.x_ray_threshold)

    def metadata(self) -> dict:
        """stempy's electron_counting metadata keys, plus threshold_calculated=True."""
        return {"threshold_calculated": True, **asdict(self)}


def fixed_threshold_metadata(thresholds: Thresholds) -> dict:
    """Metadata for thresholds given in ADU rather than estimated."""
    return {
        "threshold_calculated": False,
        "background_threshold": float(thresholds.background),
        "x_ray_threshold": float(thresholds.xray),
    }


def sample_frame_indices(available: int, config: ThresholdConfig) -> tuple[np.ndarray, np.ndarray]:
    """Pick samples with replacement from the first sample_frames frames: (distinct frame indices, weights)."""
    if available < 1:
        raise ThresholdError("no complete frames to estimate thresholds from")
    pool = min(available, config.sample_frames)
    picks = np.random.default_rng(config.seed).integers(0, pool, config.number_of_samples)
    return np.unique(picks, return_counts=True)


@nb.njit(cache=True, nogil=True)
def _accumulate(raw, dark, scale, weight, lo, hist, acc):
    """One pass over a sampled frame: weighted sum, min, max, integrality, and the histogram."""
    total = 0.0
    vmin, vmax = acc[1], acc[2]
    integral = acc[3] != 0.0
    for p in range(raw.shape[0]):
        v = (np.float64(raw[p]) - np.float64(dark[p])) * np.float64(scale[p])
        total += v
        vmin = min(vmin, v)
        vmax = max(vmax, v)
        fl = np.floor(v)
        if integral and fl != v:
            integral = False
        hist[np.int64(fl) - lo] += weight
    acc[0] += weight * total
    acc[1], acc[2] = vmin, vmax
    acc[3] = 1.0 if integral else 0.0


@nb.njit(cache=True, nogil=True)
def _squared_deviation(raw, dark, scale, mean):
    """Sum of squared deviations from the mean over one frame (the second, exact variance pass)."""
    total = 0.0
    for p in range(raw.shape[0]):
        d = (np.float64(raw[p]) - np.float64(dark[p])) * np.float64(scale[p]) - mean
        total += d * d
    return total


def _gaussian(x: np.ndarray, a: float, mu: float, sigma: float) -> np.ndarray:
    return a * np.exp(-((x - mu) ** 2) / (2 * sigma**2))


def estimate_thresholds(
    frames: np.ndarray,
    dark: np.ndarray | None,
    config: ThresholdConfig,
    gain: np.ndarray | None = None,
) -> ThresholdEstimate:
    """Estimate thresholds from candidate frames (n,576,576): the first sample_frames complete frames of a scan."""
    frames = np.asarray(frames)
    if frames.ndim != 3 or frames.shape[1:] != FRAME_SHAPE:
        raise ValueError(f"frames must be (n, 576, 576), got {frames.shape}")
    chosen, weights = sample_frame_indices(frames.shape[0], config)
    dark32 = np.zeros(FRAME_SHAPE, np.float32) if dark is None else np.asarray(dark, np.float32)
    scale = np.ones(FRAME_SHAPE, np.float32)
    if gain is not None:
        scale = (1.0 / np.asarray(gain, np.float64)).astype(np.float32)
    # Every value falls in [-max(dark), 65535 - min(dark)] * max(scale): one fixed histogram covers them all.
    lo = int(np.floor(min(-float(dark32.max()) * float(scale.max()), 0.0))) - 1
    hi = int(np.ceil(max((65535.0 - float(dark32.min())) * float(scale.max()), 0.0))) + 2
    hist = np.zeros(hi - lo, np.float64)
    acc = np.array([0.0, np.inf, -np.inf, 1.0])  # sum, min, max, all-integer flag
    flat_dark, flat_scale = dark32.ravel(), scale.ravel()
    for i, w in zip(chosen, weights):
        _accumulate(frames[i].ravel(), flat_dark, flat_scale, float(w), lo, hist, acc)
    n_total = float(weights.sum()) * frames[0].size
    mean = acc[0] / n_total
    sq = 0.0
    for i, w in zip(chosen, weights):
        sq += float(w) * _squared_deviation(frames[i].ravel(), flat_dark, flat_scale, mean)
    variance = sq / (n_total - 1) if n_total > 1 else 0.0
    std = float(np.sqrt(variance))
    vmin, vmax = float(acc[1]), float(acc[2])

    # Integer-wide bins from the smallest to the largest sample, as stempy does; the largest sample itself
    # falls outside the last bin, as in stempy.
    min_bin = int(np.floor(vmin))
    n_bins = max(int(np.ceil(vmax)) - min_bin, 1)
    hist = hist[min_bin - lo : min_bin - lo + n_bins].copy()
    # stempy's values are integers, so a bin's left edge is its value; float values (a float dark or a
    # gain) spread over the bin, whose centre is then the unbiased position.
    integral = bool(acc[3])
    centres = min_bin + np.arange(n_bins, dtype=np.float64) + (0.0 if integral else 0.5)
    mu, sigma = _fit_gaussian(centres, hist, mean, std)

    return ThresholdEstimate(
        background_threshold=float(mu + config.background_n_sigma * sigma),
        x_ray_threshold=float(mean + config.xray_n_sigma * std),
        number_of_samples=int(config.number_of_samples),
        min_sample=vmin,
        max_sample=vmax,
        mean=float(mean),
        variance=float(variance),
        std_dev=std,
        number_of_bins=int(n_bins),
        background_threshold_n_sigma=float(config.background_n_sigma),
        x_ray_threshold_n_sigma=float(config.xray_n_sigma),
        optimized_mean=float(mu),
        optimized_std_dev=float(sigma),
    )


def _fit_gaussian(x: np.ndarray, counts: np.ndarray, mean: float, std: float) -> tuple[float, float]:
    """Levenberg-Marquardt fit of a Gaussian to the histogram; returns (mu, |sigma|)."""
    if std <= 0 or counts.max() <= 0:
        raise ThresholdError("sampled frames are constant: cannot fit a noise distribution")
    # Restricting the fit to the populated core keeps it fast when x-rays stretch the range to 65535 bins.
    peak = float(x[np.argmax(counts)])
    window = (x >= peak - 50 * std) & (x <= peak + 50 * std)
    try:
        (_, mu, sigma), _ = curve_fit(
            _gaussian,
            x[window],
            counts[window],
            p0=(counts.max(), peak, max(std, 0.5)),
            method="lm",
            maxfev=2000,
        )
    except (RuntimeError, ValueError) as exc:
        raise ThresholdError(f"Gaussian fit of the background histogram did not converge: {exc}") from exc
    if not (np.isfinite(mu) and np.isfinite(sigma)) or sigma == 0:
        raise ThresholdError("Gaussian fit of the background histogram gave a degenerate result")
    return float(mu), float(abs(sigma))


def warm_up_estimation(config: ThresholdConfig, dark: np.ndarray | None, gain: np.ndarray | None) -> None:
    """Estimate thresholds once on synthetic frames: compiles (or loads from numba's cache) what estimation
    runs and imports the fit, so the first scan's thresholds take no longer than any later scan's."""
    rng = np.random.default_rng(0)
    base = np.zeros(FRAME_SHAPE) if dark is None else np.clip(np.round(dark), 0, 60000)
    frames = (base + rng.poisson(20.0, (2, *FRAME_SHAPE))).astype(np.uint16)
    small = ThresholdConfig(
        min(config.number_of_samples, 64), 2, config.background_n_sigma, config.xray_n_sigma, config.seed
    )
    with contextlib.suppress(ThresholdError):  # a fit of noise may fail; running the code is the point
        estimate_thresholds(frames, dark, small, gain)
