"""Tests of the simulated 4D Camera: determinism, detector statistics, ground truth, sample, iterators."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from counting.geometry import ALL_SECTORS, FRAME_COLS, FRAME_SHAPE, SECTOR_ROWS, FrameBatch, ScanShape
from counting.simulator import SimulatedCamera, SimulatorConfig, scan_seed
from counting.simulator.config import BEAM_CENTER, FLYBACK_SHIFT

SMALL = SimulatorConfig(scan=ScanShape(6, 5), pool_size=8)


def _sim(**changes) -> SimulatedCamera:
    return SimulatedCamera(dataclasses.replace(SMALL, **changes))


def _frames(sim: SimulatedCamera, batch_size: int = 8) -> np.ndarray:
    return np.concatenate([b.frames.copy() for b in sim.iter_batches(batch_size)])


def _away_from_events(sim: SimulatedCamera, frame_number: int) -> np.ndarray:
    """Mask of pixels more than one pixel away from every electron and x-ray of the frame."""
    hit = np.zeros(FRAME_SHAPE, bool)
    for pix in (sim.ground_truth(frame_number), sim.xray_pixels(frame_number)):
        r, c = np.divmod(pix.astype(np.int64), FRAME_COLS)
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                hit[np.clip(r + dr, 0, 575), np.clip(c + dc, 0, 575)] = True
    return ~hit


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "changes",
    [
        {"frames_per_position": 0},
        {"frames_per_position": 1.5},
        {"dose": -1.0},
        {"dose": float("nan")},
        {"read_noise": -0.1},
        {"electron_adu": 0.0},
        {"charge_sigma": 0.0},
        {"disk_radius": 285.0},
        {"deflection": 250.0},
        {"scatter_max": 1.5},
        {"xray_rate": -0.5},
        {"seed": -1},
        {"pool_size": 0},
        {"pool_size": True},
        {"offset": "20"},
        {"flyback": 1},
        {"detector_seed": -2},
    ],
)
def test_config_rejects_bad_values(changes):
    with pytest.raises(ValueError):
        dataclasses.replace(SMALL, **changes)


def test_bad_arguments_raise_value_error():
    sim = _sim()
    first = SMALL.frame_number_start
    with pytest.raises(ValueError):
        sim.ground_truth(first - 1)
    with pytest.raises(ValueError):
        sim.frame(first + sim.total_frames)
    with pytest.raises(ValueError):
        next(sim.iter_batches(0))
    with pytest.raises(ValueError):
        next(sim.iter_sectors(module=4))
    with pytest.raises(ValueError):
        sim.dark_frames(0)
    with pytest.raises(ValueError):
        SimulatedCamera(ScanShape(2, 2))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_frames_and_truth():
    a, b = _sim(), _sim()
    assert np.array_equal(_frames(a), _frames(b))
    assert np.array_equal(a.dark(), b.dark())
    assert np.array_equal(a.dark_frames(3), b.dark_frames(3))
    assert np.array_equal(a.sample_image(), b.sample_image())
    for fn in a.frame_numbers:
        assert np.array_equal(a.ground_truth(fn), b.ground_truth(fn))
        assert np.array_equal(a.xray_pixels(fn), b.xray_pixels(fn))


def test_different_seed_gives_different_data():
    a, b = _sim(), _sim(seed=1)
    assert not np.array_equal(_frames(a), _frames(b))
    assert not np.array_equal(a.dark(), b.dark())
    assert not np.array_equal(a.sample_image(), b.sample_image())
    assert not np.array_equal(a.ground_truth(1), b.ground_truth(1))


def test_truth_does_not_depend_on_pool_size_or_iteration():
    a, b = _sim(pool_size=3), _sim(pool_size=16)
    for fn in a.frame_numbers:
        assert np.array_equal(a.ground_truth(fn), b.ground_truth(fn))
    # Frames are a function of the frame number only: any batch size, any order, random access all agree.
    ref = _frames(a, 8)
    assert np.array_equal(_frames(a, 5), ref)
    assert np.array_equal(_frames(a, 1), ref)
    for fn in (30, 2, 17, 1):
        assert np.array_equal(a.frame(fn), ref[fn - 1])


# ------------------------------------------------------------------------------------------- statistics
def test_background_matches_offset_and_read_noise():
    sim = _sim()
    dark = sim.dark()
    means, stds = [], []
    for fn in (1, 7, 20):
        frame = sim.frame(fn).astype(np.float64)
        quiet = _away_from_events(sim, fn)
        means.append(frame[quiet].mean())
        stds.append((frame - dark)[quiet].std())
    assert np.mean(means) == pytest.approx(SMALL.offset, abs=0.5)
    assert np.mean(stds) == pytest.approx(SMALL.read_noise, abs=0.3)
    assert dark.dtype == np.float32 and dark.shape == FRAME_SHAPE
    assert dark.std() == pytest.approx(SMALL.dark_variation, abs=0.1)


def test_dark_frames_average_to_dark():
    sim = _sim()
    frames = sim.dark_frames(200)
    assert frames.shape == (200, *FRAME_SHAPE) and frames.dtype == np.uint16
    rms = np.sqrt(np.mean((frames.mean(axis=0, dtype=np.float64) - sim.dark()) ** 2))
    assert rms < 0.3
    # Noise only: nothing like an electron.
    assert (frames[:20].astype(np.float64) - sim.dark()).max() < 8 * SMALL.read_noise


@pytest.mark.parametrize("dose", [200.0, 1000.0, 5.0])
def test_dose_is_mean_electrons_per_frame(dose):
    sim = SimulatedCamera(dataclasses.replace(SMALL, scan=ScanShape(20, 20), dose=dose))
    counts = np.array([len(sim.ground_truth(fn)) for fn in sim.frame_numbers])
    # Two electrons on one pixel are kept once, so the count runs slightly below the dose at high dose.
    assert counts.mean() == pytest.approx(dose, rel=0.05)


def test_zero_dose_frames_are_background_only():
    sim = _sim(dose=0.0, xray_rate=0.0)
    for fn in (1, 2):
        assert len(sim.ground_truth(fn)) == 0 and len(sim.xray_pixels(fn)) == 0
        assert (sim.frame(fn) - sim.dark()).max() < 8 * SMALL.read_noise


def test_ground_truth_is_sorted_unique_uint32_inside_the_frame():
    sim = _sim(dose=2000.0)
    for fn in (1, 2, 3):
        t = sim.ground_truth(fn)
        assert t.dtype == np.uint32
        assert np.all(np.diff(t.astype(np.int64)) > 0)
        r, c = np.divmod(t.astype(np.int64), FRAME_COLS)
        assert r.min() >= 1 and r.max() <= 574 and c.min() >= 1 and c.max() <= 574


def test_electrons_stand_out_of_the_noise():
    sim = _sim(xray_rate=0.0)
    dark = sim.dark()
    above, central_max, values = [], [], []
    for fn in sim.frame_numbers:
        d = sim.frame(fn).astype(np.float64) - dark
        t = sim.ground_truth(fn).astype(np.int64)
        r, c = np.divmod(t, FRAME_COLS)
        v = d[r, c]
        values.append(v)
        above.append(v > 10.0)
        neigh = np.stack([d[r + dr, c + dc] for dr in (-1, 0, 1) for dc in (-1, 0, 1)])
        central_max.append(v >= neigh.max(axis=0))
    values = np.concatenate(values)
    assert np.concatenate(above).mean() > 0.9
    # The charge cloud is centred in the true pixel, so it is usually, not always, the 3x3 maximum.
    assert 0.7 < np.concatenate(central_max).mean() < 1.0
    assert 20.0 < values.mean() < 80.0  # real electrons: tens to a few hundred ADU in total


def test_xray_hits_at_configured_rate():
    sim = SimulatedCamera(dataclasses.replace(SMALL, scan=ScanShape(100, 100), xray_rate=0.02))
    frames_hit = sum(len(sim.xray_pixels(fn)) > 0 for fn in sim.frame_numbers)
    expected = sim.total_frames * (1 - np.exp(-0.02))  # ~198
    assert abs(frames_hit - expected) < 4 * np.sqrt(expected)


def test_xray_pixels_are_thousands_of_adu_and_clipped_not_wrapped():
    sim = _sim(xray_rate=2.0, xray_adu=50000.0)
    dark = sim.dark()
    seen, brightest = 0, 0
    for fn in sim.frame_numbers:
        frame = sim.frame(fn)
        x = sim.xray_pixels(fn).astype(np.int64)
        r, c = np.divmod(x, FRAME_COLS)
        assert np.all(frame[r, c] - dark[r, c] > 1000)
        seen += len(x)
        brightest = max(brightest, int(frame.max()))
    assert seen > 0
    assert frame.dtype == np.uint16 and brightest == 65535  # 50000 * (0.5..1.5) saturates, never wraps


# ------------------------------------------------------------------------------------------- sample
def _beam_per_position(sim: SimulatedCamera) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ground-truth bright-field count, dark-field count and centre of mass per position, (h, w[, 2])."""
    bf, adf, com = [], [], []
    for fn in sim.frame_numbers:
        r, c = np.divmod(sim.ground_truth(fn).astype(np.float64), FRAME_COLS)
        rho2 = (r - BEAM_CENTER[0]) ** 2 + (c - BEAM_CENTER[1]) ** 2
        bf.append((rho2 < SMALL.disk_radius**2).sum())
        adf.append((rho2 > (SMALL.disk_radius + 15) ** 2).sum())
        # A circle wider than the largest deflection, so the CoM sees the whole shifted disk.
        disk = rho2 < (SMALL.disk_radius + SMALL.deflection + 2) ** 2
        com.append((r[disk].mean(), c[disk].mean()))
    shape = (sim.scan.height, sim.scan.width)
    return np.reshape(bf, shape), np.reshape(adf, shape), np.reshape(com, (*shape, 2))


