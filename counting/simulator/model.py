"""The simulated physics as numbers, computed once per camera from its config.

The sample is a thin support film with Gaussian particles: its thickness t in [0, 1) at each scan position.
Its gradient deflects the bright-field disk (so centre-of-mass / DPC shows the sample), and a fraction of
the electrons growing with t is scattered out of the disk into a halo (so virtual BF shows the sample and ADF
its inverse). With flyback, the last scan column is not on the sample: its disk is displaced and smeared
(counting.simulator.config). The detector has a fixed dark pattern (offset + per-pixel variation) and Gaussian read noise.
The compiled kernels (counting.simulator.kernels) read lookup tables instead of special functions: Poisson
CDFs of the electron and x-ray counts, quantiles of an electron's gamma-distributed charge and of the halo
radius, and the charge cloud's 3x3 footprint per sub-pixel position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import special

from counting.geometry import FRAME_COLS, FRAME_ROWS, FRAME_SHAPE, ScanShape
from counting.phase.model import rotation
from counting.simulator.config import BEAM_CENTER, FLYBACK_SHIFT, FLYBACK_SMEAR, SimulatorConfig
from counting.simulator.kernels import SUBPIXEL_BINS, UINT16_MAX

FRAME_PIXELS = FRAME_ROWS * FRAME_COLS
_TABLE_SIZE = 4096  # quantile tables for charge and halo radius (linearly interpolated)
_TAIL = 1e-15  # Poisson tables stop where the upper tail is this small


@dataclass(frozen=True)
class Specimen:
    """The sample and what the beam does at each scan position (flyback column included)."""

    thickness: np.ndarray  # (height, sample width) in [0, 1): the sample columns only
    shift: np.ndarray  # (height, sample width, 2) bright-field disk deflection (d_row, d_col), pixels
    centers: np.ndarray  # (positions, 2) bright-field disk centre (row, col), pixels
    scatter: np.ndarray  # (positions,) fraction of electrons scattered out of the disk
    smear: np.ndarray  # (positions,) length along the columns the disk is smeared over (flyback), pixels
    # Parallax only: the scattered fraction on the sample grid padded by `pad` positions on every side (the
    # sample goes on beyond the scan, and a tilted view of an edge position looks there).
    parallax_scatter: np.ndarray | None = None
    pad: int = 0


@dataclass(frozen=True)
class EventModel:
    """What the kernels need to draw a frame's events: the packed model tuple and its sizes."""

    model: tuple  # layout: the first line of simulator_kernels._gen_events
    footprint: np.ndarray  # (SUBPIXEL_BINS, 3) charge-cloud weights
    max_electrons: int  # the most electrons one frame can have (end of the Poisson table)
    max_xray_pixels: int


def specimen(config: SimulatorConfig, rng: np.random.Generator) -> Specimen:
    """The sample of this config and the bright-field disk's centre, scattered fraction and smear per position.

    The sample covers the first sample_width columns; a flyback column gets the displaced, smeared disk and
    the mean scattered fraction of its row (the beam crosses the row while that frame is recorded)."""
    h, ws = config.scan.height, config.sample_width
    state = rng.bit_generator.state  # the parallax grid redraws the same sample
    thickness, grad = (
        _make_sample(ScanShape(ws, h), config.particles, rng, 0, config.texture) if ws else _no_sample(h)
    )
    gmax = float(np.sqrt((grad**2).sum(axis=-1)).max()) if grad.size else 0.0
    shift = grad * (config.deflection / gmax) if gmax > 0 else np.zeros_like(grad)
    if config.rotation != 0.0:  # the disk moves along the gradient seen in detector axes: R(-rotation)
        turn = rotation(-config.rotation)  # (x, y) basis; shift is (d_row, d_col)
        shift = np.stack([shift @ turn[1, ::-1], shift @ turn[0, ::-1]], axis=-1)
    scatter = config.scatter_min + (config.scatter_max - config.scatter_min) * thickness
    centers = np.asarray(BEAM_CENTER) + shift
    smear = np.zeros((h, ws))
    if config.flyback:
        row_scatter = scatter.mean(axis=1, keepdims=True) if ws else np.full((h, 1), config.scatter_min)
        scatter = np.concatenate([scatter, row_scatter], axis=1)
        flyback_center = np.broadcast_to(np.add(BEAM_CENTER, FLYBACK_SHIFT), (h, 1, 2))
        centers = np.concatenate([centers, flyback_center], axis=1)
        smear = np.concatenate([smear, np.full((h, 1), FLYBACK_SMEAR)], axis=1)
    twin = np.random.default_rng()
    twin.bit_generator.state = state
    padded, pad = _padded_scatter(config, twin) if config.parallax and ws else (None, 0)
    return Specimen(
        thickness,
        shift,
        np.ascontiguousarray(centers.reshape(-1, 2)),
        scatter.ravel(),
        smear.ravel(),
        padded,
        pad,
    )


