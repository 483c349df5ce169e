"""Tilt-corrected bright field: each bin image shifted back by its shift (a Fourier shift) and summed.

A bin image is the object seen from its tilt, I_b(r) = O(r + s_b) (counting.phase.model), so I_b(r - s_b)
is the object for every bin and their sum is sharp where the plain sum (the virtual BF) is blurred by
the spread of the s_b. Shifts are (x, y) = (column, row) scan px.
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft

from counting.phase.accumulate import ParallaxSnapshot


def bin_rates(snapshot: ParallaxSnapshot, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rates, used): float32 (bins, h, w) electrons per frame per bin, positions not used (never seen, or
    False in mask, e.g. a flyback column) filled with the bin's mean over the used ones; used bool (h, w)."""
    used = snapshot.seen()
    if mask is not None:
        used = used & np.asarray(mask, bool).reshape(used.shape)
    rates = snapshot.bin_images()
    if used.any():
        means = rates[:, used].mean(axis=1)
        rates[:, ~used] = means[:, None]
    return rates, used


def ramps(shape: tuple[int, int], shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The separable Fourier factors exp(-2 pi i q.s) of a real image's rfft2 spectrum that move it by +s:
    (rows factor (h, 1), columns factor (1, w//2+1)), complex64."""
    h, w = shape
    sx, sy = float(shift[0]), float(shift[1])
    ey = np.exp(-2j * np.pi * np.fft.fftfreq(h) * sy).astype(np.complex64)
    ex = np.exp(-2j * np.pi * np.fft.rfftfreq(w) * sx).astype(np.complex64)
    return ey[:, None], ex[None, :]


def spectra(images: np.ndarray) -> np.ndarray:
    """complex64 (bins, h, w//2+1): the bins' rfft2 spectra, in single precision (63 MB for 60 at 512^2)."""
    return sfft.rfft2(np.asarray(images, np.float32), axes=(-2, -1))


def shift_sum_spectrum(spec: np.ndarray, shifts: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The rfft2 spectrum of sum_b I_b(r - s_b), from the bins' spectra, shifts (bins, 2), image shape."""
    out = np.zeros(spec.shape[1:], np.complex64)
    for b in range(spec.shape[0]):
        ey, ex = ramps(shape, shifts[b])
        out += spec[b] * ey * ex
    return out


def shift_sum(images: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """float64 (h, w): sum over bins of image b moved back by its shift s_b (periodic Fourier shift)."""
    images = np.asarray(images)
    shape = images.shape[-2:]
    total = shift_sum_spectrum(spectra(images), shifts, shape)
    return sfft.irfft2(total, s=shape).astype(np.float64)


def tilt_corrected_bf(
    snapshot: ParallaxSnapshot, shifts: np.ndarray, mask: np.ndarray | None = None
) -> np.ndarray:
    """float64 (h, w) tilt-corrected BF in electrons per frame: the bins shift-summed by shifts (bins, 2),
    e.g. AberrationFit.model_shifts(); unused positions hold the image's mean (no false edges)."""
    rates, used = bin_rates(snapshot, mask)
    out = shift_sum(rates, shifts)
    if used.any():
        out[~used] = out[used].mean()
    return out


def virtual_bf(snapshot: ParallaxSnapshot, mask: np.ndarray | None = None) -> np.ndarray:
    """float64 (h, w): the plain sum of the bins (what the virtual BF of the disk shows), for comparison."""
    rates, _ = bin_rates(snapshot, mask)
    return rates.sum(axis=0, dtype=np.float64)
