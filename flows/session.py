"""The session flow: allocate nodes, launch node streamers, arm the aggregator, acquire N scans, verify and
analyse each, release everything on every way out (flows/session_run.py, step by step). Also the cleanup
hook for a run that crashed or was cancelled, and the multi-scan experiment flow."""

from __future__ import annotations

import os
from typing import Annotated, Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run as current_run
from prefect.states import Completed, Failed
from pydantic import Field

from flows.session_run import SessionRun, session_dir_of
from flows.session_setup import SessionRequest, make_backends, run_settings
from flows.settings import SessionSettings
from tasks.launch.backends import release_recorded
from tasks.launch.state import SessionState


def _cleanup_hook(flow, flow_run, state) -> None:
    """On failure, crash or cancellation: stop whatever the session's state file says is still running,
    through backends of the kind it records, with the settings the run was given (its parameters)."""
    params = flow_run.parameters or {}
    settings = run_settings(params.get("settings_file"), backend=params.get("backend"))
    recorded = SessionState.load(session_dir_of(settings, str(flow_run.id)))
    nodes, aggregator = make_backends(recorded.backend or settings.session.backend, settings)
    release_recorded(recorded, nodes, aggregator)


_SESSION = SessionSettings.model_fields


@flow(
    name="stemstream-session",
    on_failure=[_cleanup_hook],
    on_crashed=[_cleanup_hook],
    on_cancellation=[_cleanup_hook],
)
def session(
    camera: Literal["simulated", "instrument"] = "simulated",
    n_scans: Annotated[int, Field(ge=0, le=100000)] = 3,
    duration: Annotated[float, Field(ge=0)] = 0.0,
    scan_width: Annotated[int, Field(ge=1, le=4096)] = 64,
    scan_height: Annotated[int, Field(ge=1, le=4096)] = 64,
    dose: Annotated[float, Field(ge=0, le=20000)] = 200.0,
    nodes: Annotated[int, Field(ge=1, le=4096)] = _SESSION["nodes"].default,
    backend: Literal["local", "nersc"] = _SESSION["backend"].default,
    first_scan: Annotated[int, Field(ge=0)] = 1,
    postprocess: bool = _SESSION["postprocess"].default,
    min_completeness: Annotated[float, Field(ge=0, le=1)] = _SESSION["min_completeness"].default,
    frame_rate: Annotated[float, Field(ge=0, le=100000)] = 0.0,
    script: str = "",
    settings_file: str = "",
):
    """One streaming session: scans counted, written, verified and analysed while it runs.

    camera "simulated" plays n_scans scans of one shape (each with its own data); camera "instrument" counts
    every scan the receivers deliver, of any shape and at any pace, until n_scans scans (if not 0), the
    duration, or a cancellation from the UI. Each scan is verified against its own shape. Failure policy:
    flows/session_run.py (an incomplete scan is a warning, a failed one fails the session at its end, a lost
    node streamer costs its frames in flight and the session goes on; a lost writer or aggregator ends it).

    Args:
        camera: simulated = the flow plays scans from the simulated camera (demo, self-tests); instrument =
            the flow triggers nothing and counts every scan the receivers deliver.
        n_scans: Scans to count; 0 = no limit (an instrument session then runs for its duration).
        duration: Instrument camera: seconds the session counts scans; 0 = the allocation's walltime
            (NERSC) or until cancelled (local).
        scan_width: Simulated camera: scan width in positions, the flyback column included.
        scan_height: Simulated camera: scan height in positions.
        dose: Simulated camera: mean electrons per frame.
        nodes: Node streamers, one per allocated node.
        backend: local = every process on this machine; nersc = realtime nodes through the Superfacility
            API, the aggregator over SSH.
        first_scan: Simulated camera: the number of its first scan.
        postprocess: py4DSTEM analysis of every verified scan.
        min_completeness: Verification fails below this fraction of sectors; below 1.0 a scan is a warning.
        frame_rate: Simulated camera: frames/s in real time, dropping (and counting) what the pipeline
            cannot take; 0 = the camera waits for the pipeline.
        script: Simulated camera: a JSON scan script to play instead (shapes, scan numbers, pauses, seeds;
            see stemstream send --script); empty = n_scans scans of scan_width x scan_height.
        settings_file: Settings to run with (JSON, as `stemstream` writes them); empty = the environment
            and stemstream.toml. The parameters above win over it.
    """
    session_values = dict(
        backend=backend, nodes=nodes, postprocess=postprocess, min_completeness=min_completeness
    )
    settings = run_settings(settings_file, **session_values)
    request = SessionRequest(
        camera, n_scans, duration, scan_width, scan_height, dose, first_scan, frame_rate, script
    )
    run_id = str(current_run.get_id() or f"local-{os.getpid()}")
    return SessionRun(settings, request, run_id, get_run_logger()).run()


@flow(name="stemstream-experiment")
def experiment(
    doses: list[float] = (100.0, 200.0, 400.0),  # a tuple: defaults must not be shared mutable lists
    scans_per_dose: Annotated[int, Field(ge=1)] = 2,
    scan_width: Annotated[int, Field(ge=1, le=4096)] = 64,
    scan_height: Annotated[int, Field(ge=1, le=4096)] = 64,
    backend: Literal["local", "nersc"] = _SESSION["backend"].default,
    settings_file: str = "",
):
    """A multi-scan experiment: a dose series, one session (allocation) per dose, scans numbered on.

    Args:
        doses: Electrons per frame, one session per dose.
        scans_per_dose: Simulated scans per dose.
        scan_width: Scan width in positions.
        scan_height: Scan height in positions.
        backend: local = every process on this machine; nersc = realtime nodes through the Superfacility API.
        settings_file: Settings to run every session with (see the session flow); empty = the environment
            and stemstream.toml.
    """
    states = []
    for i, dose in enumerate(doses):
        states.append(
            session(
                n_scans=scans_per_dose,
                scan_width=scan_width,
                scan_height=scan_height,
                dose=dose,
                backend=backend,
                first_scan=1 + i * scans_per_dose,
                settings_file=settings_file,
                return_state=True,
            )
        )
    failed = [s for s in states if not s.is_completed()]
    if failed:
        return Failed(
            message=f"{len(failed)} of {len(states)} session(s) failed: "
            + " | ".join(str(s.message) for s in failed)
        )
    return Completed(message=f"{len(states)} session(s), {len(states) * scans_per_dose} scan(s)")
