"""Threshold estimation: stempy's statistics exactly, deterministic sampling, clear failures."""

from __future__ import annotations

import numpy as np
import pytest

from counting.dark import dark_reference, load_dark
from counting.geometry import FRAME_SHAPE
from counting.thresholds import ThresholdConfig, ThresholdError, estimate_thresholds
from stemstream_testing.options import estimation


def frames_with_electrons(seed: int, n: int, offset: float = 20.0, noise: float = 2.4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    fr = np.rint(offset + rng.normal(0, noise, (n, *FRAME_SHAPE)))
    for f in fr:
        f[rng.integers(0, 576, 300), rng.integers(0, 576, 300)] += rng.gamma(3, 40, 300)
    return np.clip(fr, 0, 65535).astype(np.uint16)


@pytest.mark.parametrize("seed", [0, 1])
def test_statistics_match_stempy_calculate_thresholds(seed):
    """With one sample block every stempy sample is the same frame, so its result is deterministic."""
    from stempy import _image
    from stempy.io import PyReader

    frames = frames_with_electrons(seed, 2)
    block = next(PyReader(frames, np.arange(2, dtype=np.uint32), (2, 1), 1, 2))
    ref = _image.calculate_thresholds([block._block], np.zeros(FRAME_SHAPE, np.float32), 40, 4.5, 175.0)
    ours = estimate_thresholds(
        frames[:1],
        None,
        estimation(number_of_samples=40, sample_frames=1, background_n_sigma=4.5, xray_n_sigma=175.0),
    )
    for ours_key, ref_key in [
        ("min_sample", "min_sample"),
        ("max_sample", "max_sample"),
        ("mean", "mean"),
        ("variance", "variance"),
        ("std_dev", "std_dev"),
        ("number_of_bins", "number_of_bins"),
        ("optimized_mean", "optimized_mean"),
        ("optimized_std_dev", "optimized_std_dev"),
        ("background_threshold", "background_threshold"),
        ("x_ray_threshold", "xray_threshold"),
    ]:
        assert getattr(ours, ours_key) == pytest.approx(getattr(ref, ref_key), rel=1e-8), ours_key


def test_estimate_recovers_noise_and_is_deterministic():
    frames = frames_with_electrons(3, 25)
    dark = np.full(FRAME_SHAPE, 20.0, np.float32)
    cfg = estimation(number_of_samples=1200, sample_frames=20, seed=7)
    a = estimate_thresholds(frames, dark, cfg)
    assert a == estimate_thresholds(frames, dark, cfg)
    assert a.optimized_mean == pytest.approx(0.0, abs=0.1)
    assert a.optimized_std_dev == pytest.approx(2.4, abs=0.1)
    assert a.background_threshold == pytest.approx(a.optimized_mean + 4.5 * a.optimized_std_dev)
    assert a.x_ray_threshold == pytest.approx(a.mean + 175 * a.std_dev)
    other = estimate_thresholds(frames, dark, estimation(number_of_samples=1200, sample_frames=20, seed=8))
    assert other != a  # a different seed samples other frames
    assert a.metadata()["threshold_calculated"] is True


def test_float_dark_above_raw_does_not_wrap():
    """stempy wraps raw - dark in uint16 here and its x-ray threshold explodes; ours stays sane."""
    frames = frames_with_electrons(4, 3)
    dark = dark_reference(frames_with_electrons(5, 8)).astype(np.float32) + 0.5
    est = estimate_thresholds(frames, dark, estimation(number_of_samples=100, sample_frames=3))
    assert est.min_sample < 0 < est.background_threshold < 20
    assert est.x_ray_threshold < 5000


def test_gain_scales_values():
    frames = frames_with_electrons(6, 2)
    dark = np.full(FRAME_SHAPE, 20.0, np.float32)
    plain = estimate_thresholds(frames, dark, estimation(number_of_samples=50, sample_frames=2))
    halved = estimate_thresholds(
        frames, dark, estimation(number_of_samples=50, sample_frames=2), gain=np.full(FRAME_SHAPE, 2.0)
    )
    assert halved.optimized_std_dev == pytest.approx(plain.optimized_std_dev / 2, rel=0.05)


def test_constant_frames_fail_clearly():
    with pytest.raises(ThresholdError, match="constant"):
        estimate_thresholds(
            np.full((2, *FRAME_SHAPE), 20, np.uint16), None, estimation(number_of_samples=10, sample_frames=2)
        )
    with pytest.raises(ValueError, match="576"):
        estimate_thresholds(np.zeros((2, 10, 10), np.uint16), None, estimation())
    with pytest.raises(ValueError, match="at least 1"):
        ThresholdConfig(0, 20, 4.5, 175.0, 0)


def test_dark_reference_and_loading(tmp_path):
    frames = frames_with_electrons(9, 4)
    dark = dark_reference([frames[:3], frames[3]])
    np.testing.assert_allclose(dark, frames.mean(axis=0), rtol=1e-6)
    assert dark.dtype == np.float32
    np.save(tmp_path / "dark.npy", dark)
    np.testing.assert_array_equal(load_dark(str(tmp_path / "dark.npy")), dark)
    np.save(tmp_path / "bad.npy", np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"bad.npy has shape \(3, 3\)"):
        load_dark(str(tmp_path / "bad.npy"))
    (tmp_path / "junk.npy").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read dark reference"):
        load_dark(str(tmp_path / "junk.npy"))
    with pytest.raises(ValueError, match="no dark frames"):
        dark_reference([])
