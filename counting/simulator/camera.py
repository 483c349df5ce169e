"""A seeded, fast simulated 4D Camera: a probe scanned over a sample with structure, real detector statistics.

Each frame is a noise background (offset + fixed pattern + Gaussian read noise) plus Poisson(dose) electrons,
each a gamma-distributed charge (mean ~200 ADU) spread as a pixel-integrated Gaussian over the 3x3 pixels around
a random sub-pixel position, plus rare x-ray hits of thousands of ADU. Unscattered electrons fall uniformly in the
bright-field disk, which the sample's thickness gradient deflects (so CoM/DPC shows the sample); a
thickness-dependent fraction is scattered into a halo outside it (so virtual BF shows the sample and ADF its
inverse). With flyback (the default, as the real camera), the last column of every scan row is the frame
recorded while the beam flies back: a displaced, smeared disk, not the sample; the sample ground truth
(sample_image, disk_shift, scatter_fraction) covers the other columns. Every frame's true electron pixels and
x-ray pixels are kept as ground truth.

Where the parts live: the config (counting.simulator.config), the sample and the lookup tables
(counting.simulator.model), the compiled per-frame physics (counting.simulator.kernels) and the frame memory
(counting.frame_pool). This module is the camera: seeds, ground truth, and the iterators.

Speed: backgrounds come from a pre-generated pool of ``pool_size`` noise frames (frame i uses background
i mod pool_size) and only the electrons are drawn per frame, deposited in place into a FramePool slot holding
that background. Batches are read-only zero-copy views of the pool's ring; a yielded batch never changes (the
pool lends slots until nothing references the batch; see counting.frame_pool). Frame content depends only on
the config and the frame number (not on batch size or iteration order). A plain for-loop stays zero-copy when
pool_size >= 2 * batch_size (the default 128 / 64).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np

from counting.frame_pool import FramePool
from counting.geometry import ALL_SECTORS, FRAME_SHAPE, N_SECTORS, SECTOR_ROWS, FrameBatch, ScanShape
from counting.simulator.config import SimulatorConfig, check_int, scan_seed
from counting.simulator.kernels import frame_truth, log_capacity, new_scratch, render_batch, truth_batch
from counting.simulator.model import FRAME_PIXELS, dark_pattern, event_model, noise_frame, specimen

__all__ = ["SimulatedCamera", "SimulatorConfig", "scan_seed"]

_DEFAULT_SECTOR_BATCH = 64


class SimulatedCamera:
    """A deterministic simulated 4D Camera scan; see the module docstring for the physics and the speed trick.

    Thread-safe (rendering takes a lock), but a single instance renders on one core; use one instance per
    sender thread for parallel production.
    """

    def __init__(self, config: SimulatorConfig):
        if not isinstance(config, SimulatorConfig):
            raise ValueError(f"config must be a SimulatorConfig, got {type(config).__name__}")
        self.config = config
        c = config
        seeds = np.random.SeedSequence(c.seed).spawn(5)
        # The detector (dark pattern, dark frames) draws from the dark seed's own sequence at the same
        # places; with no detector_seed that is this one, as it always was.
        detector = np.random.SeedSequence(c.dark_seed).spawn(5)
        self._dark_frames_seed = detector[3]
        key = np.uint64(seeds[4].generate_state(1, np.uint64)[0])
        self._specimen = specimen(c, np.random.default_rng(seeds[0]))
        self._dark = dark_pattern(c, np.random.default_rng(detector[1]))
        events = event_model(c, self._specimen, key)
        self._model, self._footprint = events.model, events.footprint
        self._max_e, self._max_xpix = events.max_electrons, events.max_xray_pixels
        self._scratch = new_scratch(self._max_e, self._max_xpix)

        self._lock = threading.RLock()
        rng = np.random.default_rng(seeds[2])
        backgrounds = np.empty((c.pool_size, FRAME_PIXELS), np.uint16)
        for q in range(c.pool_size):
            backgrounds[q] = noise_frame(self._dark, c.read_noise, rng)
        self._pool = FramePool(backgrounds, log_capacity(self._max_e, self._max_xpix))

    # --------------------------------------------------------------------------------------- properties
    @property
    def scan(self) -> ScanShape:
        """The scan shape."""
        return self.config.scan

    @property
    def total_frames(self) -> int:
        """Frames in the whole scan (positions * frames_per_position)."""
        return self.config.total_frames

    @property
    def frame_numbers(self) -> range:
        """Detector frame numbers of the scan, in order."""
        start = self.config.frame_number_start
        return range(start, start + self.total_frames)

    def position_of(self, frame_number: int) -> int:
        """Scan position (y*width + x) of a frame number."""
        return self._index(frame_number) // self.config.frames_per_position

    @property
    def flyback_column(self) -> int | None:
        """The scan column (x) recorded during the beam's flyback, the last one; None without flyback."""
        return self.scan.width - 1 if self.config.flyback else None

    @property
    def sample_width(self) -> int:
        """Scan columns on the sample (the ground-truth images' width): the width less the flyback column."""
        return self.config.sample_width

    # --------------------------------------------------------------------------------------- ground truth
    def sample_image(self) -> np.ndarray:
        """Ground-truth sample thickness in [0, 1) at each sample position, shape (scan height, sample_width):
        the scan without its flyback column, as an analysis that drops it sees the sample."""
        return self._specimen.thickness.copy()

    def disk_shift(self) -> np.ndarray:
        """Bright-field disk deflection (d_row, d_col) in detector pixels by the sample, shape
        (scan height, sample_width, 2)."""
        return self._specimen.shift.copy()

    def scatter_fraction(self) -> np.ndarray:
        """Fraction of electrons scattered out of the bright-field disk at each scan position, shape
        (scan height, scan width): the flyback column (if any) included, with its row's mean."""
        return self._specimen.scatter.reshape(self.scan.height, self.scan.width).copy()

    def disk_center(self) -> np.ndarray:
        """Bright-field disk centre (row, col) in detector pixels at each scan position, shape
        (scan height, scan width, 2); in the flyback column the centre of the smear."""
        return self._specimen.centers.reshape(self.scan.height, self.scan.width, 2).copy()

    def dark(self) -> np.ndarray:
        """True mean raw value of each pixel without beam (offset + fixed pattern), float32 (576, 576)."""
        return self._dark.copy()

    def dark_frames(self, n: int) -> np.ndarray:
        """The first n dark frames (noise only, no electrons or x-rays) of this camera, (n, 576, 576) uint16."""
        check_int("n", n, 1)
        out = np.empty((n, *FRAME_SHAPE), np.uint16)
        for k, frame in enumerate(self.iter_dark_frames(n)):
            out[k] = frame
        return out

    def iter_dark_frames(self, n: int) -> Iterator[np.ndarray]:
        """The same n dark frames one at a time, as (576, 576) uint16 (memory: one frame)."""
        check_int("n", n, 1)
        rng = np.random.default_rng(self._dark_frames_seed)
        for _ in range(n):
            yield noise_frame(self._dark, self.config.read_noise, rng).reshape(FRAME_SHAPE)

    def ground_truth(self, frame_number: int) -> np.ndarray:
        """True electron pixels (row*576+col) of a frame: sorted unique uint32 (x-rays not included)."""
        return self._truth(frame_number)[0]

    def xray_pixels(self, frame_number: int) -> np.ndarray:
        """Pixels hit by x-rays in a frame: sorted unique uint32."""
        return self._truth(frame_number)[1]

    # --------------------------------------------------------------------------------------- frames
    def frame(self, frame_number: int) -> np.ndarray:
        """One frame as a new writable (576, 576) uint16 array, identical to what the iterators yield."""
        i = self._index(frame_number)
        with self._lock:
            out, _ = self._render(i, 1, want_truth=False, force_copy=True)
        out.flags.writeable = True
        return out.reshape(FRAME_SHAPE)

    def iter_batches(self, batch_size: int = 64) -> Iterator[FrameBatch]:
        """The whole scan as read-only FrameBatches of batch_size frames (the last may be shorter)."""
        yield from self._iter(batch_size, want_truth=False, pair=False)

    def iter_batches_with_truth(self, batch_size: int = 64) -> Iterator[tuple[FrameBatch, list[np.ndarray]]]:
        """Like iter_batches, with each frame's ground-truth electron pixels."""
        yield from self._iter(batch_size, want_truth=True, pair=True)

    def iter_counted(self, batch_size: int = 256) -> Iterator[tuple[np.ndarray, ...]]:
        """The scan as counted batches without rendering frames (a fast path for tests): (positions int64,
        sector masks uint8, offsets int64, indices uint32), each frame's true electron pixels as its events,
        the batch format counting.live_images takes (counting finds these electrons, less merged neighbours)."""
        check_int("batch_size", batch_size, 1)
        fpp, total = self.config.frames_per_position, self.total_frames
        for i0 in range(0, total, batch_size):
            n = min(batch_size, total - i0)
            out = np.empty(n * max(self._max_e, 1), np.uint32)
            offsets = np.zeros(n + 1, np.int64)
            with self._lock:
                truth_batch(i0, n, self._model, self._scratch, out, offsets)
            positions = np.arange(i0, i0 + n, dtype=np.int64) // fpp
            yield positions, np.full(n, ALL_SECTORS, np.uint8), offsets, out[: offsets[-1]].copy()

    def reserve(self, batch_size: int = 64) -> None:
        """Allocate (and compile) now what rendering batches of batch_size frames needs, so that the time
        goes before a scan rather than into its first batches (a sender calls it before its clock starts)."""
        check_int("batch_size", batch_size, 1)
        if self.total_frames <= self.config.pool_size:
            return  # the ring never wraps in such a scan, so it never grows
        with self._lock:
            self._pool.reserve(batch_size)

    def iter_sectors(
        self, module: int | None = None, batch_size: int | None = None
    ) -> Iterator[tuple[int, int, int, np.ndarray]]:
        """(frame_number, position, module, sector) per sector, frame by frame; sector is a read-only
        zero-copy (144, 576) uint16 view (v5 layout: module m holds rows m*144..m*144+143).
        ``module`` restricts to one module's sectors, as one sender per module would send them;
        ``batch_size`` is the internal rendering batch (default: up to 64, at most half the pool)."""
        if batch_size is None:
            batch_size = max(1, min(_DEFAULT_SECTOR_BATCH, self.config.pool_size // 2))
        if module is not None and (
            isinstance(module, bool)
            or not isinstance(module, int | np.integer)
            or not 0 <= module < N_SECTORS
        ):
            raise ValueError(f"module must be None or 0..{N_SECTORS - 1}, got {module!r}")
        modules = range(N_SECTORS) if module is None else (int(module),)
        for batch in self._iter(batch_size, want_truth=False, pair=False):
            frames = batch.frames
            fns = batch.frame_numbers.tolist()
            pos = batch.positions.tolist()
            for k in range(len(fns)):
                for m in modules:
                    yield fns[k], pos[k], m, frames[k, m * SECTOR_ROWS : (m + 1) * SECTOR_ROWS]
            del frames, batch

    # --------------------------------------------------------------------------------------- internals
    def _index(self, frame_number: int) -> int:
        i = int(frame_number) - self.config.frame_number_start
        if not 0 <= i < self.total_frames:
            raise ValueError(f"frame number {frame_number} is outside {self.frame_numbers}")
        return i

    def _truth(self, frame_number: int) -> tuple[np.ndarray, np.ndarray]:
        i = self._index(frame_number)
        e_out = np.empty(max(self._max_e, 1), np.uint32)
        x_out = np.empty(max(self._max_xpix, 1), np.uint32)
        with self._lock:
            ne, nx = frame_truth(i, self._model, self._scratch, e_out, x_out)
        return e_out[:ne].copy(), x_out[:nx].copy()

    def _render(self, i0: int, n: int, want_truth: bool, force_copy: bool = False):
        """Frames i0..i0+n-1 as a read-only (n, 576*576) array, plus truth (flat, offsets) if wanted."""
        pool = self._pool
        slot0 = None if force_copy else pool.claim(i0, n)
        in_place = slot0 is not None
        if not in_place:
            slot0 = pool.slots_for(i0, n)  # copy these slots' backgrounds into fresh memory
        truth = np.empty(n * max(self._max_e, 1) if want_truth else 1, np.uint32)
        offsets = np.zeros(n + 1, np.int64)
        dst = pool.ring[:1] if in_place else np.empty((n, FRAME_PIXELS), np.uint16)
        render_batch(dst, pool.ring, slot0, i0, n, in_place, pool.log_idx, pool.log_val, pool.log_n,
                     self._model, self._footprint, self._scratch, want_truth, truth, offsets)  # fmt: skip
        if in_place:
            frames = pool.publish(slot0, n)
        else:
            frames = dst
            frames.flags.writeable = False
        return frames, ((truth, offsets) if want_truth else None)

    def _iter(self, batch_size: int, want_truth: bool, pair: bool) -> Iterator:
        """Yield FrameBatch (pair=False) or (FrameBatch, truth list or None) per batch_size frames."""
        check_int("batch_size", batch_size, 1)
        c = self.config
        total = self.total_frames
        for i0 in range(0, total, batch_size):
            n = min(batch_size, total - i0)
            with self._lock:
                frames, truth = self._render(i0, n, want_truth)
            idx = np.arange(i0, i0 + n, dtype=np.int64)
            batch = FrameBatch(
                frames=frames.reshape(n, *FRAME_SHAPE),
                frame_numbers=idx + c.frame_number_start,
                positions=idx // c.frames_per_position,
                sector_masks=np.full(n, ALL_SECTORS, np.uint8),
            )
            del frames
            if not pair:
                yield batch
            else:
                truths = None
                if truth is not None:
                    flat, offsets = truth
                    truths = [flat[offsets[k] : offsets[k + 1]] for k in range(n)]
                yield batch, truths
            # Drop our own reference so the ring slots can be reused as soon as the consumer lets go.
            del batch
