"""The stream's phase fit of a verified scan, in its file and the catalogue: the whole scan's parallax fit
(counting.phase.record, the live view's code), calibrated with the microscope's metadata in the file when
it is there (tasks.analysis.calibration, as the analysis reads it), added to the scan's HDF5 as ``/phase``
by the same checked-copy, staged, never-overwrite replacement the microscope's metadata uses
(counting.storage.amend; the new stop record staged before the file changes, streaming.protocol.staged), and
handed to the catalogue as an analysis of kind "stream-phase".

A failed fit (too few positions) is still written and recorded, with status failed and its reason; a file
that cannot take the group (changed since written, already has one, unreadable) keeps its content and the
outcome says why. Never raises for the scan's data: a scan without its phase fit is still a scan.

Plain code (no Prefect); the session's task is tasks.steps.phase.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from catalogue.recorder import Recorder
from counting.errors import PermanentError
from counting.phase.bins import DEFAULT_BINS, DEFAULT_INNER
from counting.phase.fit import MAX_SIDE
from counting.phase.record import CODE_VERSION, PHASE_GROUP, PhaseRecord, phase_of_scan, write_phase
from counting.sparse import SparseFormatError, read_counted_scan
from counting.storage.amend import amend_scan_file
from streaming.protocol.record import ScanRecord, record_path
from streaming.protocol.staged import commit_pending_record, pending_record_path, resolve_pending_record
from tasks.analysis.calibration import ScanCalibration, calibration_from_metadata

log = logging.getLogger(__name__)
KIND = "stream-phase"  # the catalogue's analysis kind


class PhaseFitError(PermanentError, ValueError):
    """The phase fit cannot be added to a scan file."""


@dataclass
class PhaseOutcome:
    """What became of a scan's phase fit: ``added`` to its file (its fit ok or failed: ``summary``), or
    not, with the ``reason``; the file's new checksum when added."""

    path: str
    added: bool
    summary: dict = field(default_factory=dict)  # PhaseRecord.summary(), empty when nothing was fitted
    params: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    reason: str | None = None
    sha256: str | None = None
    seconds: float = 0.0

    def to_json(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


def add_stream_phase(
    h5_path: str | Path, bins: int = DEFAULT_BINS, keep_flyback: bool = False
) -> PhaseOutcome:
    """Fit the scan's phase and add it to its file (``/phase``) and its stop record (``phase``), never out
    of step (see the module docstring)."""
    t0 = time.perf_counter()
    path = Path(h5_path)
    params = {"bins": bins, "inner": DEFAULT_INNER, "keep_flyback": keep_flyback, "max_side": MAX_SIDE}
    params["code_version"] = CODE_VERSION
    out = PhaseOutcome(str(path), False, params=params)
    try:
        resolve_pending_record(path)
        record = ScanRecord.load(record_path(path))
        scan = read_counted_scan(path)
    except (OSError, ValueError, KeyError, TypeError, SparseFormatError) as exc:
        out.reason = f"not fitted: {_line(exc)}"
        return _done(out, t0)
    cal = _calibration(scan.metadata.get("microscope"), scan.scan.height, scan.scan.width, keep_flyback)
    step_nm = cal.step_angstrom / 10.0 if cal.step_angstrom else None
    rec = phase_of_scan(scan, None, bins, keep_flyback, step_nm, cal.convergence_semiangle_mrad)
    del scan
    out.summary, out.calibration = rec.summary(), cal.as_dict()
    try:
        out.sha256 = _attach(path, rec, record, out.summary)
        out.added = True
    except (PhaseFitError, OSError) as exc:
        out.reason = f"not added to the file: {_line(exc)}"
        return _done(out, t0)
    try:
        commit_pending_record(path)
    except OSError as exc:  # the staged record stays: resolve_pending_record settles it later
        out.reason = f"added, but its stop record is still staged: {_line(exc)}"
    return _done(out, t0)


def _calibration(microscope: dict | None, height: int, width: int, keep_flyback: bool) -> ScanCalibration:
    """The analysis' calibration of the scan (its width as analysed: without the flyback column unless kept)."""
    analysed = width if keep_flyback or width < 2 else width - 1
    return calibration_from_metadata(microscope or None, height, analysed, not keep_flyback)


def _attach(path: Path, rec: PhaseRecord, record: ScanRecord, summary: dict) -> str:
    """Add the group by counting.storage.amend, the new stop record staged before the file changes; the new
    sha256."""

    def stage(digest: str) -> None:  # the new record, durable before the file changes
        replace(record, sha256=digest, extra={**record.extra, "phase": summary}).save(
            pending_record_path(path)
        )

    try:
        return amend_scan_file(
            path,
            lambda f: write_phase(f, rec),
            record.sha256,
            refuse=(PHASE_GROUP,),
            what="phase fit",
            before_replace=stage,
            error=PhaseFitError,
        )
    except (PhaseFitError, OSError):
        resolve_pending_record(path)  # a staged record the file never took is dropped
        raise


def _done(out: PhaseOutcome, t0: float) -> PhaseOutcome:
    out.seconds = round(time.perf_counter() - t0, 3)
    if out.reason:
        log.warning("%s: phase fit %s", Path(out.path).name, out.reason)
    return out


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def record_stream_phase(recorder: Recorder | None, outcome: PhaseOutcome | None) -> None:
    """Hand a scan's phase fit to the catalogue (an analysis of kind "stream-phase"; never waits)."""
    if recorder is None or outcome is None or not outcome.summary:
        return
    failed = outcome.summary.get("status") != "ok"
    recorder.analysis(
        outcome.path,
        outcome.params,
        {
            "phase": outcome.summary,
            "calibration": outcome.calibration,
            "in_file": outcome.added,  # False: the fit is here, the file could not take it (reason)
            "reason": outcome.reason,
            "seconds": outcome.seconds,
        },
        calibrated=bool(outcome.summary.get("calibrated")),
        kind=KIND,
        error=f"phase fit failed: {outcome.summary.get('reason')}" if failed else None,
    )
