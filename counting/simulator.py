"""A seeded, fast simulated 4D Camera: a probe scanned over a sample with structure, real detector statistics.

Each frame is a noise background (offset + fixed pattern + Gaussian read noise) plus Poisson(dose) electrons,
each a gamma-distributed charge (mean ~200 ADU) spread as a pixel-integrated Gaussian over the 3x3 pixels around
a random sub-pixel position, plus rare x-ray hits of thousands of ADU. Unscattered electrons fall uniformly in the
bright-field disk, which the sample's thickness gradient deflects (so CoM/DPC shows the sample); a
thickness-dependent fraction is scattered into a halo outside it (so virtual BF shows the sample and ADF its
inverse). Every frame's true electron pixels and x-ray pixels are kept as ground truth.

Speed: writing a fresh 663 kB frame costs more memory bandwidth than 50 k frames/s allows, so backgrounds come
from a pre-generated pool of ``pool_size`` noise frames (frame i uses background i mod pool_size) and only the
electrons are drawn per frame, deposited in place into a ring slot holding that background, with an undo log.
Batches are read-only zero-copy views of the ring. A slot is reused only when nothing references the batch that
last used it (checked through a per-batch root array's reference count); when a consumer keeps batches, the ring
grows once to about three batches beyond the pool, and after that a held slot makes the next batch render into a
fresh array. So a yielded batch never changes; keeping batches costs memory or a copy, never correctness. Frame
content depends only on the config and the frame number (not on batch size or iteration order). Before any
growth, a plain for-loop stays zero-copy when pool_size >= 2 * batch_size (the default 128 / 64).
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numba as nb
import numpy as np
from scipy import special

from counting.geometry import (
    ALL_SECTORS,
    FRAME_COLS,
    FRAME_ROWS,
    FRAME_SHAPE,
    N_SECTORS,
    SECTOR_ROWS,
    FrameBatch,
    ScanShape,
)

BEAM_CENTER = (288.0, 288.0)  # (row, col) of the undeflected bright-field disk centre
_FRAME_PIXELS = FRAME_ROWS * FRAME_COLS
_UINT16_MAX = 65535
_TABLE_SIZE = 4096  # quantile tables for charge and halo radius (linearly interpolated)
_SUBPIXEL_BINS = 64  # footprint table resolution per axis
_TAIL = 1e-15  # Poisson tables stop where the upper tail is this small
_DEFAULT_SECTOR_BATCH = 64

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_INV_2_53 = 1.0 / 9007199254740992.0


@dataclass(frozen=True)
class SimulatorConfig:
    """Everything that defines a simulated scan; equal configs give identical frames and ground truth."""

    scan: ScanShape
    frames_per_position: int = 1
    dose: float = 200.0  # mean electrons per frame (Poisson)
    offset: float = 20.0  # mean dark level, ADU
    read_noise: float = 2.4  # per-frame Gaussian noise std, ADU
    dark_variation: float = 1.5  # std of the per-pixel fixed offset pattern, ADU
    electron_adu: float = 200.0  # mean total charge one electron deposits, ADU
    electron_adu_shape: float = 6.0  # gamma shape of that charge (std = mean / sqrt(shape))
    charge_sigma: float = 0.5  # Gaussian width of the charge cloud, pixels
    disk_radius: float = 180.0  # bright-field disk radius, pixels
    halo_width: float = 80.0  # scale of the scattered electrons' distance beyond the disk edge, pixels
    scatter_min: float = 0.05  # fraction scattered out of the disk at zero thickness
    scatter_max: float = 0.6  # ... and at thickness 1
    deflection: float = 20.0  # largest bright-field disk shift over the scan, pixels (about 10 % of the disk)
    particles: int = 8  # Gaussian "particles" on a thin support film
    xray_rate: float = 0.02  # mean x-ray hits per frame (Poisson)
    xray_adu: float = 5000.0  # mean ADU per x-ray pixel (uniform 0.5x..1.5x)
    xray_2x2_fraction: float = 0.25  # fraction of x-ray hits that cover 2x2 pixels instead of one
    seed: int = 0
    frame_number_start: int = 1
    pool_size: int = 128  # distinct noise backgrounds (memory: pool_size * 663 kB, more if batches are kept)

    def __post_init__(self) -> None:
        if not isinstance(self.scan, ScanShape):
            raise ValueError(f"scan must be a ScanShape, got {type(self.scan).__name__}")
        _check_int("frames_per_position", self.frames_per_position, 1)
        _check_int("particles", self.particles, 0)
        _check_int("seed", self.seed, 0)
        _check_int("frame_number_start", self.frame_number_start, 0)
        _check_int("pool_size", self.pool_size, 1)
        _check_range("dose", self.dose, 0.0, 20000.0)
        _check_range("offset", self.offset, 0.0, 60000.0)
        _check_range("read_noise", self.read_noise, 0.0, 1000.0)
        _check_range("dark_variation", self.dark_variation, 0.0, 1000.0)
        _check_range("electron_adu", self.electron_adu, 0.0, 60000.0, low_open=True)
        _check_range("electron_adu_shape", self.electron_adu_shape, 0.0, 1e6, low_open=True)
        _check_range("charge_sigma", self.charge_sigma, 0.0, 2.0, low_open=True)
        _check_range("disk_radius", self.disk_radius, 0.0, 280.0, low_open=True)
        _check_range("halo_width", self.halo_width, 0.0, 1000.0)
        _check_range("scatter_min", self.scatter_min, 0.0, 1.0)
        _check_range("scatter_max", self.scatter_max, 0.0, 1.0)
        _check_range("deflection", self.deflection, 0.0, 280.0)
        _check_range("xray_rate", self.xray_rate, 0.0, 100.0)
        _check_range("xray_adu", self.xray_adu, 0.0, 60000.0, low_open=True)
        _check_range("xray_2x2_fraction", self.xray_2x2_fraction, 0.0, 1.0)
        # The 3x3 footprint of every bright-field electron must stay inside the frame.
        reach = self.disk_radius + self.deflection + 2.0
        if BEAM_CENTER[0] - reach < 0 or BEAM_CENTER[0] + reach > FRAME_ROWS - 1:
            raise ValueError(
                f"disk_radius + deflection = {self.disk_radius + self.deflection} px does not fit in the frame"
            )

    @property
    def total_frames(self) -> int:
        """Frames in the whole scan."""
        return self.scan.positions * self.frames_per_position


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_range(name: str, value: object, low: float, high: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    bad_low = v <= low if low_open else v < low
    if not math.isfinite(v) or bad_low or v > high:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value!r}")


# ----------------------------------------------------------------------------------------------- numba core
@nb.njit(cache=True)
def _mix(z):
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@nb.njit(cache=True)
def _uniform(st):
    st[0] += _GOLDEN
    return (_mix(st[0]) >> np.uint64(11)) * _INV_2_53


@nb.njit(cache=True)
def _draw_count(cdf, u):
    lo = 0
    hi = cdf.shape[0] - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if cdf[mid] > u:
            hi = mid
        else:
            lo = mid + 1
    return lo


@nb.njit(cache=True)
def _quantile(table, u):
    x = u * table.shape[0] - 0.5
    if x <= 0.0:
        return table[0]
    j = int(x)
    if j >= table.shape[0] - 1:
        return table[table.shape[0] - 1]
    f = x - j
    return table[j] * (1.0 - f) + table[j + 1] * f


@nb.njit(cache=True)
def _gen_events(i, model, scratch):
    """Draw frame i's electrons and x-ray pixels into the scratch arrays; returns (electrons, x-ray pixels)."""
    key, fpp, centers, scatter, radius, halo, e_cdf, x_cdf, charge_tab, halo_tab, xray_adu, xray_2x2 = model
    st, e_pix, e_qy, e_qx, e_charge, x_pix, x_val = scratch
    st[0] = _mix(key ^ _mix(np.uint64(i) + _GOLDEN))
    p = i // fpp
    cy = centers[p, 0]
    cx = centers[p, 1]
    sc = scatter[p]
    nq = _SUBPIXEL_BINS
    ne = _draw_count(e_cdf, _uniform(st))
    for k in range(ne):
        if _uniform(st) < sc:
            while True:
                while True:
                    a = 2.0 * _uniform(st) - 1.0
                    b = 2.0 * _uniform(st) - 1.0
                    q = a * a + b * b
                    if 0.0 < q <= 1.0:
                        break
                rr = (radius + halo * _quantile(halo_tab, _uniform(st))) / math.sqrt(q)
                y = cy + rr * a
                x = cx + rr * b
                row = int(math.floor(y + 0.5))
                col = int(math.floor(x + 0.5))
                if 1 <= row <= FRAME_ROWS - 2 and 1 <= col <= FRAME_COLS - 2:
                    break
        else:
            while True:
                a = 2.0 * _uniform(st) - 1.0
                b = 2.0 * _uniform(st) - 1.0
                if a * a + b * b < 1.0:
                    break
            y = cy + radius * a
            x = cx + radius * b
            row = int(math.floor(y + 0.5))
            col = int(math.floor(x + 0.5))
        qy = int((y - row + 0.5) * nq)
        qx = int((x - col + 0.5) * nq)
        e_qy[k] = min(max(qy, 0), nq - 1)
        e_qx[k] = min(max(qx, 0), nq - 1)
        e_pix[k] = row * FRAME_COLS + col
        e_charge[k] = _quantile(charge_tab, _uniform(st))
    nxh = _draw_count(x_cdf, _uniform(st))
    m = 0
    for _ in range(nxh):
        row = min(int(_uniform(st) * FRAME_ROWS), FRAME_ROWS - 1)
        col = min(int(_uniform(st) * FRAME_COLS), FRAME_COLS - 1)
        big = _uniform(st) < xray_2x2 and row < FRAME_ROWS - 1 and col < FRAME_COLS - 1
        for dr in range(2 if big else 1):
            for dc in range(2 if big else 1):
                x_pix[m] = (row + dr) * FRAME_COLS + col + dc
                x_val[m] = xray_adu * (0.5 + _uniform(st))
                m += 1
    return ne, m