@pytest.mark.parametrize("flyback", [True, False])
def test_sample_shows_in_bright_field_dark_field_and_centre_of_mass(flyback):
    # A higher dose than the default keeps the centre-of-mass noise of a 180 px disk below the deflection.
    sim = SimulatedCamera(dataclasses.replace(SMALL, scan=ScanShape(16, 16), dose=1000.0, flyback=flyback))
    bf, adf, com = _beam_per_position(sim)
    t = sim.sample_image()
    cols = 15 if flyback else 16  # the sample: every column but the flyback column
    assert t.shape == (16, cols) and sim.sample_width == cols and t.std() > 0.1
    expected = SMALL.scatter_min + (SMALL.scatter_max - SMALL.scatter_min) * t
    assert np.allclose(sim.scatter_fraction()[:, :cols], expected)
    assert np.corrcoef(bf[:, :cols].ravel(), t.ravel())[0, 1] < -0.8
    assert np.corrcoef(adf[:, :cols].ravel(), t.ravel())[0, 1] > 0.8
    shift = sim.disk_shift()
    assert shift.shape == (16, cols, 2)
    assert np.allclose(sim.disk_center()[:, :cols], np.add(BEAM_CENTER, shift))
    for axis in (0, 1):
        assert np.corrcoef(com[:, :cols, axis].ravel(), shift[..., axis].ravel())[0, 1] > 0.5


