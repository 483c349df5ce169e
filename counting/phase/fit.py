"""Fit the parallax aberrations (defocus C1, two-fold astigmatism A1 at an angle, rotation) from a scan's
bin images (counting.phase.accumulate), as counted so far.

Each bin image, binned to at most MAX_SIDE positions across and normalised to its mean over the used
positions (the seen ones, less a mask such as the flyback column), is cross-correlated against the other
bins' sum (counting.phase.correlate): first as they are, then each moved back by the model's shift, which
sharpens the reference and removes the window's bias; passes repeat until the model settles. The measured
shifts are fitted to s_b = M k_b + t by least squares weighted by each bin's counts (per shift component,
M's row and an offset t, the reference's own position); M gives C1, A1, phi, theta (counting.phase.model)
and the parameters' covariance (residual variance times (X^T W X)^-1) their uncertainties, propagated
through the decomposition. The correlation measures only where every moved bin holds data (a margin of
the largest shift is cut from each side), so the model is then refined on every used position
(counting.phase.refine), against each bin's leave-one-out reference: at 64x64 and 200 e/frame that nearly
halves the scatter of A1 (rms 7.5 -> 4.2 % over 12 seeds), and the uncertainties, which treat the bins'
shift errors as independent, then match the scatter over seeds (bench_phase --seeds). Values are in scan
px per detector px until calibrate() turns C1 and A1 into nm.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from counting.errors import PermanentError
from counting.phase.accumulate import ParallaxSnapshot
from counting.phase.correlate import NoOverlapError, measure_shifts
from counting.phase.model import decompose
from counting.phase.refine import refine_model
from counting.phase.shift_sum import spectra

PX_UNITS = "scan px per detector px"
REFINE_REACH = 3.0  # px from the model's shift the later passes look for a peak
MAX_SIDE = 128  # binned positions across the used region the correlation runs on
MIN_SIDE = 8  # positions per side of the used region a fit needs
MIN_COARSE = 32  # positions across the smallest coarse stage of a fit (fit_aberrations' coarse)


class ParallaxFitError(PermanentError, ValueError):
    """Not enough counted data (positions, bins or electrons) for a fit."""


@dataclass(frozen=True)
class AberrationFit:
    """A parallax fit: values with 1-sigma uncertainties; angles in degrees, (x, y) = (column, row)."""

    defocus: float  # C1: PX_UNITS, or nm once calibrated (positive: shifts along +k)
    defocus_err: float
    astigmatism: float  # |A1| >= 0, same units as the defocus
    astigmatism_err: float
    astigmatism_angle: float  # phi, (-90, 90]
    astigmatism_angle_err: float
    rotation: float  # theta, detector -> scan axes, (-90, 90] unless a hint chose the other branch
    rotation_err: float
    matrix: np.ndarray  # (2, 2) float64 M, always PX_UNITS: shift = M k
    offset: np.ndarray  # (2,) float64 t, scan px
    k: np.ndarray = field(repr=False)  # (bins, 2) detector px
    measured: np.ndarray = field(repr=False)  # (bins, 2) measured shifts, scan px
    weights: np.ndarray = field(repr=False)  # (bins,) electrons per bin over the used positions
    positions: int = 0  # scan positions used
    units: str = PX_UNITS
    calibrated: bool = False
    scan_step_nm: float | None = None
    mrad_per_px: float | None = None

    def model_shifts(self) -> np.ndarray:
        """float64 (bins, 2): the model's shift M k of each bin, scan px (for shift_sum.tilt_corrected_bf)."""
        return self.k @ self.matrix.T

    def residual_rms(self) -> float:
        """Weighted rms of measured - (M k + t), scan px."""
        r = self.measured - self.model_shifts() - self.offset
        return float(np.sqrt((self.weights * (r**2).sum(axis=1)).sum() / max(self.weights.sum(), 1e-300)))

    def calibrate(self, scan_step_nm: float, mrad_per_px: float) -> AberrationFit:
        """This fit with C1 and A1 in nm: shift_nm = C1_nm * tilt_rad, tilt_rad = k * mrad_per_px / 1000,
        shift_nm = shift_px * scan_step_nm."""
        if self.calibrated:
            raise ValueError("this fit is calibrated already")
        if not (
            np.isfinite(scan_step_nm) and np.isfinite(mrad_per_px) and scan_step_nm > 0 and mrad_per_px > 0
        ):
            raise ValueError(f"need a positive scan step and mrad/px, got {scan_step_nm}, {mrad_per_px}")
        f = scan_step_nm * 1000.0 / mrad_per_px
        return replace(
            self,
            defocus=self.defocus * f,
            defocus_err=self.defocus_err * f,
            astigmatism=self.astigmatism * f,
            astigmatism_err=self.astigmatism_err * f,
            units="nm",
            calibrated=True,
            scan_step_nm=float(scan_step_nm),
            mrad_per_px=float(mrad_per_px),
        )

    def as_dict(self) -> dict:
        """Plain numbers and lists, for JSON, HDF5 attributes and the wire."""
        out = {}
        for name in self.__dataclass_fields__:
            v = getattr(self, name)
            out[name] = v.tolist() if isinstance(v, np.ndarray) else v
        out["residual_rms"] = self.residual_rms()
        return out


