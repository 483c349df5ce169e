"""The session flow: allocate nodes, launch node streamers, arm the aggregator, acquire N scans, verify and
analyse each, release everything on every way out. Also the multi-scan experiment flow."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import time
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from prefect import flow, get_run_logger
from prefect.runtime import flow_run as current_run
from prefect.states import Cancelled, Completed, Failed
from pydantic import Field

from counting.dark import dark_reference
from counting.geometry import ScanShape
from counting.simulator import SimulatedCamera, SimulatorConfig
from flows.settings import SessionSettings, Settings, load_settings, write_settings_file
from flows.summary import summary_row
from tasks.acquisition.camera import CameraRun, ScanTimeout, scripted_scans, simulated_scans
from tasks.acquisition.catalogue_link import finish_recording, record_analyses, record_scan, start_recorder
from tasks.acquisition.live import live_link, live_url
from tasks.acquisition.monitor import latest_state
from tasks.acquisition.result import ScanResult
from tasks.darks import INSTRUMENT, session_dark, simulated_camera_label
from tasks.launch.backends import (
    LocalAggregator,
    LocalNodes,
    SlurmNodes,
    SshAggregator,
    read_state,
    record_state,
)
from tasks.launch.plan import SessionPlan, free_ports, local_addresses
from tasks.launch.processes import carrying
from tasks.nersc.batch import walltime_seconds
from tasks.nersc.sfapi import AllocationCancelled
from tasks.steps.metadata import attach_microscope_metadata
from tasks.steps.session import (
    acquire_scan,
    allocate_nodes,
    arm_aggregator,
    cancel_requested,
    node_lost_event,
    postprocess_scan,
    release,
    summarise,
    verify_scan_file,
    wait_nodes_ready,
)


def _log_to_run(message: str) -> None:
    """Log to the current run (the allocate-nodes task: its log shows in the flow run)."""
    get_run_logger().info(message)


def make_backends(settings: Settings):
    """The node and aggregator backends the settings ask for (the one place the choice is made)."""
    if settings.session.backend == "local":
        return LocalNodes(), LocalAggregator()
    return (
        SlurmNodes(settings.sfapi, settings.slurm, on_wait=_log_to_run, cancelled=cancel_requested),
        SshAggregator(settings.ssh, settings.session.aggregator_remote_command),
    )


def _session_id() -> int:
    run_id = str(current_run.get_id() or os.getpid())
    return int(hashlib.sha256(run_id.encode()).hexdigest(), 16) % 100000


def _session_settings(
    settings: Settings, dark: Path | None, nodes: int, session_id: int, simulated: bool
) -> Settings:
    """The settings every process of this session runs with: the user's, plus this session's node count,
    id and dark reference, and (a local session with the simulated camera) free loopback addresses; an
    instrument session listens where streaming.receivers says, where the camera sends."""
    streaming = {"n_nodes": nodes, "session_id": session_id}
    if settings.session.backend == "local" and simulated:  # its own camera: any free loopback ports
        ports = free_ports(4)  # distinct: receivers, nodes, monitor, the live view's intake
        streaming |= local_addresses(ports[:3])
        streaming["live"] = settings.streaming.live.model_copy(update={"bind": f"tcp://127.0.0.1:{ports[3]}"})
    counting = {"dark": dark} if dark is not None else {}
    return settings.model_copy(
        update={
            "streaming": settings.streaming.model_copy(update=streaming),
            "counting": settings.counting.model_copy(update=counting),
        }
    )


def _plan(settings: Settings, session_dir: Path, max_scans: int | None = None) -> SessionPlan:
    """Where everything goes; writes the session's settings file where its processes read it."""
    scans = settings.session.scan_dir or session_dir / "scans"
    st = settings.streaming
    if settings.session.backend == "local":
        settings_file = session_dir / "settings.json"
    else:  # the nodes read it from the scan directory, which they share with this machine
        settings_file = scans / ".stemstream" / f"settings-{st.session_id:05d}.json"
    write_settings_file(settings, settings_file)
    return SessionPlan(
        session_id=st.session_id,
        session_dir=session_dir,
        output_dir=scans,
        settings_file=settings_file,
        streaming=st,
        nodes_connect=st.nodes_connect or st.nodes_bind,
        monitor_connect=st.monitor_connect or st.monitor_bind or "",
        max_scans=max_scans,
    )


