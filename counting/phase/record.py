"""A counted scan's whole-scan phase fit, with the live view's code: the BF geometry estimated from the
summed pattern (counting.live_images, as the nodes do) unless given, the parallax sums of every frame
(counting.phase.accumulate), the aberration fit (counting.phase.fit; the flyback column masked unless it is
kept), the tilt-corrected BF and the iDPC phase; and its group in the scan's HDF5.

The ``/phase`` group (PHASE_GROUP), written by write_phase, read by read_phase:

    attrs     status ("ok" | "failed"), reason (a failed fit's), code_version, created_time,
              defocus, astigmatism, astigmatism_angle, rotation, each with <name>_err (1 sigma; degrees for
              the angles), residual_rms (scan px), units (nm, or "scan px per detector px"), calibrated,
              scan_step_nm and mrad_per_px (when calibrated), matrix (2x2 M, scan px per detector px) and
              offset (scan px), positions (used), bins (per side), bins_kept, inner, geometry
              ([cx, cy, bf_radius, adf_inner, adf_outer] detector px), flyback_masked, scan_shape
              ([height, width]), seconds (to compute); a failed fit has no fitted values
    k         float64 (bins_kept, 2): each bin's (x, y) from the disk centre, detector px
    shifts    float64 (bins_kept, 2): the measured shifts, scan px (not in a failed fit)
    weights   float64 (bins_kept,): electrons per bin over the used positions
    tcbf      float32 (height, width): tilt-corrected BF, electrons per frame (not in a failed fit)
    idpc      float32 (height, width): iDPC phase (arbitrary scale), turned by the fit's rotation
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import h5py
import numpy as np

from counting.live_images import LiveGeometry, LiveImages
from counting.phase.accumulate import ParallaxAccumulator
from counting.phase.bins import DEFAULT_BINS, DEFAULT_INNER, ParallaxBins
from counting.phase.fit import MAX_SIDE, PX_UNITS, AberrationFit, ParallaxFitError, fit_aberrations
from counting.phase.idpc import idpc_from_sums
from counting.phase.shift_sum import tilt_corrected_bf
from counting.sparse import CountedScan
from counting.storage.attrs import plain

PHASE_GROUP = "phase"
# Of the fit and of this layout; raised when either changes (2: the fit refined on every position).
CODE_VERSION = 2
_SLOTS = 1 << 16  # frame slots per batch: flat memory whatever the scan's size
_ANY_GEOMETRY = LiveGeometry(288.0, 288.0, 1.0, 1.0, 2.0)
_VALUES = ("defocus", "astigmatism", "astigmatism_angle", "rotation")


@dataclass(frozen=True)
class PhaseRecord:
    """A scan's phase fit and its inputs; ``fit`` None (status failed) with the reason when it failed."""

    status: str  # "ok" | "failed"
    reason: str | None
    fit: AberrationFit | None
    geometry: LiveGeometry
    bins: int  # per side
    inner: float
    k: np.ndarray  # (bins_kept, 2) detector px
    weights: np.ndarray  # (bins_kept,) electrons per bin over the used positions
    flyback_masked: bool
    scan_shape: tuple[int, int]  # (height, width)
    tcbf: np.ndarray | None  # (height, width) float32
    idpc: np.ndarray  # (height, width) float32
    seconds: float = 0.0
    code_version: int = CODE_VERSION

    def summary(self) -> dict:
        """Plain numbers for the catalogue and the stop record (values with their errors, units)."""
        out: dict = {"status": self.status, "reason": self.reason}
        if self.fit is not None:
            for name in _VALUES:
                out[name], out[f"{name}_err"] = (
                    _finite(getattr(self.fit, name)),
                    _finite(getattr(self.fit, f"{name}_err")),
                )
            out.update(
                residual_rms=_finite(self.fit.residual_rms()),
                units=self.fit.units,
                calibrated=self.fit.calibrated,
                positions=self.fit.positions,
            )
        out.update(bins=self.bins, bins_kept=int(len(self.k)), seconds=round(self.seconds, 3))
        out.update(geometry=self.geometry.as_dict(), code_version=self.code_version)
        return out


