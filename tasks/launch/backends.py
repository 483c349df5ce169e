"""Where a session's node streamers and aggregator run: chosen once, at the session's entry point.

* ``local`` (the embedded default): the node command runs as N local processes with the environment srun
  would give them, and the aggregator as a local process.
* ``nersc``: the node command runs under srun in a realtime Slurm job submitted through SFAPI, and the
  aggregator is started over SSH on the aggregator host (pinned host key).

Both sides have the same contract (start, check, stop), and both are strict: a node that dies is an error.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from counting.errors import PermanentError
from tasks.launch.plan import SessionPlan, aggregator_command, node_command, shell, view_command
from tasks.launch.processes import ProcessGroup
from tasks.nersc.batch import render_batch_script
from tasks.nersc.sfapi import JobStatus, SfapiAllocator
from tasks.settings import SfapiSettings, SlurmSettings, SshSettings
from tasks.ssh import start_remote_process, stop_remote_process

log = logging.getLogger(__name__)

# The session's processes get its settings as one file: none of this environment reaches them, so the
# file is the only route (no stale or partial STEMSTREAM_ variable can disagree with it).
SETTINGS_ENV = "STEMSTREAM_"


class NodeFailure(PermanentError, RuntimeError):
    """A node streamer (or its job) stopped while the session needed it.

    lost: names of the node streamers that stopped (empty: the whole job). writer_alive: the node hosting
    the scan writer still runs, so the scan in flight can still be written (by the writer's deadline) with
    the lost node's frames marked missing; decided by whoever knows the writer's host (the aggregator's
    monitor says it).
    """

    def __init__(self, message: str, lost: list[str] | None = None, writer_alive: bool = False) -> None:
        super().__init__(message)
        self.lost = lost or []
        self.writer_alive = writer_alive


class Nodes(Protocol):
    """Node streamers of a session."""

    job_id: str | None

    def start(self, plan: SessionPlan) -> str:
        """Start (or submit) the node streamers; returns a job id."""

    def wait_started(self) -> None:
        """Block until they run (a Slurm job RUNNING); raise if they cannot."""

    def check(self) -> None:
        """Raise NodeFailure if a node streamer has stopped."""

    def stop(self) -> None:
        """Stop them (cancel the job); safe to call more than once."""


class Aggregator(Protocol):
    """The session's aggregator."""

    pid: int | None

    def start(self, plan: SessionPlan) -> None:
        """Start (or reconfigure) the aggregator for this session."""

    def check(self) -> None:
        """Raise if it stopped."""

    def stop(self) -> None:
        """Stop it; safe to call more than once."""


@dataclass
class LocalNodes:
    """N node streamer processes on this machine, all started with the same command, as srun does."""

    group: ProcessGroup | None = None
    job_id: str | None = None

    def start(self, plan: SessionPlan) -> str:
        """Start the node processes; the aggregator tells each its role."""
        self.group = ProcessGroup(plan.session_dir / "logs")
        self.job_id = f"local-{os.getpid()}-{plan.session_id}"
        argv = node_command(plan)
        log.info("node command: %s", shell(argv))
        for rank in range(plan.n_nodes):
            self.group.start(
                f"node{rank}", argv, {"HDF5_USE_FILE_LOCKING": "FALSE"}, drop_env_prefix=SETTINGS_ENV
            )
        return self.job_id

    def wait_started(self) -> None:
        """Local processes run at once; fail if one already died."""
        self.check()

    def check(self) -> None:
        """Raise NodeFailure with the end of its log if a node process exited."""
        if self.group is None:
            return
        dead = self.group.dead()
        if dead:
            c = dead[0]
            raise NodeFailure(
                f"node streamer {c.name} exited with code {c.popen.returncode}:\n{c.tail()}",
                [node_name(d.pid) for d in dead],
            )

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, every node process and its counting workers."""
        if self.group is not None:
            self.group.stop()
            self.group = None


@dataclass
class SlurmNodes:
    """Node streamers in a realtime Slurm job submitted through SFAPI.

    on_wait: where the pending time and Slurm's reason go while the job waits to start (the session: its
    run log); cancelled: asked while it waits, True ends the wait and cancels the job (the session: is the
    flow run being cancelled?).
    """

    sfapi: SfapiSettings
    slurm: SlurmSettings
    job_id: str | None = None
    on_wait: Callable[[str], None] | None = field(default=None, repr=False)
    cancelled: Callable[[], bool] | None = field(default=None, repr=False)
    _allocator: SfapiAllocator | None = field(default=None, repr=False)

    def start(self, plan: SessionPlan) -> str:
        """Render the batch script and submit it; the job id is returned at once."""
        slurm = self.slurm.model_copy(update={"nodes": plan.n_nodes})
        # As production on NERSC's file systems; all other configuration is in the settings file.
        script = render_batch_script(slurm, node_command(plan), {"HDF5_USE_FILE_LOCKING": "FALSE"})
        (plan.session_dir / "node_streamers.sh").write_text(script)
        self._allocator = SfapiAllocator(self.sfapi)
        self.job_id = self._allocator.submit(script)
        return self.job_id

    def wait_started(self) -> None:
        """Wait for RUNNING as long as sfapi.start_timeout allows, reporting the pending time and Slurm's
        reason; the job is cancelled on a failure, a timeout or a cancellation (AllocationCancelled)."""
        self._allocator.wait_running(self.job_id, on_wait=self.on_wait, cancelled=self.cancelled)

    def check(self) -> None:
        """Raise NodeFailure if the job is no longer RUNNING: Slurm's state, reason and the job output's end."""
        status = self._allocator.status(self.job_id)
        if status.state != "RUNNING":
            raise NodeFailure(self._ended(self._settled(status)))

    def _settled(self, status: JobStatus, wait: float = 15.0) -> JobStatus:
        """A COMPLETING job's final state (FAILED, NODE_FAIL, TIMEOUT, ...), once Slurm has ended its
        processes (bounded: then COMPLETING it stays)."""
        deadline = time.monotonic() + wait
        while status.state == "COMPLETING" and time.monotonic() < deadline:
            time.sleep(min(self.sfapi.poll_interval, 1.0))
            status = self._allocator.status(self.job_id)
        return status

    def output_path(self) -> str | None:
        """The job's output file on the machine (#SBATCH -o), when log_dir is absolute."""
        if self.job_id is None or not posixpath.isabs(self.slurm.log_dir):
            return None
        return posixpath.join(self.slurm.log_dir, f"{self.slurm.job_name}_{self.job_id}.out")

    def _ended(self, status: JobStatus) -> str:
        message = f"Slurm job {self.job_id} is {status.describe()}, not RUNNING"
        if status.exit_code not in ("", "0:0"):
            message += f"; exit code {status.exit_code}"
        path = self.output_path()
        tail = self._allocator.read_output(path) if path else ""
        if tail:
            message += f"\nend of the job's output ({path}):\n{tail}"
        elif path:
            message += f"; its output: {path}"
        return message

    def stop(self) -> None:
        """Cancel the job (idempotent) and close the API session."""
        if self._allocator is None:
            return
        try:
            if self.job_id is not None:
                self._allocator.cancel(self.job_id)
        finally:
            self._allocator.close()
            self._allocator = None