def _simulated_dark(session_dir: Path, seed: int) -> Path:
    """The simulated camera's dark reference, from dark frames, as on the instrument before a session."""
    cam = SimulatedCamera(SimulatorConfig(ScanShape(1, 1), seed=seed))
    path = session_dir / "dark.npy"
    np.save(path, dark_reference(cam.dark_frames(100)))
    return path


def _cleanup_hook(flow, flow_run, state) -> None:
    """On failure, crash or cancellation: stop whatever the state file says is still running, with the
    backends rebuilt from the session's own settings file."""
    session_dir = load_settings().output_dir / "sessions" / str(flow_run.id)
    info = read_state(session_dir)
    settings = load_settings(Path(info["settings_file"])) if info.get("settings_file") else load_settings()
    for token in info.get("process_tokens", []):  # local processes, by the token in their environment
        for pid in carrying(token):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    if info.get("aggregator") == "SshAggregator" and info.get("aggregator_pid"):
        from tasks.ssh import stop_remote_process

        with contextlib.suppress(Exception):  # best effort: the hook must not hide the run's own failure
            stop_remote_process(settings.ssh, int(info["aggregator_pid"]))
    if info.get("job_id") and info.get("backend") == "nersc":
        from tasks.nersc.sfapi import SfapiAllocator

        with SfapiAllocator(settings.sfapi) as allocator:
            allocator.cancel(info["job_id"])


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
):
    """One streaming session: scans counted, written, verified and analysed while it runs.

    camera "simulated" plays n_scans scans of one shape (each with its own data); camera "instrument"
    counts every scan the receivers deliver, of any shape and at any pace, until n_scans scans (if not 0),
    the duration, or a cancellation from the UI. Each scan is verified against its own shape.

    Failure policy: a scan that is incomplete is a warning, one below min_completeness or that otherwise
    fails verification is reported and the session goes on (the session ends Failed, and alerts). A node
    streamer lost mid-scan costs only the frames it held: the aggregator sends its share to the others at
    once, the scan in flight is written as soon as they are done (its missing frames marked) and verified,
    and the session continues on the remaining nodes (logged, a ``stemstream.node.lost`` event that the
    failure alert also sends). A lost writer host or aggregator, or a scan file that cannot be written,
    ends the session at once.

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
    """
    logger = get_run_logger()
    settings = load_settings(
        session={
            "backend": backend,
            "nodes": nodes,
            "postprocess": postprocess,
            "min_completeness": min_completeness,
        }
    )
    s = settings.session
    simulated = camera == "simulated"
    run_id = str(current_run.get_id() or f"local-{os.getpid()}")
    session_dir = (settings.output_dir / "sessions" / run_id).resolve()
    session_dir.mkdir(parents=True, exist_ok=True)
    # counting.dark, else the newest stored dark of this camera (tasks.darks), else the simulator's own
    dark_camera = simulated_camera_label(settings.simulator.seed) if simulated else INSTRUMENT
    dark, old_dark = session_dark(settings.counting.dark, settings.dark, settings.output_dir, dark_camera)
    if old_dark:
        logger.warning(old_dark)
    if dark is None and simulated:
        dark = _simulated_dark(session_dir, settings.simulator.seed)
    if dark is None:
        logger.warning("no dark reference (counting.dark): counting with a zero dark and fitted thresholds")
    settings = _session_settings(settings, dark, s.nodes, _session_id(), simulated)
    plan = _plan(settings, session_dir)
    node_backend, aggregator = make_backends(settings)
    record_state(
        plan,
        backend=s.backend,
        flow_run=run_id,
        settings_file=str(plan.settings_file),
        scans_dir=str(plan.output_dir),
    )
    if not simulated:
        scans = []
    elif script:
        scans = scripted_scans(Path(script), settings.simulator)
        n_scans = len(scans)
    else:
        scans = simulated_scans(n_scans, scan_width, scan_height, dose, settings.simulator, first_scan)
    logger.info(
        "session %05d: %s camera, %s on %d node(s), backend %s; files in %s",
        plan.session_id,
        camera,
        _simulated(scans, script) if simulated else _limits(n_scans, duration),
        s.nodes,
        s.backend,
        plan.output_dir,
    )
    results: list[ScanResult] = []
    failures: list[str] = []
    node_lost = ""
    lost_nodes: set[str] = set()  # node streamers lost so far: the session goes on without them
    cancelled = False
    analyses = []
    player: CameraRun | None = None
    seen = {str(p) for p in plan.output_dir.glob("*.json")} if plan.output_dir.exists() else set()
    recorder = start_recorder(
        settings.catalogue, settings.output_dir, plan, run_id, camera, s.backend, logger
    )
    try:
        # Its timeout above the job's own start wait, which ends first, with Slurm's reason, job cancelled.
        wait = settings.sfapi.submit_timeout + settings.sfapi.start_timeout + 300
        allocate_nodes.with_options(timeout_seconds=wait)(node_backend, plan)
        if isinstance(node_backend, LocalNodes) and node_backend.group is not None:
            record_state(
                plan,
                local_pids=[c.pid for c in node_backend.group.children],
                process_tokens=[node_backend.group.token],
            )
        arm_aggregator(aggregator, plan)
        if isinstance(aggregator, LocalAggregator) and aggregator.group is not None:
            tokens = [g.token for g in (getattr(node_backend, "group", None), aggregator.group) if g]
            record_state(plan, process_tokens=tokens)
        wait_nodes_ready(plan, node_backend, aggregator, s.nodes_ready_timeout)
        ends = _session_end(settings, duration) if not simulated else None
        record_state(plan, ready=True, receivers=plan.receivers, ends_in=_remaining(ends))
        logger.info("session ready: receivers %s", " ".join(plan.receivers))
        if simulated:
            player = CameraRun(scans, plan.receivers, frame_rate or None, s.scan_timeout).start()
        k = 0
        while not n_scans or k < n_scans:
            expect = scans[k] if simulated else None
            deadline = time.monotonic() + s.scan_timeout + expect.pause if simulated else ends
            result = acquire_scan(
                plan,
                node_backend,
                aggregator,
                seen,
                expect,
                player,
                deadline,
                lost_node_wait=settings.streaming.writer_deadline + 30.0,
                index=k,
                known_lost=lost_nodes,
            )
            if result is None:  # the duration is over, or the run is being cancelled
                cancelled = cancel_requested()
                if simulated and not cancelled:
                    raise ScanTimeout(
                        f"scan {expect.scan_number}: no counted file within {s.scan_timeout:g} s"
                    )
                break
            k += 1
            r = result.record
            path = r.path or ""
            if path and settings.microscope.dir is not None:  # before verification: it checks the final file
                attach_microscope_metadata(path, settings.microscope)
            verified = verify_scan_file(
                path, r.scan_width, r.scan_height, s.min_completeness, return_state=True
            )
            v = verified.data if hasattr(verified, "data") else None
            if verified.is_failed():
                failures.append(verified.message)
            elif r.completeness < 1.0:
                logger.warning(
                    "scan %d: %.2f %% complete (above min_completeness %.2f %%): kept, %d incomplete frame(s) "
                    "marked in its sector_masks",
                    r.scan_number,
                    100 * r.completeness,
                    100 * s.min_completeness,
                    r.frames_incomplete,
                )
            result.verified = verified.is_completed()
            result.verify_sha256 = getattr(v, "sha256", None)
            results.append(result)
            record_scan(recorder, result, run_id, dark)  # in the background: never waits on the database
            if s.postprocess and verified.is_completed():
                analyses.append(
                    postprocess_scan.submit(path, str(session_dir / "analysis"), settings.analysis)
                )
            if result.node_failure:
                node_lost = _node_lost_message(result, s.nodes - len(lost_nodes))
                logger.error(node_lost)
                node_lost_event(result.record.scan_number, sorted(lost_nodes))
        for fut in analyses:
            fut.wait()
        record_analyses(recorder, analyses)
    except AllocationCancelled:  # cancelled while the Slurm job waited to start: the job is cancelled too
        cancelled = True
    finally:
        if player is not None:
            player.stop()
        refused = _refused_report(plan)
        try:
            release(node_backend, aggregator)
        finally:
            finish_recording(recorder, run_id, results, settings.catalogue.flush_timeout)
    summarise([summary_row(r) | live_link(live_url(session_dir), r.record.path or "") for r in results])
    if refused:
        logger.warning(refused)
    failed_analyses = [f for f in analyses if f.state.is_failed()]
    if failures or failed_analyses:
        return Failed(
            message=f"{len(failures)} of {len(results)} scan(s) failed verification"
            + (f", {len(failed_analyses)} analysis step(s) failed" if failed_analyses else "")
            + (": " + " | ".join(failures) if failures else ""),
            data=results,
        )
    done = "counted, verified and analysed" if s.postprocess else "counted and verified"
    if cancelled:
        return Cancelled(message=f"cancelled; {len(results)} scan(s) {done}", data=results)
    return Completed(message=f"{len(results)} scan(s) {done}", data=results)


