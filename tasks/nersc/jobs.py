"""Slurm job states as the Superfacility API reports them, Slurm's reasons in words, and one typed status."""

from __future__ import annotations

from dataclasses import dataclass

RUNNING = "RUNNING"
UNKNOWN = "UNKNOWN"  # neither squeue nor sacct knows the job (yet: sacct can lag right after submit)
# States a job never leaves (Slurm's "base states" that end a job); the client's own list misses four.
TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "SPECIAL_EXIT",
        "TIMEOUT",
    }
)
# States from which a job may still start; anything else (terminal or ending) fails wait_running.
WAITING_STATES = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESV_DEL_HOLD",
        "RESIZING",
        "SUSPENDED",
        "STOPPED",
        UNKNOWN,
    }
)


# Slurm's reasons (squeue %r, scontrol Reason=), by prefix, in words an operator can act on.
REASON_HINTS = (
    ("PartitionNodeLimit", "the job asks for more nodes than the partition allows (slurm.nodes)"),
    ("QOSMaxNodePerJobLimit", "the job asks for more nodes than the QOS allows (slurm.nodes)"),
    ("QOSGrpNodeLimit", "the QOS's nodes are all in use (another realtime job of the project?)"),
    ("AssocGrpNodeLimit", "the project's node limit is in use"),
    ("ReqNodeNotAvail", "nodes the job needs are down, drained or reserved"),
    ("Nodes_required_for_job_are_DOWN", "nodes the job needs are down, drained or reserved"),
    ("Resources", "waiting for nodes to become free"),
    ("Priority", "other jobs are ahead in the queue"),
    ("Reservation", "waiting for its reservation"),
    ("JobHeld", "the job is held (scontrol release)"),
    ("BeginTime", "the job's start time is in the future"),
    ("NonZeroExitCode", "a node streamer exited non-zero and --kill-on-bad-exit ended the job"),
    ("NodeDown", "a node of the allocation failed"),
    ("TimeLimit", "the job reached its walltime (slurm.walltime)"),
    ("JobLaunchFailure", "Slurm could not start the batch script: does slurm.log_dir exist on the machine?"),
)


def reason_hint(reason: str) -> str:
    """What Slurm's reason means, in words ("" for none or an unknown one)."""
    # Slurm words some reasons with underscores in one place and spaces in another ("Nodes required for
    # job are DOWN, DRAINED ..." in squeue's %r): both match.
    spaced = reason.replace("_", " ")
    return next((hint for prefix, hint in REASON_HINTS if spaced.startswith(prefix.replace("_", " "))), "")


def minutes(seconds: float) -> str:
    """A duration for people: 45 s, 3 min 20 s, 1 h 5 min."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s" if seconds % 60 else f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


@dataclass(frozen=True)
class JobStatus:
    """A job's Slurm state, with Slurm's reason and exit code where the query gives them."""

    job_id: str
    state: str
    reason: str = ""  # "" when Slurm gives none ("None")
    exit_code: str = ""  # "exit:signal" (sacct), "" when not known

    def describe(self) -> str:
        """e.g. "PENDING (Slurm's reason: PartitionNodeLimit: the job asks for more nodes than ...)"."""
        if not self.reason:
            return self.state
        hint = reason_hint(self.reason)
        return f"{self.state} (Slurm's reason: {self.reason}{': ' + hint if hint else ''})"
