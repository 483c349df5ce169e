"""NERSC-backend sessions on a real Slurm: the session flow end to end, and Slurm's own failures.

The real sfapi_client talks to the loopback fake SFAPI, which submits the rendered batch script to the
loopback Slurm cluster (two slurmd: node1, node2; stemstream_testing/slurm_cluster.py, started once per
pytest session). The script runs under bash on the batch host, srun starts one node streamer per node with
the script's exports, the aggregator is started over SSH on the real loopback sshd, CURVE between them.
Every failure here is made with Slurm itself: a streamer killed (--kill-on-bad-exit), a node set down
(scontrol: NODE_FAIL), a job that cannot start (more nodes than exist, a drained node: PENDING with
Slurm's reason), a cancellation from the Prefect API, a walltime that runs out. After every test no job
process is left (the `slurm` fixture checks, and resets nodes); the cluster fixture checks its daemons.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.logging.handlers import APILogWorker
from prefect.states import Cancelling

from stemstream_testing.slurm_cluster import SlurmCluster
from stemstream_testing.support import strided_free_ports
from tasks.verify import verify_scan
from tests.flows.conftest import NerscSlurmSetup, set_env
from tests.flows.test_session import (
    assert_nothing_left,
    assert_scans,
    message,
    read_state_file,
    run_session,
)
from tests.tasks.helpers import alive, wait_until

pytestmark = pytest.mark.usefixtures("prefect_harness")

API = "/api/v1.2/compute/jobs/perlmutter"


# ---- helpers ------------------------------------------------------------------------------------------
def cluster(nersc: NerscSlurmSetup) -> SlurmCluster:
    assert nersc.slurm is not None
    return nersc.slurm


def the_session(nersc: NerscSlurmSetup, key: str, timeout: float = 90) -> dict[str, Any] | None:
    """The running session's state file once it has `key` (job_id, ready, ...), or None (bounded wait)."""
    sessions = nersc.output_dir / "sessions"
    found: list[dict[str, Any]] = []

    def has_key() -> bool:
        for d in sessions.glob("*"):
            try:
                info = read_state_file(d)
            except (OSError, ValueError):
                continue
            if info.get(key):
                found[:] = [{**info, "dir": d}]
                return True
        return False

    return found[0] if wait_until(has_key, timeout=timeout) else None


def in_background(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, name="saboteur", daemon=True)
    thread.start()
    return thread


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def streamers(slurm: SlurmCluster, job_id: str) -> dict[int, dict[str, str]]:
    """The job's node streamers (the tasks srun started: children of a slurmstepd), pid -> environment."""
    return {
        pid: _environ(pid)
        for pid in slurm.job_processes(job_id)
        if " node " in _cmdline(pid)
        and "flows.cli" in _cmdline(pid)
        and _cmdline(_ppid(pid)).startswith("slurmstepd")
    }


def flow_run_logs(flow_run_id: uuid.UUID) -> list[str]:
    """The flow run's log messages (its tasks' included), read back from the Prefect API."""
    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


def cancel_flow_run(run_id: str) -> None:
    """What the UI's Cancel button does: the run goes to Cancelling."""
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Cancelling(), force=True)


def assert_released(nersc: NerscSlurmSetup, job_id: str, session_dir: Path, final: str) -> None:
    """The job ended as `final` in Slurm, the session asked SFAPI to cancel it, no process of it is left."""
    slurm = cluster(nersc)
    assert ("DELETE", f"{API}/{job_id}") in nersc.fake.requests
    assert nersc.fake.wait_state(job_id, {final}, timeout=20) == final
    assert wait_until(lambda: not slurm.job_processes(job_id), timeout=slurm.kill_wait + 10), (
        f"job {job_id} left {slurm.job_processes(job_id)}"
    )
    info = read_state_file(session_dir)
    if info.get("aggregator_pid"):
        assert wait_until(lambda: not alive(info["aggregator_pid"]), timeout=10)
    assert_nothing_left(session_dir)


