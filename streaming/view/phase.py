"""The view's live phase contrast: from the nodes' parallax sums and CoM sums (streaming.view.state), the
aberration fit (counting.phase.fit: defocus, astigmatism, rotation), the tilt-corrected bright field and
the integrated DPC phase, at most every live.phase_interval seconds during a scan and once at its end.

One worker thread: the intake never waits for a fit (the state's lock is held only to copy the sums),
and a failed fit is reported in the scan's phase record, never raised. The last scan column is the
flyback column (the camera always records it): not the sample, left out of the fit and the images.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from counting.live_images import LiveGeometry
from counting.phase.accumulate import ParallaxSnapshot
from counting.phase.fit import MAX_SIDE, AberrationFit, ParallaxFitError, fit_aberrations
from counting.phase.idpc import idpc_from_sums
from counting.phase.scale import microscope_scale
from counting.phase.shift_sum import tilt_corrected_bf
from streaming.view.parallax import same_bins, summed
from streaming.view.state import ScanView, ViewState

log = logging.getLogger(__name__)
# Live fits bin the positions to at most this many across (3x faster than the final's 128 at 256 x 256, the
# defocus within 0.4 % of it there): frequent, cheap; the final fit uses counting.phase.fit's default.
LIVE_MAX_SIDE = 64
# The phase thread runs this much nicer than the view's process: the fits take the CPU that counting and
# forwarding leave (the view shares its host with the aggregator; at its end a scan's final fit has the CPU).
# bench_live: the view's fits cost 0.25 of 1.96 CPU-ms per counted frame (on/off 0.90 on 2 busy cores).
PHASE_NICE = 10
FIT_FIELDS = (
    "defocus",
    "defocus_err",
    "astigmatism",
    "astigmatism_err",
    "astigmatism_angle",
    "astigmatism_angle_err",
    "rotation",
    "rotation_err",
)


@dataclass(frozen=True)
class PhaseInputs:
    """A copy of one scan's sums for the phase work: parallax (summed over its nodes) and CoM."""

    key: str
    final: bool
    parallax: ParallaxSnapshot
    counts: np.ndarray  # int64 (positions,) events per position, all nodes
    sum_col: np.ndarray
    sum_row: np.ndarray
    geometry: LiveGeometry
    nodes: int  # nodes whose parallax sums are in it
    number: int = 0  # the scan's number
    microscope: dict | None = None  # its file's /metadata/microscope attributes, once there


@dataclass(frozen=True)
class Calibration:
    """The microscope's scale, turning the fitted defocus and astigmatism into nm."""

    scan_step_nm: float
    mrad_per_px: float


def scale_of(inputs: PhaseInputs, default: Calibration | None) -> Calibration | None:
    """A scan's scale: its file's microscope metadata (step, convergence angle over the BF radius) when
    the session added them, else the configured one (live.phase_scan_step_nm, phase_mrad_per_px)."""
    scale = microscope_scale(inputs.microscope, inputs.parallax.width, inputs.geometry.bf_radius)
    return Calibration(*scale) if scale is not None else default


def collect(scan: ScanView, final: bool) -> PhaseInputs | None:
    """The inputs of a scan's phase work (called under the state's lock: copies only)."""
    with_parallax = [n for n in scan.nodes.values() if n.parallax is not None and n.arrays is not None]
    geometry = scan.geometry()
    if not with_parallax or geometry is None:
        return None
    bins = with_parallax[0].parallax.bins
    used = [n for n in with_parallax if same_bins(n.parallax.bins, bins)]  # one geometry's bins add up
    frames = np.zeros(scan.width * scan.height, np.int64)
    for n in used:
        frames += n.arrays.frames
    snapshot = ParallaxSnapshot(scan.height, scan.width, bins, summed([n.parallax for n in used]), frames)
    a = scan.merged()
    return PhaseInputs(
        scan.key, final, snapshot, a.counts.copy(), a.sum_col.copy(), a.sum_row.copy(), geometry, len(used),
        scan.number, scan.microscope,
    )  # fmt: skip


def sample_mask(height: int, width: int) -> np.ndarray:
    """bool (height, width): the sample's positions (all but the flyback column)."""
    mask = np.ones((height, width), bool)
    if width > 1:
        mask[:, -1] = False
    return mask


def compute(
    inputs: PhaseInputs, hint: float | None = None, calibration: Calibration | None = None
) -> tuple[AberrationFit | None, str | None, dict[str, np.ndarray]]:
    """(fit or None, why it failed or None, images): the fit (rotation branch nearest hint), the
    tilt-corrected BF (with a fit) and the iDPC phase (turned by the fit's rotation, else none)."""
    snap = inputs.parallax
    mask = sample_mask(snap.height, snap.width)
    images: dict[str, np.ndarray] = {}
    fit, error = None, None
    try:
        # Live fits are previews every live.phase_interval: binned to LIVE_MAX_SIDE, and not refined on
        # every position (that would raise the view's CPU per frame by a third: bench_live).
        side = MAX_SIDE if inputs.final else LIVE_MAX_SIDE
        fit = fit_aberrations(snap, mask, rotation_hint=hint, max_side=side, refine=inputs.final)
        images["tcbf"] = tilt_corrected_bf(snap, fit.model_shifts(), mask)
        if calibration is not None:
            fit = fit.calibrate(calibration.scan_step_nm, calibration.mrad_per_px)
    except (ParallaxFitError, np.linalg.LinAlgError, ValueError) as exc:
        fit, error = None, f"{type(exc).__name__}: {exc}"[:200]
    g, shape = inputs.geometry, (snap.height, snap.width)
    rotation = fit.rotation if fit is not None else None
    images["idpc"] = idpc_from_sums(
        inputs.counts, inputs.sum_col, inputs.sum_row, g.cx, g.cy, shape, rotation, mask
    )
    return fit, error, images


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None  # JSON has no NaN


