"""Prefect tasks of a session: thin wrappers around the plain code in this package.

Network-touching steps retry transient failures (a TransientError, and nothing else: counting/errors.py);
every step has a timeout; nothing here holds state: the flow owns the backends and passes them in.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path

import httpx
from prefect import get_client, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Completed, Failed

from counting.errors import TransientError
from counting.geometry import N_SECTORS
from streaming.protocol.record import ScanRecord
from tasks.acquisition.camera import CameraRun, ScanRequest, wait_for_new_scan
from tasks.acquisition.monitor import MonitorFollower, wait_for_state
from tasks.acquisition.result import AnalysisOutcome, ScanResult
from tasks.launch.backends import Aggregator, Nodes
from tasks.launch.errors import NodeFailure, ReleaseError
from tasks.launch.plan import SessionPlan
from tasks.launch.state import SessionState
from tasks.settings import AnalysisSettings


def _retry_transient(task, task_run, state) -> bool:
    """Retry a TransientError (SFAPI or SSH unreachable, a timeout, a 5xx) and nothing else.

    A PermanentError (a job that failed, a bad key or config) would only fail again later, and a bug (a
    KeyError, a TypeError) must show at once. No third-party type is listed: tasks/nersc/sfapi.py and
    tasks/ssh.py wrap httpx, paramiko and socket errors into their typed transient errors.
    """
    try:
        state.result()
    except TransientError:
        return True
    except Exception:
        return False
    return False


@task(
    name="allocate-nodes",
    retries=2,
    retry_delay_seconds=[5, 20],
    retry_condition_fn=_retry_transient,
    cache_policy=NO_CACHE,
    timeout_seconds=1800,
)
def allocate_nodes(nodes: Nodes, plan: SessionPlan, state: SessionState) -> str:
    """Start the node streamers (local processes or a realtime Slurm job) and wait until they run."""
    logger = get_run_logger()
    if nodes.job_id is not None:  # a retry: the previous attempt's job must not outlive it
        nodes.stop()
    job_id = nodes.start(plan)
    nodes.record(state)  # first, so cleanup finds the job whatever happens next
    state.save()
    logger.info("node streamers: job %s submitted for %d node(s)", job_id, plan.n_nodes)
    nodes.wait_started()
    logger.info("job %s is running", job_id)
    return job_id


@task(
    name="arm-aggregator",
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=_retry_transient,
    cache_policy=NO_CACHE,
    timeout_seconds=120,
)
def arm_aggregator(aggregator: Aggregator, plan: SessionPlan, state: SessionState) -> None:
    """Start the aggregator for this session (node count, addresses, keys)."""
    aggregator.start(plan)
    aggregator.record(state)
    state.save()
    get_run_logger().info("aggregator armed for %d node(s) on %s", plan.n_nodes, plan.nodes_bind)


@task(name="wait-nodes-ready", cache_policy=NO_CACHE)
def wait_nodes_ready(plan: SessionPlan, nodes: Nodes, aggregator: Aggregator, timeout: float) -> int:
    """Block until every node streamer has connected to the aggregator and reported ready."""

    def check() -> None:
        nodes.check()
        aggregator.check()

    state = wait_for_state(
        plan.monitor_connect,
        lambda s: s.nodes_ready >= plan.n_nodes,
        timeout,
        check=check,
        what=f"{plan.n_nodes} node streamer(s) to report ready",
        curve=plan.monitor_curve(),
    )
    get_run_logger().info("%d node streamer(s) ready", state.nodes_ready)
    return state.nodes_ready


@task(name="acquire-scan", cache_policy=NO_CACHE)
def acquire_scan(
    plan: SessionPlan,
    nodes: Nodes,
    aggregator: Aggregator,
    seen: set[str],
    expect: ScanRequest | None = None,
    camera: CameraRun | None = None,
    deadline: float | None = None,
    lost_node_wait: float = 60.0,
    index: int = -1,
    known_lost: set[str] | None = None,
) -> ScanResult | None:
    """Follow the next scan and wait for its counted file: the scan the simulated camera plays next
    (``expect``, the camera's scan ``index``), or, in an instrument session, whatever scan the receivers
    deliver next, of any shape.

    Returns None when the monotonic ``deadline`` passes first (an instrument session's duration) or the
    run is being cancelled. A node lost mid-scan does not end the wait at once while the scan writer's host
    still runs: the writer writes the scan by its deadline with the lost frames marked missing, and the
    result comes back with ``node_failure`` set, so the flow can verify it and then apply its policy.
    """
    logger = get_run_logger()
    follower = MonitorFollower(plan.monitor_connect, plan.monitor_curve())
    what = f"scan {expect.scan_number}" if expect is not None else "next scan"
    progress_id = create_progress_artifact(
        progress=0.0, key="scan-progress", description=f"{what}: sectors received"
    )
    shown = [0.0]
    began = [0.0, 0]  # when the first sectors were seen, and how many (the rate)
    watch = _NodeWatch(nodes, expect.scan_number if expect else -1, lost_node_wait, logger, follower)
    watch.known_lost = known_lost if known_lost is not None else set()
    cancelling = _CancelWatch()

    def check() -> None:
        watch.check()
        aggregator.check()
        if camera is not None and watch.failure is None:
            camera.check()  # a camera failure surfaces here, not as a silent timeout
        st = follower.latest()
        if st is not None and st.scan_expected and (expect is None or st.scan_number == expect.scan_number):
            done = min(100.0, 100.0 * st.scan_received / st.scan_expected)
            if done - shown[0] >= 5:
                began[:] = began if began[0] else [time.monotonic(), st.scan_received]
                rate = (st.scan_received - began[1]) / max(time.monotonic() - began[0], 1e-3) / N_SECTORS
                text = f"{what}: ~{st.scan_received // N_SECTORS} of {st.scan_expected // N_SECTORS} frames"
                update_progress_artifact(progress_id, done, description=f"{text}, {rate:.0f} frames/s")
                shown[0] = done

    def match(record: ScanRecord) -> bool:
        return expect is None or record.scan_number == expect.scan_number

    try:
        record = wait_for_new_scan(plan.output_dir, seen, match, deadline, check, cancelling)
    finally:
        follower.close()
    if record is None:
        return None
    update_progress_artifact(progress_id, 100.0)
    sent = camera.counts.get(index) if camera is not None else None
    result = ScanResult(record, sent, str(watch.failure) if watch.failure is not None else None)
    _log_scan(logger, result)
    return result


def cancel_requested() -> bool:
    """Is this flow run being cancelled (asked now)?"""
    return _CancelWatch()()


class _CancelWatch:
    """True once this flow run is being cancelled (from the UI or the API), asked at most every 2 s."""

    def __init__(self, every: float = 2.0) -> None:
        self.every, self._last, self._cancelling = every, 0.0, False
        self._run_id = current_flow_run.get_id()

    def __call__(self) -> bool:
        if self._run_id is None or self._cancelling or time.monotonic() - self._last < self.every:
            return self._cancelling
        self._last = time.monotonic()
        # The API briefly unreachable (or erring): ask again later, never end a session for it.
        try:
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(self._run_id).state
        except (httpx.HTTPError, ObjectNotFound):
            return False
        self._cancelling = state is not None and state.type in (StateType.CANCELLING, StateType.CANCELLED)
        return self._cancelling


class _NodeWatch:
    """Checks the node streamers while a scan runs. A lost node whose scan writer host still runs is
    remembered and then waited on for at most ``wait`` seconds, so the scan in flight can still be written."""

    def __init__(self, nodes: Nodes, scan_number: int, wait: float, logger, monitor: MonitorFollower) -> None:
        self.nodes, self.scan_number, self.wait, self.logger = nodes, scan_number, wait, logger
        self.monitor = monitor
        self.failure: NodeFailure | None = None
        self.known_lost: set[str] = set()  # nodes lost in earlier scans: the session goes on without them
        # the aggregator's forwarding processes reported lost: those gone before this scan are not news
        state = monitor.latest()
        self.paths_told: set[int] = set(state.paths_lost) if state is not None else set()
        self._give_up = float("inf")

    def check(self) -> None:
        """Raise NodeFailure when a node is lost with the writer, or the wait for the file has run out."""
        self._tell_lost_paths()
        if self.failure is None:
            try:
                self.nodes.check()
            except NodeFailure as exc:
                if exc.lost and set(exc.lost) <= self.known_lost:
                    return  # already lost in an earlier scan: its share goes to the others
                state = self.monitor.latest()
                writer = state.writer if state is not None else ""
                if exc.lost and writer and writer not in exc.lost:
                    exc.writer_alive = True  # the aggregator says who hosts the writer, and it is not lost
                if not exc.writer_alive:
                    raise
                self.known_lost.update(exc.lost)
                self.failure, self._give_up = exc, time.monotonic() + self.wait
                self.logger.error(
                    "scan %d: a node streamer was lost (the aggregator sends its share to the others; its "
                    "frames in flight are lost and marked); waiting up to %g s for the scan file: %s",
                    self.scan_number,
                    self.wait,
                    str(exc).splitlines()[0],
                )
        elif time.monotonic() > self._give_up:
            raise NodeFailure(
                f"{self.failure}\nscan {self.scan_number}: no counted file within {self.wait:g} s of losing "
                "the node"
            )

    def _tell_lost_paths(self) -> None:
        """Name a forwarding process of the aggregator that exited (within a monitor heartbeat): what it
        held is lost and marked, the other paths carry the scan on."""
        state = self.monitor.latest()
        for index, why in sorted((state.paths_lost if state is not None else {}).items()):
            if index not in self.paths_told:
                self.paths_told.add(index)
                self.logger.error(
                    "scan %d: the aggregator's %s: the sectors it held are lost and marked; the other paths "
                    "carry on",
                    self.scan_number,
                    why,
                )


def _log_scan(logger, result: ScanResult) -> None:
    """One line per scan; a warning that says what was lost and where when anything was."""
    r = result.record
    logger.info(
        "scan %d: %s, %d frames, %.2f %% complete, file on disk %.2f s after the last data",
        r.scan_number,
        r.status,
        r.frames_written,
        100 * r.completeness,
        r.seconds_to_file,
    )
    if r.frames_incomplete or result.sectors_overflowed or r.sectors_lost_in_transit:
        logger.warning(
            "scan %d: %d of %d frames incomplete (marked in the file's sector_masks); %d sector(s) dropped "
            "by the receivers because the pipeline did not take them in time, %d lost between aggregator "
            "and nodes",
            r.scan_number,
            r.frames_incomplete,
            r.expected_frames,
            result.sectors_overflowed,
            r.sectors_lost_in_transit,
        )


@task(name="verify-scan", cache_policy=NO_CACHE)
def verify_scan_file(path: str, width: int, height: int, min_completeness: float):
    """Verify a counted file; a problem is a clear Failed state with the reasons, not a traceback."""
    from tasks.verify import verify_scan

    result = verify_scan(Path(path), width, height, min_completeness)
    if not result.ok:
        return Failed(message=f"{Path(path).name}: " + "; ".join(result.problems), data=result)
    return Completed(message=f"{Path(path).name} verified", data=result)


@task(name="postprocess-scan", cache_policy=NO_CACHE)
def postprocess_scan(path: str, out_dir: str, analysis: AnalysisSettings) -> AnalysisOutcome:
    """py4DSTEM analysis of a counted scan; images become artifacts in the Prefect UI."""
    from dataclasses import asdict

    from tasks.analysis.analyse import analyse_scan, analysis_config
    from tasks.analysis.artifact import artifact_png

    config = analysis_config(analysis)
    result = analyse_scan(Path(path), Path(out_dir), config)
    name = Path(path).stem
    images = "\n".join(
        f"### {label}\n![{label}](data:image/png;base64,{base64.b64encode(artifact_png(p)).decode()})"
        for label, p in result.images.items()
    )
    create_markdown_artifact(
        key=f"analysis-{_key(name)}",
        markdown=f"# {name}\n\n{_calibration_line(result)}\n\n{images}",
        description=f"py4DSTEM analysis of {name}",
    )
    for warning in result.warnings:
        get_run_logger().warning("%s: %s", name, warning)
    return AnalysisOutcome(
        scan=path,
        params=asdict(config),
        summary=result.summary,
        images={k: str(v) for k, v in result.images.items()},
        timings=result.timings,
        warnings=result.warnings,
        calibration=result.calibration,
        fitted=result.fitted,
    )


def _calibration_line(result) -> str:
    """The artifact's calibration line: what the numbers are calibrated with, or "uncalibrated"."""
    cal, fitted = result.calibration, result.fitted
    step, alpha = cal.get("step_angstrom"), cal.get("convergence_semiangle_mrad")
    line = f"**{cal.get('status', 'uncalibrated')}**: step {f'{step:.4g}' if step else '?'} Å, "
    line += f"convergence semi-angle {f'{alpha:.4g}' if alpha else '?'} mrad"
    if cal.get("source"):
        line += f" (from {Path(cal['source']).name})"
    if fitted.get("defocus_angstrom") is not None:
        line += f"; fitted defocus {fitted['defocus_angstrom']:.4g} Å"
    return line


@task(name="session-summary", cache_policy=NO_CACHE)
def summarise(rows: list[dict]) -> None:
    """The per-scan summary table, as an artifact."""
    create_table_artifact(
        key="session-summary", table=rows, description="stemstream session: one row per scan"
    )


@task(name="release-resources", cache_policy=NO_CACHE)
def release(nodes: Nodes, aggregator: Aggregator) -> None:
    """Stop the aggregator and release the nodes (cancel the job); always runs."""
    logger = get_run_logger()
    errors: list[tuple[str, Exception]] = []
    for what, thing in (("aggregator", aggregator), ("nodes", nodes)):
        try:
            thing.stop()
        except Exception as exc:  # keep releasing the rest (a job left running costs); all are re-raised
            errors.append((what, exc))
    if errors:
        text = "; ".join(f"{what}: {exc}" for what, exc in errors)
        raise ReleaseError("could not release everything: " + text) from errors[0][1]
    logger.info("released the aggregator and the nodes")


def _key(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:100]


NODE_LOST_EVENT = "stemstream.node.lost"


def node_lost_event(scan_number: int, lost: list[str]) -> None:
    """Emit a Prefect event on this flow run: a node streamer was lost and the session goes on without it
    (shown in the run's events; the failure alert automation reacts to it too, see flows.alerts)."""
    from prefect.events import emit_event

    run_id = current_flow_run.get_id()
    if run_id is None:
        return
    emit_event(
        event=NODE_LOST_EVENT,
        resource={"prefect.resource.id": f"prefect.flow-run.{run_id}"},
        related=[
            {
                "prefect.resource.id": f"prefect.flow.{current_flow_run.flow_name}",
                "prefect.resource.role": "flow",
                "prefect.resource.name": current_flow_run.flow_name,
            }
        ],
        payload={"scan_number": scan_number, "lost": lost},
    )