def scan_batches(scan: CountedScan, slots: int = _SLOTS) -> Iterator[tuple[np.ndarray, ...]]:
    """The scan's frames as counted batches (positions, masks, offsets, indices), in scan order; slots whose
    mask says no frame arrived are left out."""
    flat, masks = scan.events.ravel(), scan.sector_masks.ravel()
    k = scan.frames_per_position
    for start in range(0, len(flat), slots):
        taken = np.flatnonzero(masks[start : start + slots]) + start
        sizes = np.fromiter((len(flat[i]) for i in taken), np.int64, len(taken))
        offsets = np.zeros(len(taken) + 1, np.int64)
        np.cumsum(sizes, out=offsets[1:])
        events = [flat[i] for i in taken]
        indices = np.concatenate(events).astype(np.uint32) if offsets[-1] else np.empty(0, np.uint32)
        yield taken // k, masks[taken], offsets, indices


def phase_of_scan(
    scan: CountedScan,
    geometry: LiveGeometry | None = None,
    bins: int = DEFAULT_BINS,
    keep_flyback: bool = False,
    scan_step_nm: float | None = None,
    convergence_mrad: float | None = None,
) -> PhaseRecord:
    """The whole-scan phase fit of a counted scan; calibrated (nm) when both the scan step and the
    convergence semi-angle are given (mrad per detector px = the semi-angle / the BF radius)."""
    t0 = time.perf_counter()
    h, w = scan.scan.height, scan.scan.width
    # Any geometry: the sums taken here (events, CoM sums, the pattern) do not depend on it, and without
    # one LiveImages would keep every batch until settled.
    live = LiveImages(w, h, geometry or _ANY_GEOMETRY, auto_settle=False)
    for batch in scan_batches(scan):
        live.add(*batch)
    geometry = geometry if geometry is not None else live.estimate()
    grid = ParallaxBins.from_geometry(geometry, bins, DEFAULT_INNER)
    acc = ParallaxAccumulator(h, w, grid)
    for batch in scan_batches(scan):
        acc.add(*batch)
    snap = acc.snapshot()
    mask = np.ones((h, w), bool)
    if not keep_flyback and w > 1:
        mask[:, -1] = False  # the flyback column: recorded while the beam flies back, not the sample
    fit, reason, tcbf = None, None, None
    try:
        fit = fit_aberrations(snap, mask, max_side=MAX_SIDE)
        tcbf = tilt_corrected_bf(snap, fit.model_shifts(), mask).astype(np.float32)
        if scan_step_nm and convergence_mrad:
            fit = fit.calibrate(scan_step_nm, convergence_mrad / geometry.bf_radius)
    except (ParallaxFitError, np.linalg.LinAlgError, ValueError) as exc:
        fit, reason, tcbf = None, f"{type(exc).__name__}: {exc}"[:300], None
    a = live.arrays
    rotation = fit.rotation if fit is not None else None
    phase = idpc_from_sums(a.counts, a.sum_col, a.sum_row, geometry.cx, geometry.cy, (h, w), rotation, mask)
    weights = fit.weights if fit is not None else _weights(snap.counts, mask)
    return PhaseRecord(
        "ok" if fit is not None else "failed", reason, fit, geometry, grid.n, grid.inner, grid.k.copy(),
        np.asarray(weights, np.float64), bool(mask.sum() < mask.size), (h, w), tcbf,
        phase.astype(np.float32), time.perf_counter() - t0,
    )  # fmt: skip


