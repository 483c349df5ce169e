"""The session flow end to end, under one Prefect test harness: real node streamers, aggregator and writer.

* local backend: every process on this machine (what `stemstream` does out of the box);
* nersc backend: the real sfapi_client talks to the loopback fake SFAPI, whose job really starts the srun
  line's node streamers as local processes, and the aggregator is started over SSH on a real loopback sshd
  (pinned host key);
* failure paths: each ends FAILED with a message that says why, the Slurm job cancelled and no process left;
* alerts: a failed session reaches a webhook through the Prefect automation of flows/alerts.py (the harness
  server runs the trigger and action services).

Scans are tiny (8x8, 16x16) and py4DSTEM runs in one test only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.logging.handlers import APILogWorker
from prefect.states import State

from flows.cli.terminal import SessionWatcher
from flows.session import session
from flows.settings import load_settings
from stemstream_testing.fake_sfapi import FakeJob
from streaming.transport.security import load_keypair, write_keypair
from tasks.acquisition.live import live_url
from tasks.verify import verify_scan
from tests.flows.conftest import NerscSetup, set_env
from tests.tasks.helpers import alive, keygen, wait_until

pytestmark = pytest.mark.usefixtures("prefect_harness")

API = "/api/v1.2/compute/jobs/perlmutter"


# ---- helpers ------------------------------------------------------------------------------------------
def run_session(output_dir: Path, **kwargs: Any) -> tuple[State, Path]:
    """Run the session flow to its final state; returns the state and the session's directory. Backend
    and node count come from the test's settings, as the CLI passes them (flow parameters win)."""
    kwargs.setdefault("postprocess", False)
    session_settings = load_settings().session
    kwargs.setdefault("backend", session_settings.backend)
    kwargs.setdefault("nodes", session_settings.nodes)
    kwargs.setdefault("min_completeness", 1.0)  # these tests assert every loss fails verification
    state = session(return_state=True, **kwargs)
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    return state, output_dir / "sessions" / str(flow_run_id)


def message(state: State) -> str:
    """The state's message and, for a raised exception, its text (what an operator sees in the UI)."""
    text = str(state.message or "")
    try:
        state.result(raise_on_failure=True)
    except BaseException as exc:  # the flow's own exception, re-raised from its result
        text += f"\n{type(exc).__name__}: {exc}"
    return text


def read_state_file(session_dir: Path) -> dict[str, Any]:
    """The session's session.json (what the cleanup hooks read)."""
    return json.loads((session_dir / "session.json").read_text())


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state is [0], ppid [1], pgid [2])."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    """The process's command line, words joined by spaces ('' when it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def leftovers(session_dir: Path, groups: Iterable[int] = ()) -> list[str]:
    """Live processes of this session: in a recorded process group, started by this test process as
    `flows.cli`, or naming the session's directory on their command line."""
    info = read_state_file(session_dir) if (session_dir / "session.json").exists() else {}
    pgids = {int(p) for p in [*groups, *info.get("local_pids", []), info.get("aggregator_pid")] if p}
    me, found = str(os.getpid()), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        stat = _stat(int(entry.name))
        if stat is None or stat[0] in ("Z", "X"):
            continue
        cmd = _cmdline(int(entry.name))
        if int(stat[2]) in pgids or (stat[1] == me and "flows.cli" in cmd) or str(session_dir) in cmd:
            found.append(f"{entry.name}: {cmd[:200]}")
    return found


def assert_nothing_left(session_dir: Path, groups: Iterable[int] = ()) -> None:
    """No node streamer, counting worker or aggregator of the session is alive (a few seconds' grace)."""
    groups = list(groups)
    wait_until(lambda: not leftovers(session_dir, groups), timeout=10)
    left = leftovers(session_dir, groups)
    assert not left, f"processes left behind: {left}"


def only_job(fake_jobs: dict[str, FakeJob]) -> FakeJob:
    """The one job the session submitted."""
    assert len(fake_jobs) == 1, f"expected one Slurm job, got {list(fake_jobs)}"
    return next(iter(fake_jobs.values()))


def assert_job_released(nersc: NerscSetup, job: FakeJob) -> None:
    """The job was cancelled through SFAPI and every process it started is gone."""
    assert job.state == "CANCELLED"
    assert ("DELETE", f"{API}/{job.jobid}") in nersc.fake.requests
    assert not any(alive(pid) for pid in job.pids)