# ------------------------------------------------------------------------------------------- flyback
def _centroid_and_spread(sim: SimulatedCamera) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth electrons' distance of their mean from the beam centre, and their column spread, (h, w)."""
    shape = (sim.scan.height, sim.scan.width)
    distance, spread = np.zeros(shape), np.zeros(shape)
    for fn in sim.frame_numbers:
        y, x = divmod(sim.position_of(fn), sim.scan.width)
        r, c = np.divmod(sim.ground_truth(fn).astype(np.float64), FRAME_COLS)
        distance[y, x] = np.hypot(r.mean() - BEAM_CENTER[0], c.mean() - BEAM_CENTER[1])
        spread[y, x] = c.std()
    return distance, spread


def test_flyback_column_is_not_the_sample():
    """The last column of every row is the beam's flyback: a displaced, smeared disk, visibly not the
    sample (its disk is off the beam centre by three times the sample's largest deflection, and wider)."""
    sim = SimulatedCamera(dataclasses.replace(SMALL, scan=ScanShape(8, 6), dose=1000.0))
    assert SMALL.flyback and sim.flyback_column == 7 and sim.sample_width == 7
    assert sim.sample_image().shape == (6, 7) and sim.disk_shift().shape == (6, 7, 2)
    sample, flyback = (slice(None), slice(0, 7)), (slice(None), 7)
    distance, _ = _centroid_and_spread(sim)
    assert distance[sample].max() < SMALL.deflection + 5  # the sample deflects the disk by <= 20 px
    assert distance[flyback].min() > 2 * SMALL.deflection  # the flyback disk sits 62 px away
    assert np.allclose(sim.disk_center()[:, 7], np.add(BEAM_CENTER, FLYBACK_SHIFT))
    # The beam crosses its row during the flyback frame: the row's mean scattered fraction.
    assert np.allclose(sim.scatter_fraction()[:, 7], sim.scatter_fraction()[:, :7].mean(axis=1))
    # Smeared along the columns (seen best without the halo's electrons).
    unscattered = SimulatedCamera(dataclasses.replace(sim.config, scatter_min=0.0, scatter_max=0.0))
    _, spread = _centroid_and_spread(unscattered)
    assert spread[flyback].min() > spread[sample].max() + 2