def _simulated(scans: list, script: str) -> str:
    """What the simulated camera plays, in words."""
    shapes = sorted({f"{s.config.scan.width}x{s.config.scan.height}" for s in scans})
    return f"{len(scans)} scan(s) of {', '.join(shapes)}" + (f" from {script}" if script else "")


def _limits(n_scans: int, duration: float) -> str:
    """How an instrument session ends, in words."""
    limits = [f"after {n_scans} scan(s)"] if n_scans else []
    limits += [f"after {duration:g} s"] if duration else []
    return "counting every scan until " + (" or ".join(limits) or "the allocation ends or it is cancelled")


def _session_end(settings: Settings, duration: float) -> float | None:
    """When an instrument session stops waiting for scans (monotonic), or None: until cancelled."""
    if duration:
        return time.monotonic() + duration
    if settings.session.backend == "nersc":  # the allocation's walltime, less a minute to write and release
        return time.monotonic() + max(walltime_seconds(settings.slurm.walltime) - 60, 60)
    return None


def _remaining(ends: float | None) -> float | None:
    return None if ends is None else round(ends - time.monotonic(), 1)


def _refused_report(plan: SessionPlan) -> str:
    """Scans that arrived before the session was ready, as the aggregator counted them ("" if none)."""
    try:
        state = latest_state(plan.monitor_connect, plan.monitor_curve(), timeout=3.0)
    except Exception:  # best effort: the aggregator may already be gone after a failure
        return ""
    if state is None or not state.refused:
        return ""
    scans = ", ".join(f"{n} ({k} sectors)" for n, k in sorted(state.refused_scans.items()))
    return f"{state.refused} sector(s) refused: scan(s) {scans} arrived before the session was ready"


