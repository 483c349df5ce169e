"""The session's link to the scan catalogue: a background Recorder for the flow (plain calls, no Prefect
task: recording must never hold up a scan), the entries it records, and how the session ends.

Each verified scan is handed to the recorder as it is verified; each analysis of the session when it is
done (the ``AnalysisOutcome`` that ``postprocess_scan`` returns: the scan's path, the analysis parameters
and its summary, where fitted numbers such as defocus and rotation go). Code that records something else (a dark, the
microscope's metadata) calls ``catalogue.Catalogue`` directly, or this recorder's ``analysis``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from catalogue import CatalogueSettings, ScanEntry, SessionEntry, open_catalogue
from catalogue.entries import now_utc
from catalogue.recorder import PENDING_NAME, Recorder, RecorderReport
from streaming.protocol.record import ScanRecord, record_path
from tasks.acquisition.result import AnalysisOutcome, ScanResult
from tasks.analysis.reanalyse import summary_calibrated
from tasks.launch.plan import SessionPlan


def start_recorder(
    settings: CatalogueSettings,
    output_dir: Path,
    plan: SessionPlan,
    key: str,
    camera: str,
    backend: str,
    log: logging.Logger | logging.LoggerAdapter,
) -> Recorder | None:
    """A recorder for this session (None when catalogue.enabled is off); the session is its first entry,
    keyed by ``key`` (the flow run id: the session directory's name)."""
    if not settings.enabled:
        return None
    recorder = Recorder(
        lambda: open_catalogue(settings, output_dir), Path(plan.session_dir) / PENDING_NAME, log=log
    )
    recorder.session(
        SessionEntry(
            key=key,
            session_number=plan.session_id,
            camera=camera,
            backend=backend,
            scans_dir=str(plan.output_dir),
            started_at=now_utc(),
        )
    )
    return recorder


def record_scan(recorder: Recorder | None, result: ScanResult, session_key: str, dark: Path | None) -> None:
    """Hand a verified scan to the recorder (returns at once)."""
    if recorder is not None:
        recorder.scan(scan_entry(result, session_key, dark))


def scan_entry(result: ScanResult, session_key: str, dark: Path | None) -> ScanEntry:
    """What the catalogue records of a scan the session verified."""
    r = result.record
    if r.path and record_path(Path(r.path)).exists():  # as it is now: with the microscope's link, if added
        try:
            r = ScanRecord.load(record_path(Path(r.path)))
        except (OSError, ValueError, KeyError, TypeError):
            r = result.record
    reference = "none: zero dark, fitted thresholds" if dark is None else None
    return ScanEntry(
        r,
        session_key=session_key,
        verified=result.verified,
        dark=str(Path(dark).resolve()) if dark is not None else None,
        dark_reference=reference,
    )


def record_analyses(recorder: Recorder | None, futures: list[Any]) -> None:
    """Hand every finished session analysis (postprocess_scan's futures of AnalysisOutcome) to the
    recorder."""
    if recorder is None:
        return
    for future in futures:
        if not future.state.is_completed():
            continue
        done: AnalysisOutcome = future.result()
        recorder.analysis(
            done.scan,
            done.params,
            {**done.summary, "warnings": done.warnings, "timings": done.timings},
            images=done.images,
            calibrated=summary_calibrated(done.summary),
            kind="session",
        )


def finish_recording(
    recorder: Recorder | None, session_key: str, results: list[ScanResult], timeout: float
) -> RecorderReport | None:
    """Record how the session ended (from the exception in flight, if any) and close the recorder."""
    if recorder is None:
        return None
    error = sys.exc_info()[1]
    failed = [r for r in results if not r.verified]
    if error is not None:
        state, message = (
            "failed",
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
        )
    elif failed:
        state, message = "failed", f"{len(failed)} of {len(results)} scan(s) failed verification"
    else:
        state, message = "completed", f"{len(results)} scan(s) verified"
    recorder.end_session(session_key, state, message)
    return recorder.close(timeout)
