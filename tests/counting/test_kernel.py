"""The compiled kernel against plain numpy and pixel-by-pixel references, including adversarial frames."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from counting.geometry import FRAME_SHAPE
from counting.kernel import MAX_EVENTS_PER_FRAME, Counter, EventList, Thresholds
from stemstream_testing.reference import count_reference, count_reference_loop

H, W = FRAME_SHAPE


def assert_same(a: EventList, b: EventList) -> None:
    assert len(a) == len(b)
    for i in range(len(a)):
        np.testing.assert_array_equal(a[i], b[i], err_msg=f"frame {i}")


def noisy_frames(rng: np.random.Generator, n: int, dose: int = 150) -> tuple[np.ndarray, np.ndarray]:
    dark = (20 + rng.normal(0, 1.5, FRAME_SHAPE)).astype(np.float32)
    frames = dark + rng.normal(0, 2.4, (n, H, W))
    for f in frames:
        k = rng.poisson(dose)
        ys, xs = rng.integers(0, H, k), rng.integers(0, W, k)
        f[ys, xs] += rng.gamma(3, 30, k)
        f[np.clip(ys + 1, 0, H - 1), xs] += rng.gamma(2, 15, k)
    return np.clip(np.rint(frames), 0, 65535).astype(np.uint16), dark


@pytest.mark.parametrize("n,workers", [(1, 1), (7, 1), (13, 2), (5, 3), (3, 8)])
def test_kernel_matches_numpy_reference_on_noisy_frames(n, workers):
    rng = np.random.default_rng(n * 10 + workers)
    frames, dark = noisy_frames(rng, n)
    t = Thresholds(10.8, 400.0)
    got = Counter(dark, t).count(frames, workers=workers)
    assert_same(got, count_reference(frames, dark, t))
    assert got.indices.dtype == np.uint32
    assert 50 < got.counts.mean() < 400  # the data really has events


def test_kernel_matches_reference_with_gain_and_float_dark():
    rng = np.random.default_rng(3)
    frames, dark = noisy_frames(rng, 4)
    gain = rng.uniform(0.5, 2.0, FRAME_SHAPE)
    t = Thresholds(6.0, 250.0)
    assert_same(Counter(dark, t, gain).count(frames), count_reference(frames, dark, t, gain))


def test_numpy_reference_matches_pixel_loop_on_small_frames():
    rng = np.random.default_rng(1)
    t = Thresholds(3.0, 60.0)
    for _ in range(20):
        frame = rng.integers(0, 70, (9, 11)).astype(np.uint16)
        dark = rng.uniform(0, 4, (9, 11)).astype(np.float32)
        np.testing.assert_array_equal(
            count_reference(frame, dark, t)[0], count_reference_loop(frame, dark, t)
        )


coords = st.tuples(
    st.one_of(st.integers(0, 3), st.integers(H - 4, H - 1), st.integers(0, H - 1)),
    st.one_of(st.integers(0, 3), st.integers(W - 4, W - 1), st.integers(0, W - 1)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spots=st.lists(
        st.tuples(coords, st.sampled_from([0, 5, 10, 11, 12, 50, 50, 999, 1000, 1001, 5000, 65535])),
        max_size=80,
    ),
    base=st.sampled_from([0, 3, 10, 11]),
    plateau=st.booleans(),
)
def test_kernel_matches_reference_on_adversarial_frames(spots, base, plateau):
    """Edges, corners, ties, plateaus, x-rays next to electrons, values exactly at each threshold."""
    frame = np.full(FRAME_SHAPE, base, np.uint16)
    if plateau:
        frame[100:104, 200:210] = 50  # a flat-topped blob: no event anywhere on it
    for (y, x), v in spots:
        frame[y, x] = v
        if v == 50 and x + 1 < W:
            frame[y, x + 1] = 50  # horizontal tie
    t = Thresholds(10.0, 1000.0)
    got = Counter(None, t).count(frame)
    assert_same(got, count_reference(frame, None, t))


def test_threshold_bounds_are_strict_and_xray_neighbours_do_not_block():
    frame = np.zeros(FRAME_SHAPE, np.uint16)
    frame[10, 10] = 10  # == background: dropped
    frame[20, 20] = 11  # just above: kept
    frame[30, 30] = 1000  # == x-ray: dropped
    frame[40, 40] = 999  # just below: kept
    frame[50, 50], frame[50, 51] = 5000, 500  # x-ray beside an electron: the electron stays
    got = Counter(None, Thresholds(10, 1000)).count_frame(frame)
    assert got.tolist() == [20 * W + 20, 40 * W + 40, 50 * W + 51]


def test_corners_and_edges_are_events_and_ties_are_not():
    frame = np.zeros(FRAME_SHAPE, np.uint16)
    for y, x in [(0, 0), (0, W - 1), (H - 1, 0), (H - 1, W - 1), (0, 300)]:
        frame[y, x] = 100
    frame[200, 200] = frame[201, 201] = 80  # diagonal tie: neither
    got = Counter(None, Thresholds(5, 1000)).count_frame(frame)
    assert got.tolist() == [0, 300, W - 1, (H - 1) * W, H * W - 1]


def test_negative_dark_difference_never_wraps():
    frame = np.full(FRAME_SHAPE, 90, np.uint16)
    dark = np.full(FRAME_SHAPE, 100.7, np.float32)
    assert len(Counter(dark, Thresholds(0.5, 1e9)).count_frame(frame)) == 0


def test_empty_saturated_and_constant_frames_have_no_events():
    frames = np.stack([np.zeros(FRAME_SHAPE), np.full(FRAME_SHAPE, 65535), np.full(FRAME_SHAPE, 40)])
    got = Counter(None, Thresholds(10, 70000)).count(frames.astype(np.uint16))
    assert got.counts.tolist() == [0, 0, 0]


def test_densest_possible_frames_grow_the_output_buffer():
    """A checkerboard of maxima hits the theoretical limit; many of them force the buffer to grow."""
    frame = np.full(FRAME_SHAPE, 20, np.uint16)
    frame[::2, ::2] = 100
    frames = np.repeat(frame[None], 9, axis=0)
    got = Counter(None, Thresholds(5, 1000)).count(frames, workers=2)
    assert got.counts.tolist() == [MAX_EVENTS_PER_FRAME] * 9
    assert_same(got, count_reference(frames, None, Thresholds(5, 1000)))


@pytest.mark.parametrize(
    "frames,match",
    [
        (np.zeros((2, 576, 575), np.uint16), "576, 576"),
        (np.zeros((2, 576, 576), np.float32), "uint16"),
    ],
)
def test_bad_frames_are_rejected(frames, match):
    with pytest.raises(ValueError, match=match):
        Counter(None, Thresholds(5, 100)).count(frames)


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="above the background"):
        Thresholds(100, 10)
    with pytest.raises(ValueError, match="dark reference"):
        Counter(np.zeros((10, 10)), Thresholds(5, 100))
    with pytest.raises(ValueError, match="NaN"):
        Counter(np.full(FRAME_SHAPE, np.nan), Thresholds(5, 100))
    with pytest.raises(ValueError, match="positive"):
        Counter(None, Thresholds(5, 100), gain=np.zeros(FRAME_SHAPE))
