"""Subpixel shifts of bin images against their shift-sum, by cross-correlation in Fourier space.

A bin image I_b(r) = O(r + s_b) correlates best with the object at lag s_b: C(t) = sum_r I_b(r) O(r + t)
peaks at t = s_b. Given guesses g_b, each image is first moved back by its guess (a Fourier shift), made
zero-mean and only then windowed, so a window (which pulls a correlation peak towards lag 0) is unbiased at
the fixed point delta = 0, on the positions every moved-back bin covers; the reference is the sum of the
moved-back, windowed bins less the bin's own term (its counting noise would otherwise peak at lag 0); the
correlation is smoothed (counting noise is white, the sample's signal is not); a parabola per axis refines
the peak: s_b = g_b + delta_b. Iterated by counting.phase.fit.
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft
from scipy import ndimage

from counting.errors import PermanentError


class NoOverlapError(PermanentError, ValueError):
    """The guesses move the bins so far that no used position is covered by all of them."""


def taper(used: np.ndarray, width: float = 6.0) -> np.ndarray:
    """float32 (h, w) window: 1 deep inside the used positions, falling as a cosine to 0 over width px
    towards their edge and the image's edge (the image border counts as an edge)."""
    padded = np.pad(np.asarray(used, bool), 1)
    depth = ndimage.distance_transform_edt(padded)[1:-1, 1:-1]
    ramp = np.clip((depth - 0.5) / width, 0.0, 1.0)
    return (0.5 - 0.5 * np.cos(np.pi * ramp)).astype(np.float32)


def measure_shifts(
    spec: np.ndarray,
    used: np.ndarray,
    guess: np.ndarray,
    reach: float,
    smooth: float = 3.0,
) -> np.ndarray:
    """float64 (bins, 2) shifts (x, y) of each bin, from the bins' rfft2 spectra (bins, h, w//2+1), the
    used positions (h, w) and guesses (bins, 2); peaks within reach px of the guess, correlation smoothed
    by a Gaussian of smooth px."""
    shape = used.shape
    guess = np.asarray(guess, np.float64).reshape(-1, 2)
    # Where every moved-back bin holds its own data: the used positions less the largest move, so no bin's
    # edge (which moves with its guess, not with the sample) is inside the window.
    margin = int(np.ceil(np.abs(guess).max(initial=0.0)))
    inner = ndimage.binary_erosion(used, np.ones((2 * margin + 1,) * 2, bool)) if margin else used
    if not inner.any():  # no correlation to measure: every peak would sit at the guess, a perfect "fit"
        raise NoOverlapError(f"shifts of up to {margin} px leave no position that every moved bin covers")
    window = taper(inner)
    ey, ex = all_ramps(shape, guess)
    moved = sfft.irfft2(spec * ey * ex, s=shape, axes=(-2, -1))
    # Zero mean under the window: a bin's mean there depends on what its shift brings into the field, and
    # that offset times the window would correlate with the reference's uneven content (a pull along the
    # sample's large features: -6 % of A1 on noise-free copies of a sample with particles at the edge).
    moved -= (moved * window).sum(axis=(-2, -1), keepdims=True) / window.sum()
    aligned = moved * window
    own = sfft.rfft2(aligned, axes=(-2, -1))
    prod = np.conj(own) * (own.sum(axis=0) - own)
    h, w = shape
    q2 = np.fft.fftfreq(h)[:, None] ** 2 + np.fft.rfftfreq(w)[None, :] ** 2
    prod *= np.exp(-2.0 * np.pi**2 * smooth**2 * q2).astype(np.float32)
    corr = sfft.irfft2(prod, s=shape, axes=(-2, -1))
    return guess + _peaks(corr, reach)


def all_ramps(shape: tuple[int, int], shifts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """shift_sum.ramps for every shift (n, 2) at once: (rows factors (n, h, 1), columns (n, 1, w//2+1))."""
    h, w = shape
    sx, sy = shifts[:, 0, None], shifts[:, 1, None]
    ey = np.exp(-2j * np.pi * np.fft.fftfreq(h)[None, :] * sy).astype(np.complex64)
    ex = np.exp(-2j * np.pi * np.fft.rfftfreq(w)[None, :] * sx).astype(np.complex64)
    return ey[:, :, None], ex[:, None, :]


def _peaks(corr: np.ndarray, reach: float) -> np.ndarray:
    """float64 (n, 2): (x, y) of each correlation's (n, h, w) largest value within reach of lag 0, refined
    by a parabola per axis."""
    n, h, w = corr.shape
    lag_y = np.fft.fftfreq(h, 1.0 / h)
    lag_x = np.fft.fftfreq(w, 1.0 / w)
    near = lag_y[:, None] ** 2 + lag_x[None, :] ** 2 <= reach**2
    flat = np.where(near, corr, -np.inf).reshape(n, -1).argmax(axis=1)
    iy, ix, b = flat // w, flat % w, np.arange(n)
    mid = corr[b, iy, ix]
    dy = _parabola(corr[b, (iy - 1) % h, ix], mid, corr[b, (iy + 1) % h, ix])
    dx = _parabola(corr[b, iy, (ix - 1) % w], mid, corr[b, iy, (ix + 1) % w])
    return np.stack([lag_x[ix] + dx, lag_y[iy] + dy], axis=1)


def _parabola(left: np.ndarray, mid: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Vertex offsets of the parabolas through three equally spaced values (0 where flat), within +-0.5."""
    left, mid, right = (np.asarray(v, np.float64) for v in (left, mid, right))
    curve = left - 2.0 * mid + right
    with np.errstate(divide="ignore", invalid="ignore"):
        offset = np.clip(0.5 * (left - right) / curve, -0.5, 0.5)
    return np.where(curve < 0.0, offset, 0.0)