def test_flyback_frames_stay_in_the_frame_and_keep_the_dose():
    sim = SimulatedCamera(dataclasses.replace(SMALL, scan=ScanShape(2, 40), dose=500.0, disk_radius=250.0))
    counts = []
    for fn in sim.frame_numbers:
        if sim.position_of(fn) % 2 == 1:
            t = sim.ground_truth(fn).astype(np.int64)
            r, c = np.divmod(t, FRAME_COLS)
            assert r.min() >= 1 and r.max() <= 574 and c.min() >= 1 and c.max() <= 574
            counts.append(len(t))
    assert np.mean(counts) == pytest.approx(500.0, rel=0.1)  # electrons off the detector are drawn again


def test_a_one_column_flyback_scan_is_all_flyback():
    # A session takes its dark from a 1x1 camera: that must still work.
    sim = _sim(scan=ScanShape(1, 3))
    assert sim.sample_image().shape == (3, 0) and sim.disk_shift().shape == (3, 0, 2)
    assert sim.flyback_column == 0 and len(sim.ground_truth(1)) > 0
    assert np.allclose(sim.scatter_fraction(), SMALL.scatter_min)


def test_without_flyback_the_sample_frames_are_the_flyback_configs_sample_frames_random_streams():
    # Only flyback frames draw the smear: switching flyback off changes no other frame's random stream, so
    # a sample position's electrons differ only by the sample itself (which is drawn on another grid).
    on, off = _sim(dose=0.0, xray_rate=2.0), _sim(dose=0.0, xray_rate=2.0, flyback=False)
    assert off.flyback_column is None and off.sample_image().shape == (5, 6)
    for fn in on.frame_numbers:
        assert np.array_equal(on.xray_pixels(fn), off.xray_pixels(fn))


# ------------------------------------------------------------------------------------------- seeds per scan
def test_scan_seed_is_deterministic_and_differs_per_scan():
    seeds = [scan_seed(5, n) for n in range(50)]
    assert seeds == [scan_seed(5, n) for n in range(50)]
    assert len(set(seeds)) == 50 and all(isinstance(s, int) and s >= 0 for s in seeds)
    assert scan_seed(6, 1) != scan_seed(5, 1)
    with pytest.raises(ValueError):
        scan_seed(5, -1)


def test_scans_of_a_session_differ_on_the_same_detector():
    base = dataclasses.replace(SMALL, seed=7)
    one, two, again = base.for_scan(1), base.for_scan(2), base.for_scan(1)
    assert one == again and one.seed == scan_seed(7, 1) and one.detector_seed == 7
    assert one.for_scan(3).detector_seed == 7  # the detector stays the session's
    a, b, ref = SimulatedCamera(one), SimulatedCamera(two), SimulatedCamera(base)
    assert not np.array_equal(_frames(a), _frames(b))
    assert not np.array_equal(a.sample_image(), b.sample_image())
    assert not np.array_equal(a.ground_truth(1), b.ground_truth(1))
    # One dark reference serves every scan: the dark pattern and dark frames are the base camera's.
    for cam in (a, b):
        assert np.array_equal(cam.dark(), ref.dark())
        assert np.array_equal(cam.dark_frames(2), ref.dark_frames(2))


# ------------------------------------------------------------------------------------------- iterators
def test_batches_have_consistent_identity_and_layout():
    sim = _sim(frames_per_position=3, frame_number_start=100)
    assert sim.total_frames == 90 and sim.frame_numbers == range(100, 190)
    batches = list(sim.iter_batches(7))
    assert [len(b) for b in batches] == [7] * 12 + [6]
    fns = np.concatenate([b.frame_numbers for b in batches])
    pos = np.concatenate([b.positions for b in batches])
    assert np.array_equal(fns, np.arange(100, 190))
    assert np.array_equal(pos, np.repeat(np.arange(30), 3))
    assert sim.position_of(189) == 29
    for b in batches:
        assert isinstance(b, FrameBatch)
        assert b.frames.flags.c_contiguous and b.frames.dtype == np.uint16
        assert np.all(b.sector_masks == ALL_SECTORS) and b.sector_masks.dtype == np.uint8
        assert b.frame_numbers.dtype == np.int64 and b.positions.dtype == np.int64
    frames = np.concatenate([b.frames for b in batches])
    # Consecutive frames differ, also at the same position.
    assert all(not np.array_equal(frames[k], frames[k + 1]) for k in range(len(frames) - 1))