@nb.njit(cache=True)
def _deposit(frame, ne, e_pix, e_qy, e_qx, e_charge, footprint, nxp, x_pix, x_val, log_idx, log_val, do_log):
    """Add the drawn charge to a flat frame with uint16 saturation; log (index, old value) if asked.

    Returns the number of log entries and a checksum of the lines it touched first (callers store it so the
    compiler keeps those loads): independent loads of every touched cache line let the misses overlap instead
    of serialising behind the arithmetic, a third of the cost when the ring is larger than the cache."""
    touch = 0
    for k in range(ne):
        touch += frame[e_pix[k] - FRAME_COLS] + frame[e_pix[k]] + frame[e_pix[k] + FRAME_COLS]
    m = 0
    for k in range(ne):
        qx = e_qx[k]
        for a in range(3):
            wa = e_charge[k] * footprint[e_qy[k], a]
            start = e_pix[k] + (a - 1) * FRAME_COLS - 1
            for b in range(3):
                idx = start + b
                old = frame[idx]
                v = old + int(wa * footprint[qx, b] + 0.5)
                if do_log:
                    log_idx[m] = idx
                    log_val[m] = old
                    m += 1
                frame[idx] = min(v, _UINT16_MAX)
    for k in range(nxp):
        idx = x_pix[k]
        old = frame[idx]
        v = old + int(x_val[k] + 0.5)
        if do_log:
            log_idx[m] = idx
            log_val[m] = old
            m += 1
        frame[idx] = min(v, _UINT16_MAX)
    return m, touch


