"""The parallax bins and accumulator: labels over the BF disk, counts equal to a plain numpy recount (in
any batch order, before and after the bins are settled), lossless widening, bounded memory, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from counting.phase.accumulate import ParallaxAccumulator, ParallaxSnapshot
from counting.phase.bins import ParallaxBins
from tests.counting.phase.conftest import GEOMETRY


def test_bins_cover_the_inner_disk_and_keep_only_bins_with_pixels():
    bins = ParallaxBins.from_geometry(GEOMETRY, 8)
    assert bins.count == 60  # the four corner squares miss the disk
    assert bins.labels.dtype == np.uint16 and bins.labels.max() == 60
    row, col = np.divmod(np.arange(576 * 576), 576)
    d = np.hypot(row - GEOMETRY.cy, col - GEOMETRY.cx)
    assert ((bins.labels > 0) == (d <= 0.85 * GEOMETRY.bf_radius)).all()
    assert bins.pixels.sum() == (bins.labels > 0).sum()
    np.testing.assert_allclose(bins.k.mean(axis=0), 0.0, atol=1.0)  # symmetric about the centre
    assert np.abs(bins.k).max() < 0.85 * GEOMETRY.bf_radius
    for bad in (0, 33, 2.5, True):
        with pytest.raises(ValueError):
            ParallaxBins.from_geometry(GEOMETRY, bad)


def _batches(rng, positions: int, frames: int, size: int):
    """Random counted batches (live_images' format) with events all over the frame."""
    order = rng.permutation(np.repeat(np.arange(positions), frames))
    for a in range(0, len(order), size):
        pos = order[a : a + size]
        n_ev = rng.poisson(300, len(pos))
        offsets = np.concatenate([[0], np.cumsum(n_ev)]).astype(np.int64)
        centre = 288 * 576 + 288
        near = centre + rng.integers(-160, 160, offsets[-1]) * 576 + rng.integers(-160, 160, offsets[-1])
        indices = np.where(rng.random(offsets[-1]) < 0.8, near, rng.integers(0, 576 * 576, offsets[-1]))
        yield pos, np.full(len(pos), 15, np.uint8), offsets, indices.astype(np.uint32)


def _recount(batches, bins: ParallaxBins, positions: int) -> tuple[np.ndarray, np.ndarray]:
    counts = np.zeros((positions, bins.count), np.int64)
    frames = np.zeros(positions, np.int64)
    for pos, _, offsets, indices in batches:
        frames += np.bincount(pos, minlength=positions)
        lab = bins.labels[indices].astype(np.int64)
        p = np.repeat(pos, np.diff(offsets))
        np.add.at(counts, (p[lab > 0], lab[lab > 0] - 1), 1)
    return counts, frames


def test_accumulator_equals_a_numpy_recount_in_any_order_and_before_the_bins():
    rng = np.random.default_rng(7)
    bins = ParallaxBins.from_geometry(GEOMETRY, 6)
    batches = list(_batches(rng, 9 * 7, 3, 20))
    want_counts, want_frames = _recount(batches, bins, 63)
    early = ParallaxAccumulator(7, 9)
    for b in batches[:4]:
        early.add(*b)
    with pytest.raises(ValueError):
        early.snapshot()  # no bins yet
    early.settle(bins)
    for b in batches[4:]:
        early.add(*b)
    direct = ParallaxAccumulator(7, 9, bins)
    for b in reversed(batches):
        direct.add(*b)
    for acc in (early, direct):
        snap = acc.snapshot()
        np.testing.assert_array_equal(snap.counts, want_counts)
        np.testing.assert_array_equal(snap.frames, want_frames)
        assert snap.counts.dtype == np.uint16 and acc.events == sum(len(b[3]) for b in batches)
    halves = ParallaxAccumulator(7, 9, bins), ParallaxAccumulator(7, 9, bins)
    for i, b in enumerate(batches):
        halves[i % 2].add(*b)
    total = halves[0].snapshot() + halves[1].snapshot()  # two nodes' sums of one scan
    np.testing.assert_array_equal(total.counts, want_counts)


def test_snapshot_is_a_copy():
    bins = ParallaxBins.from_geometry(GEOMETRY, 4)
    acc = ParallaxAccumulator(2, 2, bins)
    hit = np.array([288 * 576 + 288], np.uint32)
    acc.add(np.array([1]), np.array([15], np.uint8), np.array([0, 1]), hit)
    snap = acc.snapshot()
    acc.add(np.array([1]), np.array([15], np.uint8), np.array([0, 1]), hit)
    assert snap.counts.sum() == 1 and acc.snapshot().counts.sum() == 2
    assert isinstance(snap, ParallaxSnapshot) and snap.seen().tolist() == [[False, True], [False, False]]


def test_counts_widen_instead_of_overflowing():
    bins = ParallaxBins.from_geometry(GEOMETRY, 2)
    acc = ParallaxAccumulator(1, 2, bins)
    hit = 288 * 576 + 250  # one pixel of one bin
    for _ in range(3):  # 3 x 30,000 electrons at one position, one bin: past uint16
        acc.add(np.array([1]), np.array([15], np.uint8), np.array([0, 30000]), np.full(30000, hit, np.uint32))
    snap = acc.snapshot()
    assert snap.counts.dtype == np.uint32 and snap.counts.max() == 90000 and snap.counts.sum() == 90000


def test_memory_at_512x512_is_the_stated_figure():
    acc = ParallaxAccumulator(512, 512, ParallaxBins.from_geometry(GEOMETRY))
    assert acc.counts.nbytes == 31_457_280  # 512 * 512 positions * 60 bins * 2 B (accumulate's docstring)
    assert acc.nbytes == 31_457_280 + 512 * 512 * 4
    n = 1024  # a large batch of single frames (200 e each) stays within uint16: no widening
    hits = np.full(n * 200, 288 * 576 + 288, np.uint32)
    acc.add(np.arange(n), np.full(n, 15, np.uint8), np.arange(0, n * 200 + 1, 200), hits)
    assert acc.counts.dtype == np.uint16 and acc.nbytes == 31_457_280 + 512 * 512 * 4


@pytest.mark.parametrize(
    "positions, offsets, indices",
    [
        ([0], [0, 1, 2], [5]),  # one offset too many
        ([4], [0, 1], [5]),  # position beyond the 2x2 scan
        ([-1], [0, 1], [5]),
        ([0], [0, 1], [576 * 576]),  # pixel beyond the frame
        ([0], [1, 1], [5]),  # offsets not from 0
        ([0, 1], [0, 2, 1], [5]),  # falling offsets
    ],
)
def test_bad_batches_are_refused_before_counting(positions, offsets, indices):
    acc = ParallaxAccumulator(2, 2, ParallaxBins.from_geometry(GEOMETRY, 4))
    with pytest.raises(ValueError):
        acc.add(
            np.array(positions), np.full(len(positions), 15, np.uint8), np.array(offsets), np.array(indices)
        )
    assert acc.snapshot().counts.sum() == 0 and acc.frames.sum() == 0