@dataclass
class LocalAggregator:
    """The aggregator as a local process."""

    group: ProcessGroup | None = None

    @property
    def pid(self) -> int | None:
        """The aggregator process (its process group) while it runs."""
        return self.group.children[0].pid if self.group is not None and self.group.children else None

    def start(self, plan: SessionPlan) -> None:
        """Start it on the plan's addresses."""
        self.group = ProcessGroup(plan.session_dir / "logs")
        self.group.start("aggregator", aggregator_command(plan), drop_env_prefix=SETTINGS_ENV)
        if plan.streaming.live.enabled:  # the live page; its end never ends the session
            self.group.start("view", view_command(plan), drop_env_prefix=SETTINGS_ENV)

    def check(self) -> None:
        """Raise if the aggregator process exited."""
        dead = [c for c in self.group.dead() if c.name == "aggregator"] if self.group is not None else []
        if dead:
            c = dead[0]
            raise RuntimeError(f"aggregator exited with code {c.popen.returncode}:\n{c.tail()}")

    def stop(self) -> None:
        """Stop the process."""
        if self.group is not None:
            self.group.stop()
            self.group = None


@dataclass
class SshAggregator:
    """The aggregator on the aggregator host, started and stopped over SSH."""

    ssh: SshSettings
    remote_command: list[str] | None = None  # how to run stemstream there (default: the local CLI path)
    pid: int | None = None

    def start(self, plan: SessionPlan) -> None:
        """Start the aggregator for this session on the remote host; reads back its PID."""
        logs = plan.session_dir / "logs"
        remote_settings = str(logs / "aggregator-settings.json")  # written there over the same SSH session
        argv = aggregator_command(plan, remote_settings)
        if self.remote_command is not None:
            argv = [*self.remote_command, *argv[3:]]
        self.pid = start_remote_process(
            self.ssh,
            argv,
            str(logs / "aggregator-remote.log"),
            files={remote_settings: plan.settings_file.read_text()},
        )

    def check(self) -> None:
        """Nothing cheap to check remotely; the monitor heartbeat shows it is alive."""

    def stop(self) -> None:
        """Stop the remote aggregator (its whole process group)."""
        if self.pid is not None:
            stop_remote_process(self.ssh, self.pid)
            self.pid = None


def node_name(pid: int) -> str:
    """A node streamer's default name on this host, as it introduces itself to the aggregator."""
    return f"{socket.gethostname()}-{pid}"


def record_state(plan: SessionPlan, **fields: object) -> None:
    """Merge fields into the session's state file (job id, PIDs): what cleanup needs after a crash."""
    plan.session_dir.mkdir(parents=True, exist_ok=True)
    state = json.loads(plan.state_file.read_text()) if plan.state_file.exists() else {}
    state.update(fields)
    tmp = plan.state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, default=str))
    tmp.replace(plan.state_file)


def read_state(session_dir: Path) -> dict:
    """The session state file, or {} when there is none."""
    path = session_dir / "session.json"
    return json.loads(path.read_text()) if path.exists() else {}