@nb.njit(cache=True)
def _restore(frame, log_idx, log_val, n):
    for k in range(n - 1, -1, -1):
        frame[log_idx[k]] = log_val[k]


@nb.njit(cache=True)
def _unique_sorted(values, n, out, start):
    """Write the sorted unique values[:n] to out[start:]; return how many."""
    s = np.sort(values[:n])
    u = 0
    for j in range(n):
        if j == 0 or s[j] != s[j - 1]:
            out[start + u] = s[j]
            u += 1
    return u


@nb.njit(cache=True)
def _render_batch(dst, ring, slot0, i0, n, in_place, log_idx, log_val, log_n, model, footprint, scratch,
                  want_truth, truth, offsets):  # fmt: skip
    """Render frames i0..i0+n-1 from ring slots slot0.. either in place (logged) or into dst (a copy)."""
    _, e_pix, e_qy, e_qx, e_charge, x_pix, x_val = scratch
    offsets[0] = 0
    for k in range(n):
        q = slot0 + k
        if in_place:
            frame = ring[q]
            _restore(frame, log_idx[q], log_val[q], log_n[q])
        else:
            frame = dst[k]
            frame[:] = ring[q]
            _restore(frame, log_idx[q], log_val[q], log_n[q])
        ne, nxp = _gen_events(i0 + k, model, scratch)
        m, touch = _deposit(frame, ne, e_pix, e_qy, e_qx, e_charge, footprint, nxp, x_pix, x_val, log_idx[q],
                            log_val[q], in_place)  # fmt: skip
        scratch[0][1] ^= np.uint64(touch)
        if in_place:
            log_n[q] = m
        u = _unique_sorted(e_pix, ne, truth, offsets[k]) if want_truth else 0
        offsets[k + 1] = offsets[k] + u


