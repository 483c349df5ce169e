"""Where a session's node streamers and aggregator run: chosen once, at the session's entry point.

* ``local`` (the embedded default): the node command runs as N local processes with the environment srun
  would give them, and the aggregator as a local process.
* ``nersc``: the node command runs under srun in a realtime Slurm job submitted through SFAPI, and the
  aggregator and its live page are started over SSH on the aggregator host (pinned host key).

Both sides have the same contract (start, check, stop), and both are strict: a node that dies is an error.
Each also records what it started in the session's state (``record``) and can release that from the state
alone (``release_recorded``): how the cleanup hook stops a session whose flow crashed or was cancelled.
"""

from __future__ import annotations

import logging
import os
import posixpath
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from streaming.view.token import TOKEN_FILE, write_token
from tasks.launch.errors import AggregatorExited, NodeFailure
from tasks.launch.plan import SessionPlan, aggregator_command, node_command, shell, view_command
from tasks.launch.processes import ProcessGroup, kill_carrying
from tasks.launch.remote_view import RemotePage, start_remote_view, stop_remote_groups
from tasks.launch.state import SessionState
from tasks.nersc.batch import render_batch_script
from tasks.nersc.sfapi import JobStatus, SfapiAllocator
from tasks.settings import SfapiSettings, SlurmSettings, SshSettings
from tasks.ssh import RemoteError, remote_exit_tail, start_remote_process

log = logging.getLogger(__name__)

# s after its start at which SshAggregator.check looks at the remote aggregator (an SSH connection each:
# a few, early, when a bad setting ends it; later the monitor's heartbeat shows that it is alive)
LOOKS_AT = (2.0, 4.0, 8.0, 16.0, 32.0)

# The session's processes get its settings as one file: none of this environment reaches them, so the
# file is the only route (no stale or partial STEMSTREAM_ variable can disagree with it).
SETTINGS_ENV = "STEMSTREAM_"


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

    def record(self, state: SessionState) -> None:
        """Note in the state what was started (job id, processes), so cleanup can find it."""

    def release_recorded(self, state: SessionState) -> None:
        """Stop what the state says was started (after a crash: no started object is left)."""


class Aggregator(Protocol):
    """The session's aggregator."""

    pid: int | None

    def start(self, plan: SessionPlan) -> None:
        """Start (or reconfigure) the aggregator for this session."""

    def check(self) -> None:
        """Raise if it stopped."""

    def stop(self) -> None:
        """Stop it; safe to call more than once."""

    def record(self, state: SessionState) -> None:
        """Note in the state what was started (kind, PID), so cleanup can find it."""

    def release_recorded(self, state: SessionState) -> None:
        """Stop what the state says was started (after a crash: no started object is left)."""


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

    def record(self, state: SessionState) -> None:
        """The job id, the node processes and their token."""
        state.job_id = self.job_id
        if self.group is not None:
            state.local_pids = [c.pid for c in self.group.children]
            state.add_tokens(self.group.token)

    def release_recorded(self, state: SessionState) -> None:
        """Stop every live process carrying one of the session's tokens (counting workers included): SIGTERM,
        then SIGKILL after a bounded wait; their leftover /dev/shm segments unlinked."""
        kill_carrying(state.process_tokens)


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

    def record(self, state: SessionState) -> None:
        """The Slurm job id (recorded before the job may start, so cleanup can always cancel it)."""
        state.job_id = self.job_id

    def release_recorded(self, state: SessionState) -> None:
        """Cancel the recorded Slurm job through SFAPI (a job already gone is fine)."""
        if state.job_id:
            with SfapiAllocator(self.sfapi) as allocator:
                allocator.cancel(state.job_id)


@dataclass
class LocalAggregator:
    """The aggregator as a local process."""

    group: ProcessGroup | None = None
    view_lost: bool = False  # the live view exited (reported once)

    @property
    def pid(self) -> int | None:
        """The aggregator process (its process group) while it runs."""
        return self.group.children[0].pid if self.group is not None and self.group.children else None

    def start(self, plan: SessionPlan) -> None:
        """Start it on the plan's addresses."""
        self.group = ProcessGroup(plan.session_dir / "logs")
        self.group.start("aggregator", aggregator_command(plan), drop_env_prefix=SETTINGS_ENV)
        if plan.streaming.live.enabled:  # the live page; its end never ends the session
            if plan.streaming.live.token is not None:  # not in its settings file (a secret) nor its argv
                write_token(plan.session_dir / TOKEN_FILE, plan.streaming.live.token.get_secret_value())
            self.group.start("view", view_command(plan), drop_env_prefix=SETTINGS_ENV)

    def check(self) -> None:
        """Raise if the aggregator process exited; a live view that exited is reported (once, as an error
        naming it) and the session goes on without its page."""
        dead = self.group.dead() if self.group is not None else []
        for c in dead:
            if c.name == "aggregator":
                raise AggregatorExited(f"aggregator exited with code {c.popen.returncode}:\n{c.tail()}")
            if c.name == "view" and not self.view_lost:
                self.view_lost = True
                log.error("live view exited with code %s; the session goes on without its page:\n%s",
                          c.popen.returncode, c.tail())  # fmt: skip

    def stop(self) -> None:
        """Stop the process."""
        if self.group is not None:
            self.group.stop()
            self.group = None

    def record(self, state: SessionState) -> None:
        """Its kind, its PID and the token its processes (the live page's too) carry."""
        state.aggregator, state.aggregator_pid = type(self).__name__, self.pid
        if self.group is not None:
            state.add_tokens(self.group.token)

    def release_recorded(self, state: SessionState) -> None:
        """Stop every live process carrying one of the session's tokens (SIGTERM, then SIGKILL)."""
        kill_carrying(state.process_tokens)


