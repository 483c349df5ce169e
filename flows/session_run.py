"""One session's run, step by step: set up, start the processes, acquire scans (each verified, recorded and
analysed), release everything on every way out, and end in a state that says what happened.

The session's state file (tasks.launch.state.SessionState) is saved at every step that starts something,
so the cleanup hook (flows/session.py) can stop it after a crash; the backends record themselves in it.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect.artifacts import create_markdown_artifact
from prefect.states import Cancelled, Completed, Failed, State

from catalogue.recorder import Recorder
from counting.phase.bins import DEFAULT_BINS
from flows.session_setup import (
    SessionRequest,
    choose_dark,
    describe,
    make_backends,
    node_lost_message,
    planned_scans,
    remaining,
    session_end,
    session_id,
    session_plan,
    session_settings,
)
from flows.settings import Settings
from flows.summary import live_markdown, summary_row
from flows.timeline import FLOW_BEGINS, FLOW_ENDS, Timeline, session_timeline
from flows.timeline_phases import ALLOCATE, ANALYSES_DONE, ARM, READY, RELEASE, SUMMARY, WAIT_READY
from streaming.protocol.record import ScanRecord
from tasks.acquisition.camera import CameraRun, ScanTimeout
from tasks.acquisition.catalogue_link import finish_recording, record_analyses, record_scan, start_recorder
from tasks.acquisition.live import live_link, live_url
from tasks.acquisition.monitor import refused_report
from tasks.acquisition.result import ScanResult
from tasks.launch.state import SessionState
from tasks.nersc.sfapi import AllocationCancelled
from tasks.steps.metadata import attach_microscope_metadata
from tasks.steps.phase import fit_stream_phase
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
from tasks.stream_phase import PhaseOutcome, record_stream_phase
from tasks.verify import VerifyResult


class SessionRun:
    """One session, from its settings to its final state. Built before anything starts (its directory,
    dark, plan, settings file, backends and state file exist); ``run()`` does the rest."""

    def __init__(self, settings: Settings, request: SessionRequest, run_id: str, log) -> None:
        self.timeline = session_timeline()  # the CLI's, when the CLI runs this session
        self.timeline.mark(FLOW_BEGINS, run_id)
        self.request, self.run_id, self.log = request, run_id, log
        self.session_dir = session_dir_of(settings, run_id).resolve()
        self.session_dir.mkdir(parents=True, exist_ok=True)
        self.timeline.session_dir = self.session_dir
        self.dark = choose_dark(settings, request.simulated, self.session_dir, log)
        self.settings = session_settings(settings, self.dark, session_id(), request.simulated)
        self.plan = session_plan(self.settings, self.session_dir)
        self.nodes, self.aggregator = make_backends(self.settings.session.backend, self.settings)
        self.state = SessionState(
            self.session_dir,
            flow_run=run_id,
            backend=self.settings.session.backend,
            settings_file=str(self.plan.settings_file),
            scans_dir=str(self.plan.output_dir),
        )
        self.state.save()
        self.scans = planned_scans(request, self.settings)
        self.n_scans = len(self.scans) if request.simulated and request.script else request.n_scans
        self.results: list[ScanResult] = []
        self.failures: list[str] = []  # verification failures, one message each
        self.lost_nodes: set[str] = set()  # node streamers lost so far: the session goes on without them
        self.analyses: list = []  # postprocess-scan futures
        self.cancelled = False
        self.player: CameraRun | None = None
        self.ends: float | None = None  # an instrument session: when it stops waiting (monotonic)
        self.refused = ""  # scans the aggregator refused before the session was ready, in words
        self.seen: set[str] = set()  # stop records already there (an earlier session's) or taken
        self.recorder: Recorder | None = None
        self.partial: list[ScanResult] = []  # scans the session's end stopped mid-scan (written as counted)

    def run(self) -> State:
        """Start, acquire, release (always), and the final state with the scan results."""
        s, plan = self.settings.session, self.plan
        what = describe(self.request, self.scans)
        self.log.info(
            "session %05d: %s camera, %s on %d node(s), backend %s; files in %s",
            plan.session_id, self.request.camera, what, s.nodes, s.backend, plan.output_dir,
        )  # fmt: skip
        self.seen = {str(p) for p in plan.output_dir.glob("*.json")} if plan.output_dir.exists() else set()
        self.recorder = start_recorder(
            self.settings.catalogue, self.settings.output_dir, plan, self.run_id, self.request.camera,
            s.backend, self.log,
        )  # fmt: skip
        try:
            try:
                self.start()
                self.acquire()
            except AllocationCancelled:  # cancelled while the Slurm job waited to start: the job is too
                self.cancelled = True
            finally:
                self.release()
            return self.outcome()
        finally:
            self.end_timeline()

    def end_timeline(self) -> None:
        """The flow's last mark; timeline.json into the logs, unless the CLI writes it at its exit (with
        its own last marks). A file that cannot be written costs a warning, never the session."""
        self.timeline.mark(FLOW_ENDS)
        if self.timeline.held_by_cli:
            return
        try:
            self.timeline.write()
        except OSError as exc:
            self.log.warning("could not write the session's timeline: %s", exc)

    def start(self) -> None:
        """Book the nodes, arm the aggregator, wait for every node; then the session is ready (``ready:``)."""
        st, plan = self.settings, self.plan
        # Its timeout above the job's own start wait, which ends first, with Slurm's reason, job cancelled.
        wait = st.sfapi.submit_timeout + st.sfapi.start_timeout + 300
        mark = self.timeline.mark
        mark(f"{ALLOCATE} start")
        allocate_nodes.with_options(timeout_seconds=wait)(self.nodes, plan, self.state)
        mark(f"{ALLOCATE} end")
        mark(f"{ARM} start")
        arm_aggregator(self.aggregator, plan, self.state)
        mark(f"{ARM} end")
        mark(f"{WAIT_READY} start")
        wait_nodes_ready(plan, self.nodes, self.aggregator, st.session.nodes_ready_timeout)
        mark(f"{WAIT_READY} end")
        self.ends = session_end(st, self.request.duration) if not self.request.simulated else None
        self.state.ready, self.state.receivers = True, plan.receivers
        self.state.ends_in = remaining(self.ends)
        self.state.save()
        mark(READY, " ".join(plan.receivers))
        self.log.info("session ready: receivers %s", " ".join(plan.receivers))
        if live := live_url(self.session_dir):  # on the aggregator's host, whichever backend
            self.log.info("live: %s", live)
        if self.request.simulated:
            rate = self.request.frame_rate or None
            self.player = CameraRun(self.scans, plan.receivers, rate, st.session.scan_timeout).start()

    def acquire(self) -> None:
        """Take scans until n_scans (0: no limit), the end of the duration, or a cancellation; then wait
        for the analyses and hand them to the catalogue."""
        k = 0
        while not self.n_scans or k < self.n_scans:
            result = self.next_scan(k)
            if result is None:
                break
            k += 1
            self.take(result)
        self.timeline.mark("last scan taken", f"{k} scan(s)")
        for future in self.analyses:
            future.wait()
        mark_analyses(self.timeline, self.analyses)
        record_analyses(self.recorder, self.analyses)

    def next_scan(self, k: int) -> ScanResult | None:
        """The next scan's result (the camera's k-th); None once the duration is over or the run is being
        cancelled. A simulated scan that does not come in time ends the session (ScanTimeout)."""
        timeout = self.settings.session.scan_timeout
        expect = self.scans[k] if self.request.simulated else None
        deadline = time.monotonic() + timeout + expect.pause if expect is not None else self.ends
        result = acquire_scan(
            self.plan, self.nodes, self.aggregator, self.seen, expect, self.player, deadline,
            lost_node_wait=self.settings.streaming.writer_deadline + 30.0, index=k, known_lost=self.lost_nodes,
        )  # fmt: skip
        if result is None:
            self.cancelled = cancel_requested()
            if expect is not None and not self.cancelled:
                raise ScanTimeout(f"scan {expect.scan_number}: no counted file within {timeout:g} s")
        return result

    def take(self, result: ScanResult) -> None:
        """Verify a written scan, record it (in the background) and analyse it; a lost node is reported
        and the session goes on with the others."""
        st, r = self.settings, result.record
        path = r.path or ""
        if path and st.microscope.dir is not None:  # before verification: it checks the final file
            attach_microscope_metadata(path, st.microscope)
        min_completeness = st.session.min_completeness
        verified = verify_scan_file(path, r.scan_width, r.scan_height, min_completeness, return_state=True)
        report = verified.result(raise_on_failure=False)  # a VerifyResult, or the exception that ended it
        if verified.is_failed():
            self.failures.append(verified.message)
        elif r.completeness < 1.0:
            self._warn_incomplete(r)
        result.verified = verified.is_completed()
        mark_scan(self.timeline, len(self.results) + 1, r)
        result.verify_sha256 = report.sha256 if isinstance(report, VerifyResult) else None
        phase = self.stream_phase(path, result) if verified.is_completed() else None
        self.results.append(result)
        record_scan(self.recorder, result, self.run_id, self.dark)  # never waits on the database
        record_stream_phase(self.recorder, phase)
        if st.session.postprocess and verified.is_completed():
            out = str(self.session_dir / "analysis")
            self.analyses.append(postprocess_scan.submit(path, out, st.analysis))
        if result.node_failure:
            message = node_lost_message(result, st.session.nodes - len(self.lost_nodes))
            self.log.error(message)
            node_lost_event(r.scan_number, sorted(self.lost_nodes))

    def stream_phase(self, path: str, result: ScanResult) -> PhaseOutcome | None:
        """The verified scan's phase fit into its file and stop record (session.stream_phase); the file's
        new checksum becomes the result's (the verified content plus /phase, checked as it was copied)."""
        st = self.settings
        if not st.session.stream_phase:
            return None
        phase = fit_stream_phase(
            path, st.streaming.live.parallax_bins or DEFAULT_BINS, st.analysis.keep_flyback
        )
        result.verify_sha256 = phase.sha256 or result.verify_sha256
        return phase

    def _warn_incomplete(self, r: ScanRecord) -> None:
        """A scan kept although incomplete (above min_completeness): say what is marked where."""
        self.log.warning(
            "scan %d: %.2f %% complete (above min_completeness %.2f %%): kept, %d incomplete frame(s) "
            "marked in its sector_masks",
            r.scan_number, 100 * r.completeness, 100 * self.settings.session.min_completeness,
            r.frames_incomplete,
        )  # fmt: skip

    def release(self) -> None:
        """Stop the camera, note refused scans, release the backends and end the catalogue's record of
        the session (with the exception in flight, if any: this runs in a ``finally``)."""
        if self.player is not None:
            self.player.stop()
        self.refused = refused_report(self.plan)
        try:
            self.timeline.mark(f"{RELEASE} start")
            release(self.nodes, self.aggregator)
            self.timeline.mark(f"{RELEASE} end")
            self.partial = self.stopped_mid_scan()
            self.results += self.partial
        finally:
            timeout = self.settings.catalogue.flush_timeout
            taken = [r for r in self.results if r not in self.partial]  # the partial ones are not verified
            finish_recording(self.recorder, self.run_id, taken, timeout)

    def stopped_mid_scan(self) -> list[ScanResult]:
        """Scans whose stop record appeared only as the processes stopped: the writer wrote what was
        counted of a scan in flight (incomplete, reason shutdown). Listed, not verified."""
        out = self.plan.output_dir
        new = sorted(p for p in out.glob("*.json") if str(p) not in self.seen) if out.exists() else []
        found = []
        for path in new:
            self.seen.add(str(path))
            try:
                record = ScanRecord.load(path)
            except (OSError, ValueError, KeyError, TypeError):
                continue
            found.append(ScanResult(record))
            self.log.warning(
                "scan %d stopped mid-scan by the session's end: %.2f %% complete (%s), kept as %s",
                record.scan_number, 100 * record.completeness, ",".join(record.reasons) or "no reason",
                Path(record.path).name if record.path else "no file",
            )  # fmt: skip
        return found

    def outcome(self) -> State:
        """The summary artifact, then the final state: Failed when a scan failed verification or an
        analysis failed, Cancelled when cancelled, else Completed; each carries the scan results."""
        live = live_url(self.session_dir)
        summarise([summary_row(r) | live_link(live, r.record.path or "") for r in self.results])
        if page := live_markdown(live, self.results):  # a clickable link in the UI (table cells are not)
            create_markdown_artifact(key="session-live-view", markdown=page, description="the live page")
        self.timeline.mark(SUMMARY)
        if self.refused:
            self.log.warning(self.refused)
        results = [r for r in self.results if r not in self.partial]  # verified (or failed) scans
        failures = self.failures
        failed_analyses = [f for f in self.analyses if f.state.is_failed()]
        if failures or failed_analyses:
            return Failed(
                message=f"{len(failures)} of {len(results)} scan(s) failed verification"
                + (f", {len(failed_analyses)} analysis step(s) failed" if failed_analyses else "")
                + (": " + " | ".join(failures) if failures else "")
                + stopped_mid_scan_note(self.partial),
                data=self.results,
            )
        done = (
            "counted, verified and analysed" if self.settings.session.postprocess else "counted and verified"
        )
        done = f"{len(results)} scan(s) {done}" + stopped_mid_scan_note(self.partial)
        if self.cancelled:
            return Cancelled(message=f"cancelled; {done}", data=self.results)
        return Completed(message=done, data=self.results)