# ---- a session end to end -----------------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_nersc_session_on_real_slurm_end_to_end(
    nersc_slurm: NerscSlurmSetup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two node streamers under srun on two Slurm nodes, the aggregator over SSH with two forwarding
    processes, CURVE on every connection, two scans counted and verified, the job cancelled at the end,
    nothing left."""
    nersc = nersc_slurm
    # forwarding process 1 binds every receiver and the node address 100 ports up: none may be another's
    receivers, nodes_bind, monitor_bind = (f"tcp://127.0.0.1:{p}" for p in strided_free_ports(3, paths=2))
    set_env(
        monkeypatch,
        "streaming",
        aggregator_processes=2,
        receivers=[receivers],
        nodes_bind=nodes_bind,
        monitor_bind=monitor_bind,
    )
    slurm = cluster(nersc)
    seen: dict[int, dict[str, str]] = {}

    def look_at_the_streamers() -> None:
        info = the_session(nersc, "ready")
        if info is not None:
            seen.update(streamers(slurm, info["job_id"]))

    observer = in_background(look_at_the_streamers)
    state, session_dir = run_session(nersc.output_dir, n_scans=2, scan_width=8, scan_height=8)
    observer.join(10)
    assert state.is_completed(), message(state)
    records = assert_scans(session_dir, 2, 8, 8)
    assert [r["scan_number"] for r in records] == [1, 2]

    info = read_state_file(session_dir)
    job_id = info["job_id"]
    job = nersc.fake.jobs[job_id]
    assert job.slurm and job.script == (session_dir / "node_streamers.sh").read_text()
    slurm_job = slurm.job(job_id)
    assert slurm_job["NodeList"] == "node[1-2]" and slurm_job["BatchHost"] == "node1"
    assert slurm_job["Features"] == "cpu" and slurm_job["Account"] == "m1234"
    # srun started one streamer per node, with the script's exports and no variable of the flow's process.
    assert sorted(env["SLURMD_NODENAME"] for env in seen.values()) == ["node1", "node2"], seen
    assert sorted(env["SLURM_PROCID"] for env in seen.values()) == ["0", "1"]
    assert all(env["SLURM_JOB_ID"] == job_id for env in seen.values())
    assert all(env.get("HDF5_USE_FILE_LOCKING") == "FALSE" for env in seen.values())
    assert not [n for env in seen.values() for n in env if n.startswith(("STEMSTREAM_", "PREFECT_"))]
    output = (nersc.fake.root / f"pscratch/logs/stemstream-nodes_{job_id}.out").read_text()
    assert "welcomed as node 0 of 2" in output and "welcomed as node 1 of 2" in output, output
    remote_log = (session_dir / "logs" / "aggregator-remote.log").read_text()
    assert "node and monitor sockets CURVE, 1 allowed client key(s)" in remote_log, remote_log
    assert "scan 2 ends (complete)" in remote_log
    assert "1 forwarding process(es) up" in remote_log, remote_log
    assert "connecting to 1 forwarding process(es)" in output, output
    assert_released(nersc, job_id, session_dir, "CANCELLED")
    assert not any(alive(pid) for pid in seen)


# ---- Slurm ends the job -------------------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_a_streamer_that_dies_ends_the_job_through_kill_on_bad_exit(nersc_slurm: NerscSlurmSetup) -> None:
    """One streamer is killed mid-session (as the OOM killer would): srun's --kill-on-bad-exit ends the
    other one and the job (FAILED, NonZeroExitCode), and the session fails saying so, with srun's words."""
    nersc = nersc_slurm
    slurm = cluster(nersc)
    killed: list[int] = []
    others: list[int] = []

    def kill_one_streamer() -> None:
        info = the_session(nersc, "ready")
        if info is None:
            return
        wait_until(lambda: list((info["dir"] / "scans").glob("*_00001.json")), timeout=60)
        found = streamers(slurm, info["job_id"])
        victim = next(pid for pid, env in found.items() if env["SLURM_PROCID"] == "1")
        others.extend(pid for pid in found if pid != victim)
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)

    saboteur = in_background(kill_one_streamer)
    state, session_dir = run_session(
        nersc.output_dir, n_scans=3, scan_width=16, scan_height=16, frame_rate=40
    )
    saboteur.join(10)
    assert killed, "the session never wrote scan 1"
    assert state.is_failed()
    text = message(state)
    job_id = read_state_file(session_dir)["job_id"]
    assert f"Slurm job {job_id} is FAILED (Slurm's reason: NonZeroExitCode" in text, text
    assert "--kill-on-bad-exit ended the job" in text
    assert "node2: task 1: Killed" in text, text  # srun's words, from the job's output file through SFAPI
    assert others and not any(alive(pid) for pid in others)  # Slurm ended the other streamer
    assert list((session_dir / "scans").glob("*_00001.h5"))  # scan 1 was written before
    assert_released(nersc, job_id, session_dir, "FAILED")