@dataclass
class SshAggregator:
    """The aggregator on the aggregator host, started and stopped over SSH; the live page beside it (when
    live.enabled), started and stopped with it (tasks.launch.remote_view)."""

    ssh: SshSettings
    remote_command: list[str] | None = None  # how to run stemstream there (default: the local CLI path)
    pid: int | None = None
    token: str = field(default_factory=lambda: uuid.uuid4().hex)  # in its environment: stop checks it
    page: RemotePage | None = None  # the live page, once it answers
    _attempts: int = 0
    _log: str | None = None  # its log on the host
    _started: float = 0.0  # time.monotonic() when it was started
    _looks: int = 0  # how many of LOOKS_AT check() has made since

    def start(self, plan: SessionPlan) -> None:
        """Start the aggregator for this session on the remote host, then its live page; reads back their
        PIDs (and the page's address). A retry first stops what the previous attempt started."""
        if self.pid is not None or self.page is not None:
            self.stop()
        self._attempts += 1
        logs = plan.session_dir / "logs"
        remote_settings = str(logs / "aggregator-settings.json")  # written there over the same SSH session
        argv = aggregator_command(plan, remote_settings)
        if self.remote_command is not None:
            argv = [*self.remote_command, *argv[3:]]
        self._log = str(logs / "aggregator-remote.log")
        self.pid = start_remote_process(
            self.ssh,
            argv,
            self._log,
            files={remote_settings: plan.settings_file.read_text()},
            token=self.token,
        )
        self._started, self._looks = time.monotonic(), 0
        if plan.streaming.live.enabled:  # the page's end never ends the session (as a local one's)
            self.page = start_remote_view(
                self.ssh, plan, remote_settings, self.remote_command, self.token, self._attempts
            )

    def check(self) -> None:
        """Raise AggregatorExited, with the end of its log, if the aggregator has exited: looked at over SSH
        at LOOKS_AT s after its start (a bad setting ends it after its imports, later than start's own
        check); between and after those, the monitor's heartbeat shows that it is alive."""
        if self.pid is None or self._log is None or self._looks >= len(LOOKS_AT):
            return
        if time.monotonic() - self._started < LOOKS_AT[self._looks]:
            return
        self._looks += 1
        try:
            tail = remote_exit_tail(self.ssh, self.pid, self._log)
        except RemoteError as exc:  # the host did not answer this time: the monitor's timeouts still hold
            log.warning("could not look at the aggregator on %s: %s", self.ssh.host, exc)
            return
        if tail is not None:
            raise AggregatorExited(f"aggregator on {self.ssh.host} (PID {self.pid}) exited:\n{tail}")

    def stop(self) -> None:
        """Stop the live page and the remote aggregator (each its whole process group), both at once."""
        page = [self.page.pid] if self.page is not None else []
        stop_remote_groups(self.ssh, [*page, *([self.pid] if self.pid is not None else [])], self.token)
        self.page = self.pid = None

    def record(self, state: SessionState) -> None:
        """Its kind, the PIDs of its and its page's process groups on the aggregator host, the token they
        carry, and the page's address (without its token)."""
        state.aggregator, state.aggregator_pid = type(self).__name__, self.pid
        state.aggregator_token = self.token
        state.view_pid = self.page.pid if self.page is not None else None
        state.live_url = self.page.url if self.page is not None else None

    def release_recorded(self, state: SessionState) -> None:
        """Stop the recorded page and remote process group over SSH, both at once (refused if a PID no
        longer carries the recorded token: ForeignProcess)."""
        pids = [int(p) for p in (state.view_pid, state.aggregator_pid) if p]
        stop_remote_groups(self.ssh, pids, state.aggregator_token)


def node_name(pid: int) -> str:
    """A node streamer's default name on this host, as it introduces itself to the aggregator."""
    return f"{socket.gethostname()}-{pid}"


def release_recorded(state: SessionState, nodes: Nodes, aggregator: Aggregator) -> None:
    """Stop everything the state says the session started, with backends built for its kind (no started
    object needed). The aggregator goes first and at best effort: a host that cannot be reached over SSH
    must not keep the nodes' job alive, nor hide the run's own failure."""
    try:
        aggregator.release_recorded(state)
    except RemoteError as exc:
        log.warning("could not stop the recorded aggregator (PID %s): %s", state.aggregator_pid, exc)
    nodes.release_recorded(state)