@nb.njit(cache=True)
def _frame_truth(i, model, scratch, e_out, x_out):
    ne, nxp = _gen_events(i, model, scratch)
    return _unique_sorted(scratch[1], ne, e_out, 0), _unique_sorted(scratch[5], nxp, x_out, 0)


# ----------------------------------------------------------------------------------------------- tables
def _poisson_cdf(mean: float) -> np.ndarray:
    """Cumulative Poisson(mean) probabilities up to a negligible tail; the last entry is exactly 1."""
    kmax = int(math.ceil(mean + 12.0 * math.sqrt(mean) + 30.0))
    k = np.arange(kmax + 1, dtype=np.float64)
    if mean == 0.0:
        pmf = (k == 0).astype(np.float64)
    else:
        pmf = np.exp(k * math.log(mean) - mean - special.gammaln(k + 1.0))
    cdf = np.cumsum(pmf)
    last = int(np.searchsorted(cdf, 1.0 - _TAIL)) + 1
    cdf = cdf[: min(last + 1, len(cdf))].copy()
    cdf[-1] = 1.0
    return cdf


def _footprint_table(sigma: float) -> np.ndarray:
    """(bins, 3) normalised pixel-integrated Gaussian weights of pixels -1, 0, +1 for sub-pixel offsets."""
    d = -0.5 + (np.arange(_SUBPIXEL_BINS) + 0.5) / _SUBPIXEL_BINS
    edges = np.array([-1.5, -0.5, 0.5, 1.5])
    cdf = special.ndtr((edges[None, :] - d[:, None]) / sigma)
    w = np.diff(cdf, axis=1)
    return w / w.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------------- simulator
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
        self._bg_seed, self._dark_frames_seed = seeds[2], seeds[3]
        self._key = np.uint64(seeds[4].generate_state(1, np.uint64)[0])

        self._sample, grad = _make_sample(c.scan, c.particles, np.random.default_rng(seeds[0]))
        gmax = float(np.sqrt((grad**2).sum(axis=-1)).max())
        self._shift = grad * (c.deflection / gmax) if gmax > 0 else np.zeros_like(grad)
        self._centers = (np.asarray(BEAM_CENTER) + self._shift).reshape(-1, 2)
        self._scatter = (c.scatter_min + (c.scatter_max - c.scatter_min) * self._sample).ravel()

        rng = np.random.default_rng(seeds[1])
        self._dark = (c.offset + c.dark_variation * rng.standard_normal(FRAME_SHAPE)).astype(np.float32)

        self._e_cdf = _poisson_cdf(c.dose)
        self._x_cdf = _poisson_cdf(c.xray_rate)
        p = (np.arange(_TABLE_SIZE) + 0.5) / _TABLE_SIZE
        scale = c.electron_adu / c.electron_adu_shape
        self._charge_tab = special.gammaincinv(c.electron_adu_shape, p) * scale
        self._halo_tab = special.ndtri(0.5 + 0.5 * p)
        self._footprint = _footprint_table(c.charge_sigma)
        self._max_e = len(self._e_cdf) - 1
        self._max_xpix = 4 * (len(self._x_cdf) - 1)
        self._log_cap = 9 * self._max_e + self._max_xpix

        self._model = (
            self._key,
            c.frames_per_position,
            self._centers,
            self._scatter,
            float(c.disk_radius),
            float(c.halo_width),
            self._e_cdf,
            self._x_cdf,
            self._charge_tab,
            self._halo_tab,
            float(c.xray_adu),
            float(c.xray_2x2_fraction),
        )
        ne, nx = max(self._max_e, 1), max(self._max_xpix, 1)
        self._scratch = (
            np.zeros(2, np.uint64),  # RNG state, and a sink for _deposit's cache-line checksum
            np.zeros(ne, np.uint32),  # electron pixels
            np.zeros(ne, np.int32),  # sub-pixel row bins
            np.zeros(ne, np.int32),  # sub-pixel column bins
            np.zeros(ne, np.float64),  # charges
            np.zeros(nx, np.uint32),  # x-ray pixels
            np.zeros(nx, np.float64),  # x-ray ADU
        )

        self._lock = threading.RLock()
        self._ring = np.empty((0, _FRAME_PIXELS), np.uint16)
        self._grow_ring(c.pool_size)
        self._records: list[tuple[int, int, np.ndarray]] = []
        self._live_baseline = self._measure_baseline()

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

    # --------------------------------------------------------------------------------------- ground truth
    def sample_image(self) -> np.ndarray:
        """Ground-truth sample thickness in [0, 1) at each scan position, shape (scan height, scan width)."""
        return self._sample.copy()

    def disk_shift(self) -> np.ndarray:
        """Bright-field disk deflection (d_row, d_col) in detector pixels, shape (scan height, scan width, 2)."""
        return self._shift.copy()

    def scatter_fraction(self) -> np.ndarray:
        """Fraction of electrons scattered out of the bright-field disk, shape (scan height, scan width)."""
        return self._scatter.reshape(self.scan.height, self.scan.width).copy()

    def dark(self) -> np.ndarray:
        """True mean raw value of each pixel without beam (offset + fixed pattern), float32 (576, 576)."""
        return self._dark.copy()

    def dark_frames(self, n: int) -> np.ndarray:
        """The first n dark frames (noise only, no electrons or x-rays) of this camera, (n, 576, 576) uint16."""
        _check_int("n", n, 1)
        rng = np.random.default_rng(self._dark_frames_seed)
        out = np.empty((n, *FRAME_SHAPE), np.uint16)
        for k in range(n):
            out[k] = self._noise_frame(rng).reshape(FRAME_SHAPE)
        return out

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
            ne, nx = _frame_truth(i, self._model, self._scratch, e_out, x_out)
        return e_out[:ne].copy(), x_out[:nx].copy()

    def _noise_frame(self, rng: np.random.Generator) -> np.ndarray:
        """One flat background frame: dark + Gaussian read noise, rounded and clipped to uint16."""
        f = rng.standard_normal(_FRAME_PIXELS, dtype=np.float32)
        f *= self.config.read_noise
        f += self._dark.ravel()
        np.rint(f, out=f)
        np.clip(f, 0, _UINT16_MAX, out=f)
        return f.astype(np.uint16)

    def _grow_ring(self, length: int) -> None:
        """(Re)build the ring with `length` slots (slot q holds background q mod pool_size) in new memory,
        so arrays already handed out keep their old memory untouched."""
        pool = self.config.pool_size
        ring = np.empty((length, _FRAME_PIXELS), np.uint16)
        if len(self._ring) == 0:
            rng = np.random.default_rng(self._bg_seed)
            for q in range(min(pool, length)):
                ring[q] = self._noise_frame(rng)
        else:
            for q in range(pool):
                ring[q] = self._ring[q]
                _restore(ring[q], self._log_idx[q], self._log_val[q], self._log_n[q])
        for q in range(pool, length):
            ring[q] = ring[q % pool]
        self._ring = ring
        self._log_idx = np.zeros((length, max(self._log_cap, 1)), np.int32)
        self._log_val = np.zeros((length, max(self._log_cap, 1)), np.uint16)
        self._log_n = np.zeros(length, np.int64)
        self._records = []

    def _measure_baseline(self) -> int:
        """References the bookkeeping itself holds on a record's root array (interpreter-dependent)."""
        self._records.append((0, 0, np.frombuffer(memoryview(bytes(2)), np.uint16)))
        baseline = self._refs(len(self._records) - 1)
        self._records.pop()
        return baseline

    def _refs(self, r: int) -> int:
        return sys.getrefcount(self._records[r][2])

    def _claim(self, start: int, stop: int) -> bool:
        """True (and forget their records) if nobody holds a batch on ring slots [start, stop) any more."""
        overlapping = [r for r, rec in enumerate(self._records) if rec[0] < stop and start < rec[1]]
        if any(self._refs(r) > self._live_baseline for r in overlapping):
            return False
        self._records = [rec for rec in self._records if not (rec[0] < stop and start < rec[1])]
        return True

    def _free_window(self, slot0: int, n: int) -> tuple[bool, int]:
        """(True, start) for the first window of n slots with slot0's residues that nobody holds."""
        # Any slot with the same residue holds the same background, so any such window will do.
        for start in range(slot0, len(self._ring) - n + 1, self.config.pool_size):
            if self._claim(start, start + n):
                return True, start
        return False, slot0

    def _render(self, i0: int, n: int, want_truth: bool, force_copy: bool = False):
        """Frames i0..i0+n-1 as a read-only (n, 576*576) array, plus truth (flat, offsets) if wanted."""
        pool = self.config.pool_size
        slot0 = i0 % pool
        if slot0 + n > len(self._ring):
            self._grow_ring(pool + n)
        in_place = False
        if not force_copy:
            in_place, slot0 = self._free_window(slot0, n)
            # A consumer's for-loop still holds the previous batch while asking for the next, and often keeps one
            # more (a "last batch" variable): with pool * ceil(3n / pool) + n slots a free window is left even
            # then. Grow once to that size; past it, held batches cost a copy instead of memory.
            bound = pool * -(-3 * n // pool) + n
            if not in_place and len(self._ring) < bound:
                self._grow_ring(bound)
                in_place, slot0 = self._free_window(i0 % pool, n)
        truth = np.empty(n * max(self._max_e, 1) if want_truth else 1, np.uint32)
        offsets = np.zeros(n + 1, np.int64)
        dst = self._ring[:1] if in_place else np.empty((n, _FRAME_PIXELS), np.uint16)
        _render_batch(dst, self._ring, slot0, i0, n, in_place, self._log_idx, self._log_val, self._log_n,
                      self._model, self._footprint, self._scratch, want_truth, truth, offsets)  # fmt: skip
        if in_place:
            # Every view derived from this per-batch root array has the root as its base (numpy stops collapsing
            # bases at an array whose base is a buffer), so the root's reference count says whether anyone still
            # holds any part of the batch.
            root = np.frombuffer(memoryview(self._ring[slot0 : slot0 + n]).toreadonly(), np.uint16)
            self._records.append((slot0, slot0 + n, root))
            frames = root.reshape(n, _FRAME_PIXELS)
            del root
        else:
            frames = dst
            frames.flags.writeable = False
        return frames, ((truth, offsets) if want_truth else None)

    def _iter(self, batch_size: int, want_truth: bool, pair: bool) -> Iterator:
        """Yield FrameBatch (pair=False) or (FrameBatch, truth list or None) per batch_size frames."""
        _check_int("batch_size", batch_size, 1)
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


def _make_sample(scan: ScanShape, particles: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Thickness t = 1 - exp(-(film + sum of Gaussian particles)) on the scan grid and its gradient
    (d/drow, d/dcol) per unit of the scan's longer side, shapes (h, w) and (h, w, 2)."""
    side = max(scan.width, scan.height)
    v = (np.arange(scan.height) + 0.5)[:, None] / side
    u = (np.arange(scan.width) + 0.5)[None, :] / side
    s = np.full((scan.height, scan.width), 0.1)
    ds_dv = np.zeros_like(s)
    ds_du = np.zeros_like(s)
    cu = rng.uniform(0.1, 0.9, particles) * scan.width / side
    cv = rng.uniform(0.1, 0.9, particles) * scan.height / side
    sigma = rng.uniform(0.06, 0.14, particles)
    amp = rng.uniform(0.8, 1.6, particles)
    for k in range(particles):
        g = amp[k] * np.exp(-((u - cu[k]) ** 2 + (v - cv[k]) ** 2) / (2 * sigma[k] ** 2))
        s += g
        ds_du -= g * (u - cu[k]) / sigma[k] ** 2
        ds_dv -= g * (v - cv[k]) / sigma[k] ** 2
    e = np.exp(-s)
    return 1.0 - e, np.stack([e * ds_dv, e * ds_du], axis=-1)