@pytest.mark.timeout(180)
def test_a_node_set_down_is_node_fail_and_the_session_fails(nersc_slurm: NerscSlurmSetup) -> None:
    nersc = nersc_slurm
    slurm = cluster(nersc)

    def node2_down() -> None:
        if the_session(nersc, "ready") is not None:
            slurm.set_node_state("node2", "down", reason="stemstream test: node lost")

    saboteur = in_background(node2_down)
    state, session_dir = run_session(
        nersc.output_dir, n_scans=2, scan_width=16, scan_height=16, frame_rate=40
    )
    saboteur.join(10)
    assert state.is_failed()
    text = message(state)
    job_id = read_state_file(session_dir)["job_id"]
    assert f"Slurm job {job_id} is NODE_FAIL (Slurm's reason: NodeDown" in text, text
    assert "a node of the allocation failed" in text
    time.sleep(1)  # --no-requeue: it stays NODE_FAIL, Slurm does not start the streamers again
    assert slurm.job(job_id)["JobState"] == "NODE_FAIL" and slurm.job(job_id)["Restarts"] == "0"
    assert_released(nersc, job_id, session_dir, "NODE_FAIL")


# ---- jobs that cannot start ---------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_more_nodes_than_exist_stays_pending_with_the_reason_in_the_flow_run(
    nersc_slurm: NerscSlurmSetup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three nodes on a two-node cluster: PENDING (PartitionNodeLimit); the wait is reported in the flow
    run at intervals, then ends at sfapi.start_timeout with the reason, and the job is cancelled."""
    nersc = nersc_slurm
    set_env(monkeypatch, "sfapi", start_timeout=4)
    t0 = time.monotonic()
    state, session_dir = run_session(nersc.output_dir, n_scans=1, scan_width=8, scan_height=8, nodes=3)
    assert state.is_failed()
    assert time.monotonic() - t0 < 60
    text = message(state)
    job_id = read_state_file(session_dir)["job_id"]
    assert f"Slurm job {job_id} not RUNNING after 4 s (last state PENDING)" in text, text
    assert "PartitionNodeLimit: the job asks for more nodes than the partition allows" in text
    logs = flow_run_logs(state.state_details.flow_run_id)
    waits = [m for m in logs if m.startswith(f"Slurm job {job_id} waiting to start for")]
    assert len(waits) >= 3 and "PartitionNodeLimit" in waits[-1], logs  # at intervals (1 s here)
    assert "aggregator_pid" not in read_state_file(session_dir)  # never armed
    assert_released(nersc, job_id, session_dir, "CANCELLED")


DRAINED = "nodes the job needs are down, drained or reserved"  # how the flow words Slurm's reason


@pytest.mark.timeout(120)
def test_cancelled_from_the_prefect_ui_while_the_job_waits_on_a_drained_node(
    nersc_slurm: NerscSlurmSetup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drained node keeps the job PENDING (Slurm's reason in the flow run); the session waits (a long
    start_timeout) and stays cancellable: Cancel ends it Cancelled at once, and the job is cancelled."""
    nersc = nersc_slurm
    slurm = cluster(nersc)
    set_env(monkeypatch, "sfapi", start_timeout=600)
    slurm.set_node_state("node2", "drain", reason="stemstream test: drained")
    cancelled_at: list[float] = []

    def cancel_while_pending() -> None:
        info = the_session(nersc, "job_id")
        if info is None:
            return
        run_id = uuid.UUID(str(info["flow_run"]))

        def reported() -> bool:  # the flow run has logged a wait with Slurm's reason (as the UI shows it)
            return any(DRAINED in m for m in flow_run_logs(run_id))

        # Bounded: the reports come every pending_log_interval (1 s), later on a loaded machine. Cancelled
        # either way, so that a report without the reason fails the assertions below, not the timeout.
        wait_until(reported, timeout=45, interval=0.5)
        cancelled_at.append(time.monotonic())
        cancel_flow_run(info["flow_run"])

    canceller = in_background(cancel_while_pending)
    state, session_dir = run_session(nersc.output_dir, n_scans=1, scan_width=8, scan_height=8)
    canceller.join(10)
    assert cancelled_at, "the job never showed a pending reason"
    assert state.is_cancelled(), message(state)
    assert time.monotonic() - cancelled_at[0] < 20
    job_id = read_state_file(session_dir)["job_id"]
    assert slurm.job(job_id)["JobState"] == "CANCELLED"
    logs = flow_run_logs(state.state_details.flow_run_id)
    waits = [m for m in logs if m.startswith(f"Slurm job {job_id} waiting to start for")]
    assert any(DRAINED in m for m in waits), logs
    assert any("waiting up to 10 min" in m for m in waits), waits
    assert_released(nersc, job_id, session_dir, "CANCELLED")