def _node_lost_message(result: ScanResult, left: int) -> str:
    """What a node loss cost, and that the session goes on with the others."""
    r = result.record
    return (
        f"a node streamer was lost during scan {r.scan_number}; the session continues on the {left} other "
        f"node(s), which now get its share of the frames. Scan {r.scan_number} was written {r.status}: "
        f"{r.frames_incomplete} of {r.expected_frames} frames incomplete (the frames it held), marked in its "
        f"sector_masks.\n{result.node_failure}"
    )


@flow(name="stemstream-experiment")
def experiment(
    doses: list[float] = (100.0, 200.0, 400.0),  # a tuple: defaults must not be shared mutable lists
    scans_per_dose: Annotated[int, Field(ge=1)] = 2,
    scan_width: Annotated[int, Field(ge=1, le=4096)] = 64,
    scan_height: Annotated[int, Field(ge=1, le=4096)] = 64,
    backend: Literal["local", "nersc"] = _SESSION["backend"].default,
):
    """A multi-scan experiment: a dose series, one session (allocation) per dose, scans numbered on.

    Args:
        doses: Electrons per frame, one session per dose.
        scans_per_dose: Simulated scans per dose.
        scan_width: Scan width in positions.
        scan_height: Scan height in positions.
        backend: local = every process on this machine; nersc = realtime nodes through the Superfacility API.
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