def _padded_scatter(config: SimulatorConfig, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """The same sample (the generator's state is the one _make_sample started from) on a grid padded by
    the largest parallax shift: its scattered fraction (h + 2 pad, sample width + 2 pad) and pad."""
    reach = np.abs(config.parallax_matrix()).sum(axis=1).max() * (config.disk_radius + config.deflection)
    pad = int(np.ceil(reach)) + 2
    h, ws = config.scan.height, config.sample_width
    thickness, _ = _make_sample(ScanShape(ws, h), config.particles, rng, pad, config.texture)
    return config.scatter_min + (config.scatter_max - config.scatter_min) * thickness, pad


def dark_pattern(config: SimulatorConfig, rng: np.random.Generator) -> np.ndarray:
    """Mean raw value of each pixel without beam (offset + fixed pattern), float32 (576, 576)."""
    return (config.offset + config.dark_variation * rng.standard_normal(FRAME_SHAPE)).astype(np.float32)


def noise_frame(dark: np.ndarray, read_noise: float, rng: np.random.Generator) -> np.ndarray:
    """One flat background frame: dark + Gaussian read noise, rounded and clipped to uint16."""
    f = rng.standard_normal(FRAME_PIXELS, dtype=np.float32)
    f *= read_noise
    f += dark.ravel()
    np.rint(f, out=f)
    np.clip(f, 0, UINT16_MAX, out=f)
    return f.astype(np.uint16)


def event_model(config: SimulatorConfig, sample: Specimen, key: np.uint64) -> EventModel:
    """The tables of this config packed for the kernels; key seeds every frame's generator."""
    c = config
    e_cdf = _poisson_cdf(c.dose)
    x_cdf = _poisson_cdf(c.xray_rate)
    p = (np.arange(_TABLE_SIZE) + 0.5) / _TABLE_SIZE
    scale = c.electron_adu / c.electron_adu_shape
    charge_tab = special.gammaincinv(c.electron_adu_shape, p) * scale
    halo_tab = special.ndtri(0.5 + 0.5 * p)
    model = (
        key,
        c.frames_per_position,
        sample.centers,
        sample.scatter,
        sample.smear,
        float(c.disk_radius),
        float(c.halo_width),
        e_cdf,
        x_cdf,
        charge_tab,
        halo_tab,
        float(c.xray_adu),
        float(c.xray_2x2_fraction),
        *_parallax_model(c, sample),
    )
    return EventModel(model, _footprint_table(c.charge_sigma), len(e_cdf) - 1, 4 * (len(x_cdf) - 1))


def _parallax_model(config: SimulatorConfig, sample: Specimen) -> tuple:
    """(on, M in the (row, col) basis, scattered fraction on the padded sample grid, scan width, pad): the
    kernels' parallax inputs; off without a defocus/astigmatism or without sample columns."""
    w, ws = config.scan.width, config.sample_width
    on = config.parallax and ws > 0
    m = config.parallax_matrix()
    m_rc = np.ascontiguousarray([[m[1, 1], m[1, 0]], [m[0, 1], m[0, 0]]])
    obj = np.ascontiguousarray(sample.parallax_scatter) if on else np.zeros((1, 1))
    return bool(on), m_rc, obj, int(w), float(sample.pad)


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
    d = -0.5 + (np.arange(SUBPIXEL_BINS) + 0.5) / SUBPIXEL_BINS
    edges = np.array([-1.5, -0.5, 0.5, 1.5])
    cdf = special.ndtr((edges[None, :] - d[:, None]) / sigma)
    w = np.diff(cdf, axis=1)
    return w / w.sum(axis=1, keepdims=True)


def _no_sample(height: int) -> tuple[np.ndarray, np.ndarray]:
    """Thickness and gradient of a scan without sample columns (only a flyback column)."""
    return np.zeros((height, 0)), np.zeros((height, 0, 2))


def _make_sample(
    scan: ScanShape, particles: int, rng: np.random.Generator, pad: int = 0, texture: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Thickness t = 1 - exp(-(film + sum of Gaussian particles)) on the scan grid (pad positions more on
    every side) and its gradient (d/drow, d/dcol) per unit of the scan's longer side, shapes (h, w) and
    (h, w, 2), h and w padded; with texture, the film's fine texture (_film_texture) in t, not in the
    gradient."""
    side = max(scan.width, scan.height)
    v = (np.arange(-pad, scan.height + pad) + 0.5)[:, None] / side
    u = (np.arange(-pad, scan.width + pad) + 0.5)[None, :] / side
    s = np.full((len(v), u.shape[1]), 0.1)
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
    grad = np.stack([e * ds_dv, e * ds_du], axis=-1)
    if texture > 0:  # v * side, u * side: scan px, the same on a padded grid
        e = e * np.exp(-texture * _film_texture(v * side, u * side, rng))
    return 1.0 - e, grad


def _film_texture(y: np.ndarray, x: np.ndarray, rng: np.random.Generator, waves: int = 48) -> np.ndarray:
    """A fine random texture in [0, 0.2] of mean 0.1 (the film's thickness) at scan positions (y, x), px: a
    sum of plane waves of random direction and phase, periods 4..8 px, a function of the position alone
    (so the parallax's padded grid sees the same film)."""
    angle = rng.uniform(0.0, np.pi, waves)
    freq = 1.0 / rng.uniform(4.0, 8.0, waves)
    phase = rng.uniform(0.0, 2.0 * np.pi, waves)
    out = np.zeros(np.broadcast_shapes(y.shape, x.shape))
    for a, f, p in zip(angle, freq, phase, strict=True):
        out += np.cos(2.0 * np.pi * f * (x * np.cos(a) + y * np.sin(a)) + p)
    return 0.1 * (1.0 + np.clip(out / np.sqrt(waves / 2.0), -3.0, 3.0) / 3.0)