@pytest.mark.timeout(120)
def test_cancelled_from_the_prefect_ui_while_running_cancels_the_slurm_job(
    nersc_slurm: NerscSlurmSetup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An instrument session waits for scans; Cancel from the UI ends it Cancelled, cancels the job and
    stops the live page on the aggregator host with the aggregator."""
    nersc = nersc_slurm
    set_env(monkeypatch, "streaming__live", enabled=True)

    def cancel_when_ready() -> None:
        info = the_session(nersc, "ready")
        if info is not None:
            cancel_flow_run(info["flow_run"])

    canceller = in_background(cancel_when_ready)
    state, session_dir = run_session(nersc.output_dir, camera="instrument", n_scans=0)
    canceller.join(10)
    assert state.is_cancelled(), message(state)
    info = read_state_file(session_dir)
    assert info["live_url"] and info["view_pid"]  # the page ran on the aggregator host
    assert_released(nersc, info["job_id"], session_dir, "CANCELLED")
    assert wait_until(lambda: not alive(info["view_pid"]), timeout=10)


# ---- the walltime -------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_walltime_that_runs_out_ends_the_session_with_the_scans_so_far_written(
    nersc_slurm: NerscSlurmSetup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """slurm.walltime 1 min (Slurm's smallest: limits are whole minutes) and more scans than fit: Slurm ends
    the job (TIMEOUT, TimeLimit), the session fails saying so, and every scan written before is complete."""
    nersc = nersc_slurm
    set_env(monkeypatch, "slurm", walltime="00:01:00")
    t0 = time.monotonic()
    state, session_dir = run_session(
        nersc.output_dir, n_scans=100, scan_width=8, scan_height=8, frame_rate=10
    )
    elapsed = time.monotonic() - t0
    assert state.is_failed()
    text = message(state)
    job_id = read_state_file(session_dir)["job_id"]
    assert f"Slurm job {job_id} is TIMEOUT (Slurm's reason: TimeLimit" in text, text
    assert "the job reached its walltime" in text
    assert 60 <= elapsed < 150
    written = sorted((session_dir / "scans").glob("*.h5"))
    complete = [p for p in written if verify_scan(p, 8, 8, 1.0).ok]
    assert len(complete) >= 3, written  # at 6.4 s a scan, several fit in the minute
    assert [p.name[-8:-3] for p in complete[:3]] == ["00001", "00002", "00003"]
    assert len(written) - len(complete) <= 1  # at most the scan in flight when Slurm ended the job
    assert_released(nersc, job_id, session_dir, "TIMEOUT")