def _weights(counts: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Electrons per bin over the used positions (for a failed fit's record)."""
    return counts[mask.ravel()].sum(axis=0, dtype=np.float64)


def _finite(v: float) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None  # JSON has no NaN


# ------------------------------------------------------------------------------------------------ HDF5
def write_phase(f: h5py.File, rec: PhaseRecord) -> None:
    """Add the ``/phase`` group (module docstring) to an HDF5 file open for writing; refuses an existing one."""
    if PHASE_GROUP in f:
        raise ValueError(f"the file already has /{PHASE_GROUP}: nothing is replaced")
    g = f.create_group(PHASE_GROUP)
    attrs = {
        "status": rec.status, "code_version": rec.code_version, "created_time": time.time(),
        "bins": rec.bins, "bins_kept": int(len(rec.k)), "inner": rec.inner,
        "geometry": np.array(_geometry_values(rec.geometry)), "flyback_masked": rec.flyback_masked,
        "scan_shape": np.array(rec.scan_shape, np.int64), "seconds": float(rec.seconds),
    }  # fmt: skip
    if rec.reason:
        attrs["reason"] = rec.reason
    if rec.fit is not None:
        fit = rec.fit
        for name in _VALUES:
            attrs[name], attrs[f"{name}_err"] = float(getattr(fit, name)), float(getattr(fit, f"{name}_err"))
        attrs.update(
            residual_rms=fit.residual_rms(), units=fit.units, calibrated=fit.calibrated, positions=fit.positions,
            matrix=np.asarray(fit.matrix, np.float64), offset=np.asarray(fit.offset, np.float64),
        )  # fmt: skip
        if fit.calibrated:
            attrs.update(scan_step_nm=fit.scan_step_nm, mrad_per_px=fit.mrad_per_px)
        g.create_dataset("shifts", data=np.asarray(fit.measured, np.float64))
    for key, value in attrs.items():
        g.attrs[key] = value
    g.create_dataset("k", data=np.asarray(rec.k, np.float64))
    g.create_dataset("weights", data=np.asarray(rec.weights, np.float64))
    if rec.tcbf is not None:
        g.create_dataset("tcbf", data=np.asarray(rec.tcbf, np.float32), compression="gzip")
    g.create_dataset("idpc", data=np.asarray(rec.idpc, np.float32), compression="gzip")


def read_phase(path: str | Path) -> PhaseRecord | None:
    """The scan file's ``/phase`` group as a PhaseRecord, or None when it has none."""
    with h5py.File(path, "r") as f:
        if PHASE_GROUP not in f:
            return None
        g = f[PHASE_GROUP]
        a = {key: plain(value) for key, value in g.attrs.items()}
        k, weights = np.asarray(g["k"]), np.asarray(g["weights"])
        fit = None
        if a["status"] == "ok":
            fit = AberrationFit(
                *(float(a[n]) for name in _VALUES for n in (name, f"{name}_err")),
                matrix=np.asarray(a["matrix"]), offset=np.asarray(a["offset"]), k=k,
                measured=np.asarray(g["shifts"]), weights=weights, positions=int(a["positions"]),
                units=str(a.get("units", PX_UNITS)), calibrated=bool(a.get("calibrated", False)),
            )  # fmt: skip
            if fit.calibrated:
                fit = replace(fit, scan_step_nm=float(a["scan_step_nm"]), mrad_per_px=float(a["mrad_per_px"]))
        return PhaseRecord(
            str(a["status"]), a.get("reason"), fit, LiveGeometry(*(float(v) for v in a["geometry"])),
            int(a["bins"]), float(a["inner"]), k, weights, bool(a["flyback_masked"]),
            tuple(int(v) for v in a["scan_shape"]), np.asarray(g["tcbf"]) if "tcbf" in g else None,
            np.asarray(g["idpc"]), float(a["seconds"]), int(a["code_version"]),
        )  # fmt: skip


def _geometry_values(g: LiveGeometry) -> list[float]:
    """[cx, cy, bf_radius, adf_inner, adf_outer], LiveGeometry's order."""
    return [float(g.cx), float(g.cy), float(g.bf_radius), float(g.adf_inner), float(g.adf_outer)]