def fit_aberrations(
    snapshot: ParallaxSnapshot,
    mask: np.ndarray | None = None,
    iterations: int = 16,
    rotation_hint: float | None = None,
    tolerance: float = 0.02,
    max_side: int = MAX_SIDE,
    coarse: bool = True,
    refine: bool = True,
) -> AberrationFit:
    """Fit C1, A1, phi, theta to the bins of a snapshot (only positions seen and True in mask (h, w));
    passes until no bin's model shift moves by tolerance px more (at most iterations); the bin images are
    binned f x f first so the used region is at most max_side across (the shifts are measured in binned
    px, then scaled by f). With coarse, the same fit binned to half as many across (a quarter of the
    work per pass, and itself started the same way down to MIN_COARSE across) gives the first model, and
    the passes here only refine it: 2 passes instead of 5..7 at 256 x 256, the same fixed point within
    the tolerance. With refine, the correlation's model is then refined on every used position
    (counting.phase.refine), which the correlation's margin leaves out."""
    return _fit(_Used.of(snapshot, mask), iterations, rotation_hint, tolerance, max_side, coarse, refine)


@dataclass(frozen=True)
class _Used:
    """A snapshot's used positions, prepared once for every stage of a fit: their bounding box's counts
    (float32 (h, w, bins), 0 where not used), frames and the bins' electrons."""

    counts: np.ndarray
    frames: np.ndarray
    inside: np.ndarray  # bool (h, w): used, in the box
    weights: np.ndarray  # (bins,) electrons over the used positions
    positions: int
    k: np.ndarray

    @classmethod
    def of(cls, snapshot: ParallaxSnapshot, mask: np.ndarray | None) -> _Used:
        """The used positions: seen, and True in mask; ParallaxFitError when too few for a fit."""
        used = snapshot.seen()
        if mask is not None:
            used = used & np.asarray(mask, bool).reshape(used.shape)
        rows, cols = np.flatnonzero(used.any(axis=1)), np.flatnonzero(used.any(axis=0))
        if len(rows) < MIN_SIDE or len(cols) < MIN_SIDE:
            raise ParallaxFitError(f"a fit needs {MIN_SIDE}x{MIN_SIDE} used positions at least")
        counts = snapshot.counts.reshape(snapshot.height, snapshot.width, -1)
        weights = counts[used].sum(axis=0, dtype=np.float64)
        if (weights > 0).sum() < 4:
            raise ParallaxFitError("a fit needs electrons in 4 bins at least")
        box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        inside = used[box]
        frames = np.where(inside, snapshot.frames.reshape(used.shape)[box], 0)
        masked = np.where(inside[..., None], counts[box], 0).astype(np.float32)
        return cls(masked, frames, inside, weights, int(used.sum()), snapshot.bins.k)


def _fit(
    u: _Used,
    iterations: int,
    hint: float | None,
    tolerance: float,
    max_side: int,
    coarse: bool,
    refine: bool = False,
) -> AberrationFit:
    """fit_aberrations on prepared positions."""
    start = _coarse_start(u, iterations, tolerance, max_side) if coarse else None
    images, inside, f = _normalised(u, max_side)
    k, weights = u.k, u.weights
    spec = spectra(images)
    reach = min(inside.shape) / 4.0  # the first pass: anywhere near; then near the model's shifts
    m = np.zeros((2, 2)) if start is None else start
    for it in range(max(int(iterations), 1)):
        guess = k @ m.T
        near = reach if it == 0 and start is None else min(reach, REFINE_REACH)
        try:
            measured = f * measure_shifts(spec, inside, guess / f, near)
        except NoOverlapError as exc:  # a thin region (the first rows of a scan) and a large defocus
            raise ParallaxFitError(f"too few rows for these shifts: {exc}") from None
        m, offset, cov = _weighted_fit(k, measured, weights)
        if np.abs(k @ m.T - guess).max() < tolerance:  # the model's shifts moved less than this: settled
            break
    if refine:  # in binned px (M / f), back in scan px after
        better = refine_model(
            spec, images, inside, k, weights, m / f, _weighted_fit, iterations, tolerance / (4 * f)
        )
        if better is not None:
            m, offset, cov, measured = better[0] * f, better[1] * f, better[2] * f * f, better[3] * f
            weights = better[4]
    return _result(m, offset, cov, k, measured, weights, u.positions, hint)