def assert_scans(session_dir: Path, n: int, width: int, height: int) -> list[dict[str, Any]]:
    """n counted files that verify, each with all its frames; returns their stop records."""
    files = sorted((session_dir / "scans").glob("*.h5"))
    assert len(files) == n, files
    records = []
    for path in files:
        result = verify_scan(path, width, height, 1.0)
        assert result.ok, result.problems
        assert (result.scan_width, result.scan_height) == (width, height)
        assert result.frames == width * height and result.completeness == 1.0
        assert result.checksum_matches_record is True
        record = json.loads(path.with_suffix(".json").read_text())
        assert record["status"] == "complete" and record["reasons"] == ["complete"]
        assert record["frames_written"] == width * height and record["completeness"] == 1.0
        records.append(record)
    return records


def artifacts_of(flow_run_id: uuid.UUID) -> dict[str, Any]:
    """The flow run's artifacts by key, read back from the Prefect API."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in found}


def summary_rows(flow_run_id: uuid.UUID) -> list[dict[str, Any]]:
    """The session-summary table artifact's rows."""
    summary = artifacts_of(flow_run_id)["session-summary"]
    return json.loads(summary.data) if isinstance(summary.data, str) else summary.data


def run_log_messages(flow_run_id: uuid.UUID) -> list[str]:
    """The flow run's log messages (its tasks' included), read back from the Prefect API."""
    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


def task_runs_of(flow_run_id: uuid.UUID) -> dict[str, list[Any]]:
    """The flow run's task runs by task name (retries show as run_count > 1)."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    by_name: dict[str, list[Any]] = {}
    for run in runs:
        by_name.setdefault(run.name.rsplit("-", 1)[0], []).append(run)
    return by_name


@contextmanager
def webhook_receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A loopback HTTP endpoint that records the JSON of every POST; yields (url, received)."""
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            received.append({"path": self.path, "json": json.loads(body or b"null")})
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/stemstream-alerts", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def in_background(target: Callable[[], None]) -> threading.Thread:
    """Run target in a daemon thread (a saboteur); join it with a timeout."""
    thread = threading.Thread(target=target, name="saboteur", daemon=True)
    thread.start()
    return thread


# ---- local backend ------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.product_defaults  # the session as shipped: default node memory, the live page
def test_local_session_counts_verifies_analyses_and_stops_everything(stemstream_env: Path) -> None:
    state, session_dir = run_session(
        stemstream_env, n_scans=2, scan_width=16, scan_height=16, postprocess=True
    )
    assert state.is_completed(), message(state)
    assert "2 scan(s) counted, verified and analysed" in str(state.message)

    records = assert_scans(session_dir, 2, 16, 16)
    assert [r["scan_number"] for r in records] == [1, 2]
    results = state.result()
    assert [(r.scan_number, r.record.status, r.verified, r.record.frames_written) for r in results] == [
        (1, "complete", True, 256),
        (2, "complete", True, 256),
    ]
    assert all(r.record.completeness == 1.0 for r in results)

    artifacts = artifacts_of(state.state_details.flow_run_id)
    summary = artifacts["session-summary"]
    assert summary.type == "table"
    table = json.loads(summary.data) if isinstance(summary.data, str) else summary.data
    assert [row["scan"] for row in table] == [1, 2] and {row["verified"] for row in table} == {"passed"}
    analyses = [a for key, a in artifacts.items() if key and key.startswith("analysis-")]
    assert len(analyses) == 2 and all(a.type == "markdown" for a in analyses)
    assert all("data:image/png;base64," in str(a.data) for a in analyses)
    assert list((session_dir / "analysis").glob("*.png"))

    info = read_state_file(session_dir)
    assert info["backend"] == "local" and len(info["local_pids"]) == 2
    assert {p.name for p in (session_dir / "logs").glob("*.log")} == {
        "node0.log",
        "node1.log",
        "aggregator.log",
        "view.log",  # the live page (stemstream view)
    }
    assert "live: http://127.0.0.1:" in (session_dir / "logs" / "view.log").read_text()
    page = live_url(session_dir)  # the summary links to the page on the local backend too
    assert page and f"[{page}]({page})" in str(artifacts["session-live-view"].data)
    assert_timeline(session_dir, n_scans=2, nodes=2)
    assert_nothing_left(session_dir)


