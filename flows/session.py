"""The session flow: allocate nodes, launch node streamers, arm the aggregator, acquire N scans, verify and
analyse each, release everything on every way out. Also the multi-scan experiment flow."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from prefect import flow, get_run_logger
from prefect.runtime import flow_run as current_run
from prefect.states import Completed, Failed
from pydantic import Field

from counting.dark import dark_reference
from counting.geometry import ScanShape
from counting.simulator import SimulatedCamera, SimulatorConfig
from flows.settings import Settings, given, load_settings, write_settings_file
from flows.summary import summary_row
from tasks.backends import LocalAggregator, LocalNodes, SlurmNodes, SshAggregator, read_state, record_state
from tasks.plan import SessionPlan, local_addresses
from tasks.scan_result import ScanResult
from tasks.steps import (
    acquire_scan,
    allocate_nodes,
    arm_aggregator,
    postprocess_scan,
    release,
    summarise,
    verify_scan_file,
    wait_nodes_ready,
)


def make_backends(settings: Settings):
    """The node and aggregator backends the settings ask for (the one place the choice is made)."""
    if settings.session.backend == "local":
        return LocalNodes(), LocalAggregator()
    return (
        SlurmNodes(settings.sfapi, settings.slurm),
        SshAggregator(settings.ssh, settings.session.aggregator_remote_command),
    )


def _session_id() -> int:
    run_id = str(current_run.get_id() or os.getpid())
    return int(hashlib.sha256(run_id.encode()).hexdigest(), 16) % 100000


def _session_settings(
    settings: Settings, session_dir: Path, dark: Path | None, nodes: int, session_id: int
) -> Settings:
    """The settings every process of this session runs with: the user's, plus this session's addresses,
    node count, id and dark reference."""
    streaming = {"n_nodes": nodes, "session_id": session_id}
    if settings.session.backend == "local":
        streaming |= local_addresses()
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
    local = list(info.get("local_pids", []))
    if info.get("aggregator") == "LocalAggregator" and info.get("aggregator_pid"):
        local.append(info["aggregator_pid"])
    for pid in local:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    if info.get("aggregator") == "SshAggregator" and info.get("aggregator_pid"):
        from tasks.remote import stop_remote_process

        with contextlib.suppress(Exception):  # best effort: the hook must not hide the run's own failure
            stop_remote_process(settings.ssh, int(info["aggregator_pid"]))
    if info.get("job_id") and info.get("backend") == "nersc":
        from tasks.sfapi import SfapiAllocator

        with SfapiAllocator(settings.sfapi) as allocator:
            allocator.cancel(info["job_id"])


@flow(
    name="stemstream-session",
    on_failure=[_cleanup_hook],
    on_crashed=[_cleanup_hook],
    on_cancellation=[_cleanup_hook],
)
def session(
    n_scans: Annotated[int, Field(ge=1, le=10000)] = 3,
    scan_width: Annotated[int, Field(ge=1, le=4096)] = 64,
    scan_height: Annotated[int, Field(ge=1, le=4096)] = 64,
    dose: Annotated[float, Field(ge=0, le=20000)] = 200.0,
    nodes: int | None = None,
    backend: Literal["local", "nersc"] | None = None,
    first_scan: int = 1,
    simulate: bool = True,
    postprocess: bool | None = None,
    min_completeness: float | None = None,
    frame_rate: Annotated[float | None, Field(gt=0, le=100000)] = None,
):
    """One streaming session: N scans counted, written, verified and analysed while it runs.

    frame_rate: the simulated camera's frames/s in real time, as on the instrument: what the pipeline cannot
    take in time is dropped by the receivers, counted and marked. None: the camera waits for the pipeline.

    Failure policy: a scan that is incomplete or fails verification is reported and the session goes on
    (the session ends Failed, and alerts, if any scan failed). A node streamer lost mid-scan ends the
    session: the scan in flight is still written by the writer's deadline and verified, so its missing
    frames are on record, then everything is released (the aggregator gives every node a fixed share of
    each scan, so later scans would lose that share too). A lost writer host or aggregator, or a scan file
    that cannot be written, ends the session at once.
    """
    logger = get_run_logger()
    overrides = given(
        backend=backend, nodes=nodes, postprocess=postprocess, min_completeness=min_completeness
    )
    settings = load_settings(session=overrides) if overrides else load_settings()
    s = settings.session
    run_id = str(current_run.get_id() or f"local-{os.getpid()}")
    session_dir = (settings.output_dir / "sessions" / run_id).resolve()
    session_dir.mkdir(parents=True, exist_ok=True)
    dark = _simulated_dark(session_dir, settings.simulator.seed) if simulate else settings.counting.dark
    settings = _session_settings(settings, session_dir, dark, s.nodes, _session_id())
    plan = _plan(settings, session_dir)
    node_backend, aggregator = make_backends(settings)
    record_state(plan, backend=s.backend, flow_run=run_id, settings_file=str(plan.settings_file))
    logger.info(
        "session %05d: %d scan(s) of %dx%d on %d node(s), backend %s; files in %s",
        plan.session_id,
        n_scans,
        scan_width,
        scan_height,
        s.nodes,
        s.backend,
        plan.output_dir,
    )
    results: list[ScanResult] = []
    failures: list[str] = []
    node_lost = ""
    analyses = []
    try:
        allocate_nodes(node_backend, plan)
        if isinstance(node_backend, LocalNodes) and node_backend.group is not None:
            record_state(plan, local_pids=[c.pid for c in node_backend.group.children])
        arm_aggregator(aggregator, plan)
        wait_nodes_ready(plan, node_backend, aggregator, s.nodes_ready_timeout)
        for k in range(n_scans):
            number = first_scan + k
            result = acquire_scan(
                plan,
                node_backend,
                aggregator,
                number,
                scan_width,
                scan_height,
                dose,
                settings.simulator.seed,
                s.scan_timeout,
                simulate,
                frame_rate,
                lost_node_wait=settings.streaming.writer_deadline + 30.0,
            )
            path = result.record.path or ""
            verified = verify_scan_file(path, scan_width, scan_height, s.min_completeness, return_state=True)
            v = verified.data if hasattr(verified, "data") else None
            if verified.is_failed():
                failures.append(verified.message)
            result.verified = verified.is_completed()
            result.verify_sha256 = getattr(v, "sha256", None)
            results.append(result)
            if s.postprocess and verified.is_completed():
                analyses.append(postprocess_scan.submit(path, str(session_dir / "analysis")))
            if result.node_failure:
                node_lost = _node_lost_message(result)
                logger.error(node_lost)
                break
        for fut in analyses:
            fut.wait()
    finally:
        release(node_backend, aggregator)
    summarise([summary_row(r) for r in results])
    failed_analyses = [f for f in analyses if f.state.is_failed()]
    if node_lost:
        return Failed(message=node_lost, data=results)
    if failures or failed_analyses:
        return Failed(
            message=f"{len(failures)} of {n_scans} scan(s) failed verification"
            + (f", {len(failed_analyses)} analysis step(s) failed" if failed_analyses else "")
            + (": " + " | ".join(failures) if failures else ""),
            data=results,
        )
    done = "counted, verified and analysed" if s.postprocess else "counted and verified"
    return Completed(message=f"{n_scans} scan(s) {done}", data=results)


def _node_lost_message(result: ScanResult) -> str:
    """Why the session stops after a node loss, and what became of the scan in flight."""
    r = result.record
    return (
        f"a node streamer was lost during scan {r.scan_number}; the session stops (policy: a lost node ends "
        f"the session). Scan {r.scan_number} was written {r.status}: {r.frames_incomplete} of "
        f"{r.expected_frames} frames incomplete, marked in its sector_masks.\n{result.node_failure}"
    )


@flow(name="stemstream-experiment")
def experiment(
    doses: list[float] = (100.0, 200.0, 400.0),  # a tuple: defaults must not be shared mutable lists
    scans_per_dose: int = 2,
    scan_width: int = 64,
    scan_height: int = 64,
    backend: Literal["local", "nersc"] | None = None,
):
    """A multi-scan experiment: a dose series, one session (allocation) per dose, scans numbered on."""
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