def _coarse_start(u: _Used, iterations: int, tolerance: float, max_side: int) -> np.ndarray | None:
    """The model M of the same fit binned to half as many across (itself started the same way), or None:
    no coarse stage (it would be under MIN_COARSE across, or under MIN_COARSE / 2 in the other direction,
    or it failed: the passes then start from nothing)."""
    spans = u.inside.shape
    side = min(max_side, max(spans)) // 2
    if side < MIN_COARSE or min(spans) / -(-max(spans) // side) < MIN_COARSE / 2:
        return None
    try:
        coarse = _fit(u, iterations, None, tolerance, side, True)
    except (ParallaxFitError, np.linalg.LinAlgError):
        return None
    return coarse.matrix if np.isfinite(coarse.matrix).all() else None


def _normalised(u: _Used, max_side: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(images, inside, f): the used positions' box binned f x f (at most max_side across), each bin's
    rate / its mean - 1 there, 0 where no used position, padded with 0; the binned positions holding data
    in that padded box; f."""
    f = max(1, -(-max(u.inside.shape) // max_side))
    frames = _block_sum(u.frames, f)
    binned = _block_sum(u.counts, f)
    inside = frames > 0
    rates = np.moveaxis(binned, -1, 0) / np.maximum(frames, 1)
    means = rates[:, inside].mean(axis=1)
    images = np.where(inside, rates / np.maximum(means, 1e-30)[:, None, None] - 1.0, 0.0)
    images[u.weights == 0] = 0.0
    # Zeros (the mean) around the box: a Fourier shift then brings in nothing from the opposite edge.
    pad = int(np.clip(max(inside.shape) // 8, 8, 32))
    images = np.pad(images.astype(np.float32), ((0, 0), (pad, pad), (pad, pad)))
    return images, np.pad(inside, pad), f


def _block_sum(a: np.ndarray, f: int) -> np.ndarray:
    """Sums over f x f blocks of the first two axes (zero-padded up to multiples of f)."""
    if f == 1:
        return a
    h, w = -(-a.shape[0] // f) * f, -(-a.shape[1] // f) * f
    a = np.pad(a, [(0, h - a.shape[0]), (0, w - a.shape[1])] + [(0, 0)] * (a.ndim - 2))
    return a.reshape(h // f, f, w // f, f, *a.shape[2:]).sum(axis=(1, 3))


def _weighted_fit(k: np.ndarray, s: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted least squares of s = M k + t: (M, t, cov (4, 4) of M's entries row-major)."""
    x = np.column_stack([k, np.ones(len(k))])
    used = w > 0
    x, s, w = x[used], s[used], w[used]
    xtwx_inv = np.linalg.inv(x.T @ (w[:, None] * x))
    beta = xtwx_inv @ (x.T @ (w[:, None] * s))  # (3, 2): column c fits shift component c
    resid = s - x @ beta
    dof = max(len(x) - 3, 1)
    cov = np.zeros((4, 4))
    for c in range(2):
        sigma2 = float((w * resid[:, c] ** 2).sum() / dof)
        cov[2 * c : 2 * c + 2, 2 * c : 2 * c + 2] = sigma2 * xtwx_inv[:2, :2]
    return beta[:2].T.copy(), beta[2].copy(), cov


def _result(m, offset, cov, k, measured, weights, positions, hint) -> AberrationFit:
    """The fit's values and their uncertainties through the decomposition's Jacobian."""
    values = np.array(decompose(m, hint))
    theta = values[3]
    step = 1e-6 * max(np.abs(m).max(), 1e-12)
    jac = np.zeros((4, 4))
    for j in range(4):
        d = np.zeros(4)
        d[j] = step
        up = np.array(decompose(m + d.reshape(2, 2), theta))
        down = np.array(decompose(m - d.reshape(2, 2), theta))
        diff = up - down
        diff[2] = (diff[2] + 90.0) % 180.0 - 90.0  # angles differ across their wrap
        diff[3] = (diff[3] + 180.0) % 360.0 - 180.0
        jac[:, j] = diff / (2 * step)
    err = np.sqrt(np.maximum(np.diag(jac @ cov @ jac.T), 0.0))
    return AberrationFit(
        *(float(v) for pair in zip(values, err, strict=True) for v in pair),
        matrix=m,
        offset=offset,
        k=k.copy(),
        measured=measured,
        weights=weights,
        positions=positions,
    )