def assert_timeline(session_dir: Path, n_scans: int, nodes: int) -> None:
    """The session's logs/timeline.json: its steps in order, each child's start-up marks in order."""
    marks = json.loads((session_dir / "logs" / "timeline.json").read_text())["marks"]
    own = [m["name"] for m in marks if m["process"] == "session"]
    steps = ["flow run begins", "allocate nodes start", "arm aggregator end", "wait nodes ready end", "ready"]
    steps += [f"scan {k} {what}" for k in range(1, n_scans + 1) for what in ("written", "verified")]
    steps += ["analyses done", "release start", "release end", "summary", "flow run ends"]
    assert [name for name in own if name in steps] == steps
    for node in [f"node{i}" for i in range(nodes)]:
        names = [m["name"] for m in marks if m["process"] == node]
        assert names[:4] == ["process start", "command", "imports", "configured"], names
        assert names.index("kernels warmed") < names.index("joined") and names[-1] == "stopped", names
    aggregator = [m["name"] for m in marks if m["process"] == "aggregator"]
    assert aggregator[:5] == ["process start", "command", "imports", "configured", "bound"], aggregator


@pytest.mark.timeout(120)
@pytest.mark.product_defaults  # the loss bound below is about the default 32-frame batch
def test_local_node_killed_mid_scan_costs_its_frames_in_flight_and_the_session_goes_on(
    stemstream_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The documented policy: the aggregator sends the lost node's share to the survivor at once; the scan
    in flight is written as soon as the survivor is done (not by the writer's 60 s deadline), its missing
    frames on record (file mask, verification, summary); the session goes on and scan 3 is complete."""
    set_env(monkeypatch, "session", scan_timeout=60, nodes_ready_timeout=60)
    set_env(monkeypatch, "streaming", writer_deadline=60)
    killed: list[int] = []
    names: list[str] = []
    rate = 40.0  # frames/s in real time: a 16x16 scan takes 6.4 s, so the kill lands inside scan 2

    def kill_node1_during_scan_2() -> None:
        """2.5 s after scan 1 is written, SIGKILL the node that does not host the writer (its counting
        worker is orphaned)."""
        sessions = stemstream_env / "sessions"
        if not wait_until(lambda: list(sessions.glob("*/scans/*_00001.json")), timeout=60):
            return
        time.sleep(2.5)
        session_dir = next(sessions.iterdir())
        pids = read_state_file(session_dir)["local_pids"]
        log = (session_dir / "logs" / "aggregator.log").read_text()
        writer = re.search(r"scan writer of this session: \S+ on (\S+),", log).group(1)
        victim = next(pid for pid in pids if not writer.endswith(f"-{pid}"))
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)
        names.append(f"node{pids.index(victim)}")

    saboteur = in_background(kill_node1_during_scan_2)
    t0 = time.monotonic()
    state, session_dir = run_session(
        stemstream_env, n_scans=3, scan_width=16, scan_height=16, frame_rate=rate
    )
    elapsed = time.monotonic() - t0
    saboteur.join(5)
    assert killed, "scan 1 never completed, so no node was killed"
    assert "later frames go to the 1 other node(s)" in (session_dir / "logs" / "aggregator.log").read_text()

    files = sorted((session_dir / "scans").glob("*.h5"))
    assert [f.name[-8:] for f in files] == ["00001.h5", "00002.h5", "00003.h5"]
    record = json.loads(files[1].with_suffix(".json").read_text())
    assert record["nodes_done"] == 1 and record["reasons"]
    # Only what the dead node held is missing: its open batch (32 frames) and what it had not yet sent.
    assert 256 - record["complete_frames"] <= 64, record
    with h5py.File(files[1]) as f:
        masks = f["electron_events/sector_masks"][...]
    assert int((masks != 15).sum()) == 256 - record["complete_frames"]  # every lost frame marked
    # written within seconds of the scan's end, not by the writer's deadline
    assert record["written_time"] - record["last_data_time"] < 10, record
    if record["complete_frames"] < 256:  # scan 2 fails verification (min_completeness 1): reported, not fatal
        assert state.is_failed() and "1 of 3 scan(s) failed verification" in message(state)
    else:
        assert state.is_completed(), message(state)
    third = json.loads(files[2].with_suffix(".json").read_text())
    assert third["status"] == "complete" and third["nodes"] == 1  # the session went on, on one node

    table = summary_rows(state.state_details.flow_run_id)
    assert [r["scan"] for r in table] == [1, 2, 3]
    assert table[1]["frames incomplete"] == 256 - record["complete_frames"]
    assert table[2]["verified"] == "passed" and table[2]["frames incomplete"] == 0
    assert elapsed < 100  # bounded by deadlines, never by a wait without one
    assert_nothing_left(session_dir, groups=killed)


@pytest.mark.timeout(120)
def test_local_camera_faster_than_the_pipeline_loses_data_loudly(
    stemstream_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real-time camera far beyond what two nodes count: the receivers drop what the aggregator cannot
    take; every lost sector shows in the Prefect summary, in the file's mask and in the failed session."""
    set_env(monkeypatch, "session", scan_timeout=60, nodes_ready_timeout=60)
    # Small queues (memory bound) and a short frame timeout, as the overload test in tests/reliability.
    set_env(monkeypatch, "streaming", aggregator_receiver_hwm=16, aggregator_node_hwm=32, frame_timeout=0.2)
    state, session_dir = run_session(
        stemstream_env, n_scans=1, scan_width=64, scan_height=64, frame_rate=50_000
    )
    assert state.is_failed()
    text = message(state)
    assert "1 of 1 scan(s) failed verification" in text and "completeness" in text, text

    [row] = summary_rows(state.state_details.flow_run_id)
    assert row["verified"] == "FAILED" and row["status"] == "incomplete"
    assert row["sectors dropped by receivers"] > 0 and row["frames incomplete"] > 0
    assert row["completeness %"] < 100
    [path] = (session_dir / "scans").glob("*.h5")
    with h5py.File(path) as f:
        masks = f["electron_events/sector_masks"][...]
        late = int(f["metadata/stemstream"].attrs.get("late_sectors", 0))
    missing_sectors = 4 * 64 * 64 - int(np.unpackbits(masks.astype(np.uint8)).sum())
    assert int((masks != 15).sum()) == row["frames incomplete"]  # every incomplete frame is marked
    # Every sector missing from the file was counted on its way: nothing silent.
    assert missing_sectors == row["sectors dropped by receivers"] + row["sectors lost in transit"] + late
    assert_nothing_left(session_dir)


# ---- nersc backend: sfapi_client -> fake SFAPI, aggregator over SSH -----------------------------------
def page_during_the_session(sessions: Path, seen: dict[str, Any]) -> Callable[[], None]:
    """A watcher: once the running session records its live page, what the user's terminal prints
    (flows.cli.terminal), and what GET /api/state answers with and without the page's token."""

    def look() -> None:
        lines: list[str] = []
        watcher = SessionWatcher(sessions, time.time() - 60, lines.append)
        if not wait_until(lambda: watcher.poll() or any(x.startswith("live: ") for x in lines), 60):
            return
        url = next(x for x in lines if x.startswith("live: ")).removeprefix("live: ")
        seen["printed"] = url
        seen["state"] = read_state_file(watcher.session_dir)
        page, _, query = url.partition("?")
        for key, address in (("with token", f"{page}api/state?{query}"), ("without", f"{page}api/state")):
            try:
                with urllib.request.urlopen(address, timeout=10) as answer:
                    seen[key] = (answer.status, json.loads(answer.read()))
            except urllib.error.HTTPError as exc:
                seen[key] = (exc.code, None)

    return look


@pytest.mark.timeout(120)
def test_nersc_session_through_sfapi_and_ssh(nersc: NerscSetup, monkeypatch: pytest.MonkeyPatch) -> None:
    """A session whose aggregator and live page run on the aggregator host (over SSH): the page answers
    during the session, the user's terminal gets ``live: <URL>`` with its token, the summary links to
    it, and both remote processes are gone after."""
    set_env(monkeypatch, "streaming__live", enabled=True, token_required=True)
    seen: dict[str, Any] = {}
    observer = in_background(page_during_the_session(nersc.output_dir / "sessions", seen))
    state, session_dir = run_session(nersc.output_dir, n_scans=1, scan_width=8, scan_height=8)
    observer.join(30)
    assert state.is_completed(), message(state)
    assert_scans(session_dir, 1, 8, 8)

    job = only_job(nersc.fake.jobs)
    d = job.directives
    assert (d["qos"], d["account"], d["constraint"], d["nodes"], d["time"]) == (
        "realtime",
        "m1234",
        "cpu",
        "1",
        "00:10:00",
    )
    assert d["exclusive"] == "1" and d["job_name"] == "stemstream-nodes"
    assert d["output"] == "/pscratch/logs/%x_%j.out"
    assert job.script == (session_dir / "node_streamers.sh").read_text()
    [step] = job.steps
    argv = step.argv
    assert argv[argv.index("--settings") - 2 :][:3] == ["-m", "flows.cli", "--settings"]
    assert argv[argv.index("--aggregator") + 1] == nersc.nodes_bind
    # One route for settings: the session's file, beside the scans the nodes share; no STEMSTREAM_ exports.
    settings = json.loads(Path(argv[argv.index("--settings") + 1]).read_text())
    assert (
        settings["streaming"]["nodes_bind"] == nersc.nodes_bind and settings["session"]["backend"] == "nersc"
    )
    assert not [name for name in job.env if name.startswith("STEMSTREAM_")]
    assert job.env["HDF5_USE_FILE_LOCKING"] == "FALSE"
    assert job.task_ids == [0]  # one srun task per node
    node_log = nersc.fake.root / f"pscratch/logs/stemstream-nodes_{job.jobid}.out"
    assert "welcomed as node 0 of 1" in node_log.read_text()
    assert "hosting the scan writer" in node_log.read_text()

    info = read_state_file(session_dir)
    assert info["backend"] == "nersc" and info["job_id"] == job.jobid
    assert info["aggregator"] == "SshAggregator" and isinstance(info["aggregator_pid"], int)
    remote_log = (session_dir / "logs" / "aggregator-remote.log").read_text()
    assert "scan 1 ends (complete)" in remote_log  # the aggregator really ran, started over SSH

    assert_live_page_on_the_aggregator_host(state, session_dir, seen)
    assert_job_released(nersc, job)
    assert not alive(info["aggregator_pid"])
    assert not alive(info["view_pid"])  # the page went with the aggregator
    assert_nothing_left(session_dir, groups=[*job.pids, info["view_pid"]])


def assert_live_page_on_the_aggregator_host(state: State, session_dir: Path, seen: dict[str, Any]) -> None:
    """The remote page printed its address, answered during the session (401 without its token), the
    terminal line carried the token, the flow run's log and summary the address without it."""
    info = read_state_file(session_dir)
    url, token = info["live_url"], (session_dir / "live-token").read_text().strip()
    assert url.startswith("http://127.0.0.1:") and "token" not in url and token
    assert seen.get("printed") == f"{url}?token={token}", seen
    assert seen["with token"][0] == 200 and seen["without"][0] == 401, seen
    assert isinstance(seen["with token"][1], dict)
    assert seen["state"]["view_pid"] == info["view_pid"]  # it answered: it ran, between arm and release
    remote_log = (session_dir / "logs" / "view-remote.log").read_text()
    assert f"live: {url}" in remote_log and token not in remote_log
    flow_run = state.state_details.flow_run_id
    assert f"live: {url}" in run_log_messages(flow_run)
    page = artifacts_of(flow_run)["session-live-view"]
    assert page.type == "markdown" and f"[{url}]({url})" in str(page.data) and token not in str(page.data)
    assert all(row["live view"].startswith(f"{url}#file=") for row in summary_rows(flow_run))


@pytest.mark.timeout(120)
def test_nersc_transient_sfapi_errors_are_retried(
    nersc: NerscSetup, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tasks.nersc.sfapi")
    nersc.fake.fail_next_requests(3, 503)  # the token request and the first API calls
    nersc.fake.fail_next_requests(2, 502, route="compute/jobs")  # then the submission itself
    state, session_dir = run_session(nersc.output_dir, n_scans=1, scan_width=8, scan_height=8)
    assert state.is_completed(), message(state)
    assert_scans(session_dir, 1, 8, 8)
    job = only_job(nersc.fake.jobs)  # a refused submission was repeated, never doubled
    retries = [r for r in caplog.records if r.name == "tasks.nersc.sfapi" and "retry" in r.getMessage()]
    assert len(retries) >= 5, [r.getMessage() for r in retries]
    assert_job_released(nersc, job)
    assert_nothing_left(session_dir, groups=job.pids)


@pytest.mark.timeout(90)
def test_nersc_sfapi_outage_while_the_job_starts_leaves_no_job_behind(nersc: NerscSetup) -> None:
    fake = nersc.fake
    fake.pending_polls = 3  # the outage begins while the first job is still PENDING
    retries = load_settings().sfapi.api_retries

    def outage_after_submission() -> None:
        """Once the job is submitted, fail every job query and the cancel: one whole allocate attempt."""
        if wait_until(lambda: fake.jobs, timeout=30):
            fake.fail_next_requests(2 * retries, 503, route="compute/jobs")

    saboteur = in_background(outage_after_submission)
    state, session_dir = run_session(nersc.output_dir, n_scans=1, scan_width=8, scan_height=8)
    saboteur.join(5)
    assert state.is_completed(), message(state)  # allocate-nodes was retried with a second job
    assert len(fake.jobs) == 2
    first, second = fake.jobs.values()
    assert read_state_file(session_dir)["job_id"] == second.jobid
    assert_job_released(nersc, second)
    # The first job could not be cancelled during the outage; it would start later and hold realtime nodes
    # until its walltime. The retry (or the end of the session) must cancel it once SFAPI answers again.
    assert first.state == "CANCELLED", f"job {first.jobid} left {first.state} after the session"
    assert_nothing_left(session_dir, groups=first.pids + second.pids)


@pytest.mark.timeout(60)
def test_nersc_job_that_never_starts_fails_the_session_and_is_cancelled(
    nersc: NerscSetup, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_env(monkeypatch, "sfapi", start_timeout=1)
    nersc.fake.stuck_pending = True
    t = time.monotonic()
    state, session_dir = run_session(nersc.output_dir, n_scans=1, scan_width=8, scan_height=8)
    assert state.is_failed()
    text = message(state)
    assert "not RUNNING after 1 s (last state PENDING)" in text, text
    job = only_job(nersc.fake.jobs)  # a start timeout is not retried with a second job
    assert job.state == "CANCELLED" and not job.pids
    assert ("DELETE", f"{API}/{job.jobid}") in nersc.fake.requests
    info = read_state_file(session_dir)
    assert info["job_id"] == job.jobid and "aggregator_pid" not in info  # never armed
    assert time.monotonic() - t < 30
    [allocate] = task_runs_of(state.state_details.flow_run_id)["allocate-nodes"]
    assert allocate.run_count == 1  # not retried: waiting longer is the start timeout's job
    assert_nothing_left(session_dir)


@pytest.mark.timeout(60)
def test_nersc_wrong_ssh_host_key_fails_the_session_and_cancels_the_job(
    nersc: NerscSetup, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    other = keygen(tmp_path / "other_host_key")
    kind, b64 = Path(f"{other}.pub").read_text().split()[:2]
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[{nersc.ssh.host}]:{nersc.ssh.port} {kind} {b64}\n")
    set_env(monkeypatch, "ssh", known_hosts=known_hosts)

    state, session_dir = run_session(nersc.output_dir, n_scans=1, scan_width=8, scan_height=8)
    assert state.is_failed()
    text = message(state)
    assert "HostKeyRejected" in text and "CHANGED" in text, text
    job = only_job(nersc.fake.jobs)
    assert job.pids, "the job had started its node streamer before the aggregator was armed"
    assert_job_released(nersc, job)
    assert "aggregator_pid" not in read_state_file(session_dir)
    assert_nothing_left(session_dir, groups=job.pids)
    # A pinned key that does not match will not match five seconds later: the step must not be retried.
    [arm] = task_runs_of(state.state_details.flow_run_id)["arm-aggregator"]
    assert arm.run_count == 1, f"arm-aggregator ran {arm.run_count} times on a host-key mismatch"


# ---- secrets -------------------------------------------------------------------------------------------
# Where the live page's token is meant to be: the session's own and the aggregator host's files, mode 0600.
TOKEN_FILES = ("live-token", "live-token-remote")


def everything_recorded(flow_run_id: uuid.UUID, *dirs: Path) -> str:
    """All an operator or an attacker with the Prefect database and the session's files could read: the
    run's logs, artifacts, parameters and state messages (its task runs' too), and every file in dirs but
    the live page's token files (which must be the user's alone: mode 0600)."""
    APILogWorker.drain_all(timeout=10)  # logs reach the API in batches: send what is still queued
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    parts = [json.dumps(run.parameters, default=str), str(run.state.message if run.state else "")]
    parts += [log.message for log in logs]
    parts += [str(t.state.message if t.state else "") for t in tasks]
    parts += [f"{a.description} {a.data}" for a in artifacts_of(flow_run_id).values()]
    for d in dirs:
        files = [f for f in d.rglob("*") if f.is_file() and f.suffix != ".h5"]
        assert all(f.stat().st_mode & 0o077 == 0 for f in files if f.name in TOKEN_FILES)
        parts += [f.read_text(errors="replace") for f in files if f.name not in TOKEN_FILES]
    assert len(logs) > 5 and any(str(d) in "".join(parts) for d in dirs)  # really read back
    return "\n".join(parts)


@pytest.mark.timeout(180)
def test_secrets_never_reach_logs_artifacts_or_messages(
    nersc: NerscSetup,
    sfapi_pem: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A NERSC session with every secret in play (SFAPI key, an SSH key behind a passphrase, CURVE keys on
    the aggregator, the nodes and the flow's monitor, the live page's token), then one failing on a wrong passphrase: none of the
    secrets appears in anything recorded."""
    caplog.set_level(logging.DEBUG)
    passphrase = "violet-kettle-47-orbit"
    locked = keygen(tmp_path / "locked_user_key", passphrase=passphrase)
    authorized = nersc.ssh.key_path.parent / "authorized_keys"
    before = authorized.read_text()
    authorized.write_text(before + (tmp_path / "locked_user_key.pub").read_text())
    keys = tmp_path / "curve"
    server_public, server_secret = write_keypair(keys, "aggregator")
    client_public, client_secret = write_keypair(keys, "session")
    set_env(monkeypatch, "ssh", key_path=locked, key_passphrase=passphrase)
    # Key file paths (never keys) of every host are part of the session's settings, which reach the
    # aggregator and the nodes as one settings file.
    set_env(
        monkeypatch,
        "streaming__curve",
        client_secret_file=client_secret,
        server_public_file=server_public,
        server_secret_file=server_secret,
        allowed_clients=[str(client_public)],
    )
    page_token = "amber-quay-" + uuid.uuid4().hex  # the live page's, on the aggregator host
    set_env(monkeypatch, "streaming__live", enabled=True, token=page_token, token_required=True)
    secrets = [passphrase, page_token]
    secrets += [line for line in sfapi_pem.splitlines() if "-----" not in line]
    secrets += [line for line in locked.read_text().splitlines() if "-----" not in line]
    secrets += [load_keypair(f)[1].get_secret_value() for f in (server_secret, client_secret)]
    try:
        state, session_dir = run_session(nersc.output_dir, n_scans=1, scan_width=8, scan_height=8)
        assert state.is_completed(), message(state)
        assert_scans(session_dir, 1, 8, 8)
        remote_log = (session_dir / "logs" / "aggregator-remote.log").read_text()
        assert "node and monitor sockets CURVE, 1 allowed client key(s)" in remote_log, remote_log
        assert read_state_file(session_dir)["live_url"]  # the page ran, with its configured token
        assert (session_dir / "live-token").read_text().strip() == page_token
        text = everything_recorded(state.state_details.flow_run_id, session_dir, nersc.fake.root)

        set_env(monkeypatch, "ssh", key_passphrase="not-" + passphrase)
        failed, failed_dir = run_session(nersc.output_dir, n_scans=1, scan_width=8, scan_height=8)
        assert failed.is_failed() and "wrong passphrase" in message(failed), message(failed)
        text += message(failed) + everything_recorded(failed.state_details.flow_run_id, failed_dir)
    finally:
        authorized.write_text(before)
    secrets += nersc.fake.issued_tokens + nersc.fake.assertions
    assert nersc.fake.issued_tokens and nersc.fake.assertions
    formatter = logging.Formatter("%(name)s %(message)s")
    text += "\n".join(formatter.format(r) for phase in ("setup", "call") for r in caplog.get_records(phase))
    leaked = [f"{secret[:6]}..." for secret in secrets if secret in text]
    assert not leaked, f"secrets recorded: {leaked}"
    assert_nothing_left(session_dir)


# ---- alerts --------------------------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_failed_session_alerts_the_webhook(stemstream_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.alerts import setup_alerts

    # A real failure an operator meets: the scan directory cannot be written (a file stands in its way).
    blocker = stemstream_env / "not-a-directory"
    blocker.write_text("a file where the scan directory should be\n")
    scan_dir = blocker / "scans"
    set_env(monkeypatch, "session", nodes=1, scan_dir=scan_dir)
    with webhook_receiver() as (url, received):
        automation = setup_alerts(url, ["stemstream-session"])
        try:
            state, session_dir = run_session(stemstream_env, n_scans=1, scan_width=8, scan_height=8)
            assert state.is_failed()
            text = message(state)
            assert f"scan output directory {scan_dir} is not writable" in text, text
            # Event -> trigger -> action -> webhook runs in the harness server's services (bounded wait).
            assert wait_until(lambda: received, timeout=30), "no alert reached the webhook within 30 s"
        finally:
            with get_client(sync_client=True) as client:  # later tests' failures must not alert a dead URL
                client.delete_automation(automation.id)
    [alert] = received
    assert alert["path"] == "/stemstream-alerts"
    subject, body = alert["json"]["subject"], alert["json"]["body"]
    assert state.name == "Failed"
    with get_client(sync_client=True) as client:
        run_name = client.read_flow_run(state.state_details.flow_run_id).name
    assert subject == f"stemstream: stemstream-session run {run_name} {state.name}"
    assert str(state.state_details.flow_run_id) in body
    assert f"scan output directory {scan_dir} is not writable" in body
    assert blocker.read_text().startswith("a file where") and not list(stemstream_env.rglob("*.h5"))
    assert_nothing_left(session_dir)


# ---- one route for settings ----------------------------------------------------------------------------
TOML_ONLY = """
[streaming]
node_slots = 5
aggregator_receiver_hwm = 123
name_template = "TOMLONLY_{session:05d}_{scan:05d}.h5"
"""


def _session_with_toml_only_settings(output_dir: Path) -> tuple[State, Path]:
    config = Path(os.environ["STEMSTREAM_CONFIG"])
    config.write_text(TOML_ONLY)
    return run_session(output_dir, n_scans=1, scan_width=8, scan_height=8)


@pytest.mark.timeout(120)
def test_a_setting_only_in_the_toml_file_reaches_every_local_process(stemstream_env: Path) -> None:
    """Node slots, a queue length and the file-name template set only in the session's TOML file are what
    the aggregator and both nodes use: they get them from the session's settings file, the only route
    (no STEMSTREAM_ variable is passed on to them)."""
    state, session_dir = _session_with_toml_only_settings(stemstream_env)
    assert state.is_completed(), message(state)
    [h5] = (session_dir / "scans").glob("*.h5")
    assert h5.name.startswith("TOMLONLY_") and h5.name.endswith("_00001.h5")
    logs = session_dir / "logs"
    for node in ("node0", "node1"):
        assert ": 5 slots of 32 frames" in (logs / f"{node}.log").read_text()
    assert "123 sectors per receiver connection" in (logs / "aggregator.log").read_text()
    settings = json.loads((session_dir / "settings.json").read_text())
    assert settings["streaming"]["node_slots"] == 5
    info = read_state_file(session_dir)
    for pid in info["local_pids"]:
        assert not alive(pid)
    assert_nothing_left(session_dir)


@pytest.mark.timeout(120)
def test_a_setting_only_in_the_toml_file_reaches_the_slurm_nodes_and_the_ssh_aggregator(
    nersc: NerscSetup,
) -> None:
    state, session_dir = _session_with_toml_only_settings(nersc.output_dir)
    assert state.is_completed(), message(state)
    [h5] = (session_dir / "scans").glob("*.h5")
    assert h5.name.startswith("TOMLONLY_")
    job = only_job(nersc.fake.jobs)
    node_log = (nersc.fake.root / f"pscratch/logs/stemstream-nodes_{job.jobid}.out").read_text()
    assert ": 5 slots of 32 frames" in node_log
    remote_log = (session_dir / "logs" / "aggregator-remote.log").read_text()
    assert "123 sectors per receiver connection" in remote_log
    assert "node_slots" not in job.script  # the batch script carries the settings file's path, not values
    assert_job_released(nersc, job)
