"""Why an allocation through the Superfacility API failed: transient (retried) or permanent."""

from __future__ import annotations

from counting.errors import PermanentError, StemstreamError, TransientError
from tasks.nersc.jobs import JobStatus, minutes


class AllocationError(StemstreamError, RuntimeError):
    """Base of every allocation failure (never raised itself); messages never contain keys or secrets."""


class SfapiUnavailable(TransientError, AllocationError):
    """SFAPI could not be reached or kept failing (network, 5xx, machine down); retrying later may work."""


class SfapiCredentialsError(PermanentError, AllocationError):
    """The SFAPI client credentials are missing, unreadable or refused."""


class JobSubmitError(PermanentError, AllocationError):
    """sbatch (through SFAPI) refused the job, or its outcome is unknown; do not blindly resubmit."""


class SfapiRequestFailed(PermanentError, AllocationError):
    """SFAPI refused a request or answered it unusably (a 4xx, an unexpected reply); it would again."""


class JobFailedError(PermanentError, AllocationError):
    """The job reached a state from which it will never be RUNNING (NODE_FAIL, CANCELLED, ...)."""

    def __init__(self, job_id: str, state: str, reason: str = "") -> None:
        why = JobStatus(job_id, state, reason).describe()
        super().__init__(f"Slurm job {job_id} is {state}: it will not run" + why[len(state) :])
        self.job_id = job_id
        self.state = state
        self.reason = reason


class JobStartTimeout(PermanentError, AllocationError):
    """The job did not reach RUNNING within the start timeout (the whole wait: a retry would only wait more)."""

    def __init__(self, job_id: str, timeout: float, last_state: str, reason: str = "") -> None:
        why = JobStatus(job_id, last_state, reason).describe()[len(last_state) :].strip()
        super().__init__(
            f"Slurm job {job_id} not RUNNING after {timeout:.0f} s (last state {last_state})"
            + (f"; {why[1:-1]}" if why else "")
            + "; the job is cancelled. Check the realtime QOS grant, the reservation and the queue, "
            "or wait longer (sfapi.start_timeout)"
        )
        self.job_id = job_id
        self.timeout = timeout
        self.last_state = last_state
        self.reason = reason


class AllocationCancelled(PermanentError, AllocationError):
    """The session was cancelled while its job waited to start; the job is cancelled (never left queued)."""

    def __init__(self, job_id: str, waited: float, status: JobStatus) -> None:
        super().__init__(
            f"cancelled while Slurm job {job_id} waited {minutes(waited)} to start, "
            f"{status.describe()}; the job is cancelled"
        )
        self.job_id = job_id
        self.waited = waited
        self.status = status