def record(
    fit: AberrationFit | None,
    error: str | None,
    inputs: PhaseInputs,
    images: dict[str, np.ndarray],
    fits: int,
    seconds: float,
    last: dict,
) -> dict:
    """A scan's phase record for /api/state: the newest fit's numbers (a failed fit keeps the previous
    numbers, with its error), units: nm when the microscope's scale is known, else scan px per detector px
    and uncalibrated."""
    kept = (*FIT_FIELDS, "residual_px", "units", "calibrated", "uncalibrated", "scan_step_nm", "mrad_per_px")
    out = {k: last.get(k) for k in kept}
    out["positions"] = last.get("positions")
    if fit is not None:
        out.update({k: _finite(getattr(fit, k)) for k in FIT_FIELDS})
        out.update(
            residual_px=_finite(fit.residual_rms()),
            units=fit.units,  # nm, or counting.phase.fit.PX_UNITS
            calibrated=fit.calibrated,
            uncalibrated=not fit.calibrated,
            positions=fit.positions,
            scan_step_nm=fit.scan_step_nm,
            mrad_per_px=fit.mrad_per_px,
        )
    out.update(
        status="failed" if error else "ok",
        error=error,
        final=inputs.final,
        fits=fits,
        nodes=inputs.nodes,
        bins=inputs.parallax.bins.count,
        seconds=round(seconds, 3),
        images=sorted(set(images) | set(last.get("images", []))),  # served (a failed fit keeps the last)
    )
    return out


def lower_priority(by: int) -> int | None:
    """This thread's nice value raised by ``by`` (Linux: per thread); the new value, None where refused."""
    tid = threading.get_native_id()
    with contextlib.suppress(OSError, AttributeError):
        nice = min(19, os.getpriority(os.PRIO_PROCESS, tid) + by)
        os.setpriority(os.PRIO_PROCESS, tid, nice)
        return nice
    return None


class PhaseWorker:
    """Runs the phase work of the view's scans when due (ViewState.phase_due), in its own thread."""

    def __init__(
        self,
        state: ViewState,
        interval: float,
        calibration: Calibration | None = None,
        on_fit: Callable[[int, str, dict], None] | None = None,
    ) -> None:
        self.state, self.interval, self.calibration = state, interval, calibration
        self.on_fit = on_fit  # (scan number, key, record) after each fit: the aberration message
        self.failures = 0  # exceptions beyond a fit's own (a bug): reported in the scan's record
        self._done: dict[str, tuple[int, float | None]] = {}  # per scan: phase works, last fit's rotation
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stemstream-live-phase", daemon=True)

    def start(self) -> PhaseWorker:
        """Start the thread."""
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread (after the work in progress)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)

    def _run(self) -> None:
        lower_priority(PHASE_NICE)
        version = -1
        while not self._stop.is_set():
            version = self.state.wait(version, 0.1)
            for key, final in self.state.phase_due(self.interval):
                if self._stop.is_set():
                    return
                self.run_once(key, final)

    def run_once(self, key: str, final: bool) -> None:
        """The phase work of one scan now; whatever goes wrong ends up in its record."""
        inputs = self.state.phase_take(key, lambda scan: collect(scan, final))
        if inputs is None:
            return
        t0 = time.perf_counter()
        scan = self.state.scan(key)
        last = (scan.phase if scan is not None else None) or {}
        fits, hint = self._done.get(key, (0, None))
        try:
            fit, error, images = compute(inputs, hint, scale_of(inputs, self.calibration))
        except Exception as exc:  # a bug, not bad data: reported, the worker goes on
            self.failures += 1
            log.exception("live phase of scan %s failed", key[:40])
            fit, error, images = None, f"{type(exc).__name__}: {exc}"[:200], {}
        self._done.pop(key, None)
        while len(self._done) >= 256:  # bounded: the oldest scans' are forgotten
            self._done.pop(next(iter(self._done)))
        self._done[key] = (fits + 1, fit.rotation if fit is not None else hint)
        seconds = time.perf_counter() - t0
        rec = record(fit, error, inputs, images, fits + 1, seconds, last)
        self.state.set_phase(key, rec, images, inputs.parallax.seen())
        if self.on_fit is not None:
            try:
                self.on_fit(inputs.number, key, rec)
            except Exception:  # noqa: BLE001 (publishing a fit never ends the worker)
                log.exception("publishing the phase fit of scan %s failed", key[:40])
