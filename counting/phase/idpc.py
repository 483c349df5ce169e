"""Integrated DPC: the phase whose gradient is the centre-of-mass field, by Fourier integration.

The CoM shift (detector px, (x, y) = (column, row)) is proportional to the phase gradient in scan axes
once turned by the rotation from detector to scan axes (theta of counting.phase.model, e.g. a parallax
fit's): g = R(theta) com. Then phi = F^-1[(q_x G_x + q_y G_y) / (2 pi i (q^2 + q_hp^2))]: q_hp, a small
high-pass, keeps the unmeasurable constant (and the slowest ramps) from blowing up. The fields are
zero-padded to twice their size so the periodic transform does not join opposite edges.
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft

from counting.phase.model import rotation as rotation_matrix

DEFAULT_HIGHPASS = 0.5  # q_hp in cycles per image side (of the unpadded field)


def idpc(
    com_x: np.ndarray,
    com_y: np.ndarray,
    rotation: float | None = None,
    used: np.ndarray | None = None,
    highpass: float = DEFAULT_HIGHPASS,
) -> np.ndarray:
    """float64 (h, w) phase (arbitrary scale: CoM px times scan px) from CoM fields (h, w); rotation in
    degrees (detector -> scan axes; None: 0); used (h, w) bool positions to trust (others count as zero
    gradient, as do never-seen ones); the result's mean over used positions is 0."""
    cx = np.asarray(com_x, np.float64)
    cy = np.asarray(com_y, np.float64)
    if cx.shape != cy.shape or cx.ndim != 2:
        raise ValueError(f"CoM fields must be two images of one shape, got {cx.shape} and {cy.shape}")
    used = np.ones(cx.shape, bool) if used is None else np.asarray(used, bool).reshape(cx.shape)
    if not used.any():
        return np.zeros(cx.shape)
    # The mean CoM is the descan's, not the sample's: removed.
    cx = np.where(used, cx - cx[used].mean(), 0.0)
    cy = np.where(used, cy - cy[used].mean(), 0.0)
    if rotation:
        r = rotation_matrix(rotation)
        cx, cy = r[0, 0] * cx + r[0, 1] * cy, r[1, 0] * cx + r[1, 1] * cy
    h, w = cx.shape
    ph, pw = 2 * h, 2 * w
    qy = np.fft.fftfreq(ph)[:, None]
    qx = np.fft.rfftfreq(pw)[None, :]
    q_hp = highpass / max(h, w)
    gx = sfft.rfft2(cx, s=(ph, pw))
    gy = sfft.rfft2(cy, s=(ph, pw))
    phase = sfft.irfft2((qx * gx + qy * gy) / (2j * np.pi * (qx**2 + qy**2 + q_hp**2)), s=(ph, pw))[:h, :w]
    return phase - phase[used].mean()


def idpc_from_sums(
    counts: np.ndarray,
    sum_col: np.ndarray,
    sum_row: np.ndarray,
    cx: float,
    cy: float,
    shape: tuple[int, int],
    rotation: float | None = None,
    used: np.ndarray | None = None,
) -> np.ndarray:
    """iDPC straight from counting.live_images' sums (LiveArrays counts, sum_col, sum_row, per position)
    and the BF centre (cx, cy): positions with no counts are not used."""
    counts = np.asarray(counts).reshape(shape)
    seen = counts > 0
    n = np.maximum(counts, 1)
    com_x = np.where(seen, np.asarray(sum_col).reshape(shape) / n - cx, 0.0)
    com_y = np.where(seen, np.asarray(sum_row).reshape(shape) / n - cy, 0.0)
    keep = seen if used is None else seen & np.asarray(used, bool).reshape(shape)
    return idpc(com_x, com_y, rotation, keep)