def mark_scan(timeline: Timeline, k: int, r: ScanRecord) -> None:
    """The k-th scan's marks: its first and last counted data and its file (the writer's clock), and its
    verification (now)."""
    what = f"scan {r.scan_number}"
    for name, wall in (("first data", r.first_data_time), ("last data", r.last_data_time)):
        if wall:
            timeline.mark(f"scan {k} {name}", what, wall)
    if r.written_time:
        timeline.mark(f"scan {k} written", what, r.written_time)
    timeline.mark(f"scan {k} verified", what)


def mark_analyses(timeline: Timeline, futures: list) -> None:
    """Each analysis's end (its final state's time), then that all are done (now)."""
    for k, future in enumerate(futures, 1):
        stamp = getattr(future.state, "timestamp", None)
        if stamp is not None:
            timeline.mark(f"analysis {k} done", future.state.type.value, stamp.timestamp())
    timeline.mark(ANALYSES_DONE, f"{len(futures)} analysis step(s)")


def stopped_mid_scan_note(partial: list[ScanResult]) -> str:
    """The final message's note of scans stopped mid-scan ("" for none)."""
    if not partial:
        return ""
    each = ", ".join(
        f"scan {r.scan_number} {100 * r.record.completeness:.2f} % complete ({','.join(r.record.reasons)})"
        for r in partial
    )
    return f"; {len(partial)} scan(s) stopped mid-scan, kept incomplete and not verified: {each}"


def session_dir_of(settings: Settings, run_id: str) -> Path:
    """The directory of the session run by this flow run."""
    return settings.output_dir / "sessions" / run_id