def test_sectors_reassemble_to_the_batches():
    sim = _sim(frames_per_position=2)
    frames = _frames(sim, 8)
    seen = []
    for fn, pos, module, sector in sim.iter_sectors():
        assert sector.shape == (SECTOR_ROWS, 576) and sector.dtype == np.uint16 and sector.flags.c_contiguous
        i = fn - SMALL.frame_number_start
        assert pos == i // 2
        assert np.array_equal(sector, frames[i, module * SECTOR_ROWS : (module + 1) * SECTOR_ROWS])
        seen.append((fn, module))
    assert seen == [(fn, m) for fn in sim.frame_numbers for m in range(4)]
    only = list(sim.iter_sectors(module=2))
    assert [m for _, _, m, _ in only] == [2] * sim.total_frames


def test_batches_with_truth_match_ground_truth():
    sim = _sim()
    n = 0
    for batch, truth in sim.iter_batches_with_truth(6):
        assert len(truth) == len(batch)
        for fn, t in zip(batch.frame_numbers, truth, strict=True):
            assert np.array_equal(t, sim.ground_truth(int(fn)))
            n += 1
    assert n == sim.total_frames


def test_yielded_frames_never_change_and_are_read_only():
    # A consumer that keeps batches (threshold estimation does) must never see them overwritten.
    sim = _sim(pool_size=4)
    kept_batches = list(sim.iter_batches(3))
    kept_sectors = [s for _, _, _, s in sim.iter_sectors(batch_size=2)]
    kept_frame = next(sim.iter_batches(4)).frames[1]
    for _ in sim.iter_batches(4):  # reuse the ring many times over
        pass
    for b in kept_batches:
        for fn, f in zip(b.frame_numbers, b.frames, strict=True):
            assert np.array_equal(f, sim.frame(int(fn)))
    reassembled = np.stack(kept_sectors).reshape(sim.total_frames, *FRAME_SHAPE)
    assert np.array_equal(reassembled, np.concatenate([b.frames for b in kept_batches]))
    assert np.array_equal(kept_frame, sim.frame(2))
    frames = kept_batches[0].frames
    with pytest.raises(ValueError):
        frames[0, 0, 0] = 1
    with pytest.raises(ValueError):
        frames.flags.writeable = True
    single = sim.frame(1)
    single[:] = 0  # frame() returns the caller's own writable copy
    assert np.array_equal(sim.frame(1), kept_batches[0].frames[0])


def test_interleaved_iterators_do_not_corrupt_each_other():
    sim = _sim(pool_size=4)
    ref = _frames(_sim(pool_size=4), 4)
    a, b = sim.iter_batches(4), sim.iter_batches(2)
    got_a, got_b = [], []
    for _ in range(3):
        got_a.append(next(a).frames)
        got_b.append(next(b).frames)
    assert np.array_equal(np.concatenate(got_a), ref[:12])
    assert np.array_equal(np.concatenate(got_b), ref[:6])


def test_streaming_consumer_gets_zero_copy_views_of_the_ring():
    # The speed comes from rendering in place; a plain for-loop (which still holds the previous batch while
    # asking for the next) must not push the simulator onto its copying fallback when pool >= 2 * batch.
    sim = _sim(pool_size=8)
    for b in sim.iter_batches(4):
        assert isinstance(b.frames.base.base, memoryview)  # a view of the ring, not a fresh copy
    for batch_size in (3, 8):  # not dividing the pool / the pool's full size: ring grows, still zero-copy
        assert all(
            isinstance(b.frames.base.base, memoryview) for b in _sim(pool_size=8).iter_batches(batch_size)
        )
    for _, _, _, sector in sim.iter_sectors():
        assert isinstance(sector.base.base, memoryview)


def test_reserve_grows_the_ring_only_for_a_scan_that_wraps_it_and_then_never_mid_scan():
    small = SimulatedCamera(SimulatorConfig(ScanShape(4, 4), pool_size=32, seed=1))
    small.reserve(8)
    assert len(small._pool.ring) == 32  # 16 frames never wrap a 32-frame ring: nothing allocated
    big = SimulatedCamera(SimulatorConfig(ScanShape(12, 12), pool_size=32, seed=1))
    big.reserve(8)
    grown = len(big._pool.ring)
    assert grown > 32
    held = []
    for batch in big.iter_batches(8):
        held = [*held[-2:], batch]  # a reader keeping its last three batches
    assert len(big._pool.ring) == grown
