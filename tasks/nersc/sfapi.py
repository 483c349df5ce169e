"""Allocate Perlmutter nodes through the NERSC Superfacility API: submit, wait for RUNNING, cancel.

Plain code (no Prefect) over sfapi_client 0.6, which does the OAuth (client_credentials with a
private_key_jwt) and the HTTP. What this module adds, and why:

* Bounded retries. The client retries by itself up to 10 times over ~65 s and then raises
  ``tenacity.RetryError``; here that is switched off and every API operation is retried with exponential
  back-off bounded by ``api_retries`` attempts and ``api_timeout`` seconds, then ``SfapiUnavailable``.
  A submission is retried only when the request provably did not reach Slurm (connect error, 429/502/503):
  a second sbatch would hold a second realtime allocation.
* A bounded submit. ``Compute.submit_job`` polls its sbatch task forever and restarts on any error; here
  the task is polled until ``submit_timeout``.
* Our own terminal states. The client's TERMINAL_STATES lacks NODE_FAIL, BOOT_FAIL, DEADLINE and REVOKED,
  so its waits never end for them; :func:`SfapiAllocator.wait_running` fails on any state that cannot
  turn into RUNNING, and on a timeout.
* Slurm's reason with every state (:class:`JobStatus`): why a job pends (PartitionNodeLimit, Priority,
  ReqNodeNotAvail, ...) or why it ended (NonZeroExitCode, NodeDown, TimeLimit, JobLaunchFailure), with a
  hint in words. A realtime job may wait in the queue for many minutes (rarely, up to ~25): the wait is as
  long as ``start_timeout`` (30 min by default), reports the pending time and the reason every
  ``pending_log_interval`` seconds, and stops at once, cancelling the job, when the caller says the session
  is being cancelled. A job given up on is always cancelled, so it can never start later for nobody.
* Token refresh after a 401: the client session is rebuilt once, which fetches a new token.
* No secrets in messages or logs: errors carry the HTTP status and the URL path, never headers or bodies.

The client, and what a failed request means and how it is described, are in tasks.nersc.requests; the
retry loop is here, so its log lines stay under this module's logger.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from tasks.nersc.credentials import credentials
from tasks.nersc.errors import (
    AllocationCancelled,
    AllocationError,
    JobFailedError,
    JobStartTimeout,
    JobSubmitError,
    SfapiCredentialsError,
    SfapiRequestFailed,
    SfapiUnavailable,
)
from tasks.nersc.jobs import (
    RUNNING,
    TERMINAL_STATES,
    UNKNOWN,
    WAITING_STATES,
    JobStatus,
    minutes,
    reason_hint,
)
from tasks.nersc.requests import BoundedClient, Reaction, classify, describe, fatal_error, unless_error
from tasks.settings import SfapiSettings

# The allocation's API: what this module raises and returns, importable from here.
__all__ = [
    "AllocationCancelled",
    "AllocationError",
    "JobFailedError",
    "JobStartTimeout",
    "JobStatus",
    "JobSubmitError",
    "SfapiAllocator",
    "SfapiCredentialsError",
    "SfapiRequestFailed",
    "SfapiSettings",
    "SfapiUnavailable",
    "allocate",
    "reason_hint",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

_MAX_BACKOFF = 10.0


class SfapiAllocator:
    """Submit, watch and cancel Slurm jobs through SFAPI; a context manager owning one client session."""

    def __init__(self, settings: SfapiSettings) -> None:
        self._settings = settings
        self._client_id, self._key = credentials(settings)
        self._client: BoundedClient | None = None

    def __enter__(self) -> SfapiAllocator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP session."""
        if self._client is not None:
            self._client.close()
            self._client = None

    # ---- public API -----------------------------------------------------------------------------
    def submit(self, script: str) -> str:
        """Submit a batch script (its text) and return the Slurm job id."""
        if not script.startswith("#!") or "\n" not in script:
            raise JobSubmitError("the batch script must start with #! (SFAPI treats anything else as a path)")
        self._check_machine()
        machine = self._settings.machine
        response = self._call(
            "submit",
            lambda c: c.post(f"compute/jobs/{machine}", data={"job": script, "isPath": False}).json(),
            idempotent=False,
        )
        if str(response.get("status", "")).upper() == "ERROR" or not response.get("task_id"):
            raise JobSubmitError(f"SFAPI refused the submission: {response.get('error')}")
        job_id = self._wait_submit_task(str(response["task_id"]))
        log.info("submitted Slurm job %s on %s", job_id, machine)
        return job_id

    def state(self, job_id: str) -> str:
        """The job's Slurm state (squeue, else sacct); UNKNOWN when neither lists it."""
        return self.status(job_id).state

    def status(self, job_id: str) -> JobStatus:
        """The job's state with Slurm's reason (squeue, else sacct); state UNKNOWN when neither lists it."""
        status = self._query_status(job_id, sacct=False)
        if status is None:
            status = self._query_status(job_id, sacct=True)
        return status or JobStatus(job_id, UNKNOWN)

    def wait_running(
        self,
        job_id: str,
        timeout: float | None = None,
        *,
        cancel_on_failure: bool = True,
        on_wait: Callable[[str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> str:
        """Poll until the job is RUNNING; JobFailedError, JobStartTimeout or AllocationCancelled otherwise,
        after cancelling the job.

        While it waits, the pending time and Slurm's reason are logged (and passed to ``on_wait``) at once and
        then every ``pending_log_interval`` s; ``cancelled()`` is asked on every poll: True ends the wait."""
        s = self._settings
        timeout = s.start_timeout if timeout is None else timeout
        start = time.monotonic()
        deadline = start + timeout
        next_report = start
        try:
            while True:
                status = self.status(job_id)
                waited = time.monotonic() - start
                if status.state == RUNNING:
                    log.info("Slurm job %s is RUNNING (%s in the queue)", job_id, minutes(waited))
                    return status.state
                if status.state not in WAITING_STATES:
                    raise JobFailedError(job_id, status.state, status.reason)
                if cancelled is not None and cancelled():
                    raise AllocationCancelled(job_id, waited, status)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise JobStartTimeout(job_id, timeout, status.state, status.reason)
                if time.monotonic() >= next_report:
                    message = (
                        f"Slurm job {job_id} waiting to start for {minutes(waited)}: {status.describe()}; "
                        f"waiting up to {minutes(timeout)} (sfapi.start_timeout)"
                    )
                    log.info(message)
                    if on_wait is not None:
                        on_wait(message)
                    next_report = time.monotonic() + s.pending_log_interval
                time.sleep(min(s.poll_interval, remaining))
        except BaseException:  # KeyboardInterrupt and Prefect's timeout too: never leave the job queued
            if cancel_on_failure:
                # A job that starts after we gave up would hold realtime nodes nobody uses.
                _cancel_logging_errors(self, job_id)
            raise

    def read_output(self, path: str, lines: int = 20) -> str:
        """The last lines of a text file on the machine (the job's output), through SFAPI; "" if unreadable."""
        machine = self._settings.machine
        try:
            reply = self._call(
                f"download {path}",
                lambda c: c.get(f"utilities/download/{machine}/{path}", {"binary": False}).json(),
            )
        except AllocationError as exc:
            log.warning("could not read %s through SFAPI: %s", path, exc)
            return ""
        if str(reply.get("status", "")).upper() == "ERROR" or not isinstance(reply.get("file"), str):
            log.warning("could not read %s through SFAPI: %s", path, reply.get("error"))
            return ""
        return "\n".join(reply["file"].rstrip("\n").splitlines()[-lines:])

    def cancel(self, job_id: str) -> None:
        """Cancel the job; a job that is already gone is fine (logged), a refused cancel of a live one raises."""
        machine = self._settings.machine
        response = self._call(
            f"cancel job {job_id}", lambda c: c.delete(f"compute/jobs/{machine}/{job_id}").json()
        )
        if str(response.get("status", "OK")).upper() != "ERROR":
            log.info("cancelled Slurm job %s", job_id)
            return
        state = self.state(job_id)
        if state in TERMINAL_STATES or state == UNKNOWN:
            log.info("Slurm job %s already ended (%s); nothing to cancel", job_id, state)
            return
        raise SfapiRequestFailed(
            f"SFAPI could not cancel Slurm job {job_id} ({state}): {response.get('error')}"
        )

    # ---- internals ------------------------------------------------------------------------------
    def _check_machine(self) -> None:
        """Refuse to submit to a machine SFAPI reports as unavailable (the job would sit in the queue)."""
        compute = self._call("machine status", lambda c: c.compute(self._settings.machine))
        status = getattr(compute.status, "value", compute.status)
        if status == "unavailable":
            raise SfapiUnavailable(
                f"{self._settings.machine} is unavailable according to SFAPI: {compute.notes}"
            )
        if status != "active":
            log.warning("%s is %s according to SFAPI; submitting anyway", self._settings.machine, status)

    def _wait_submit_task(self, task_id: str) -> str:
        """Poll the sbatch task until it yields a job id, bounded by submit_timeout."""
        deadline = time.monotonic() + self._settings.submit_timeout
        while True:
            task = self._call(f"sbatch task {task_id}", lambda c: c.get(f"tasks/{task_id}").json())
            status = str(task.get("status") or "").lower()
            if status in ("completed", "failed", "cancelled"):
                return _job_id_from_task(task_id, status, task.get("result"))
            if time.monotonic() >= deadline:
                raise JobSubmitError(
                    f"sbatch task {task_id} gave no job id within {self._settings.submit_timeout:.0f} s; "
                    "the job may still have been submitted: look for it in squeue before resubmitting"
                )
            time.sleep(min(1.0, self._settings.poll_interval))

    def _query_status(self, job_id: str, *, sacct: bool) -> JobStatus | None:
        """One squeue or sacct query through SFAPI; None when the job is not listed."""
        # Raw request instead of Compute.jobs(): the client turns an ERROR reply into a TypeError and
        # fails validation on state strings its enum lacks.
        params = {"sacct": sacct, "cached": False, "kwargs": [f"jobid={job_id}"]}
        what = f"{'sacct' if sacct else 'squeue'} job {job_id}"

        reply = self._call(
            what, lambda c: unless_error(c.get(f"compute/jobs/{self._settings.machine}", params).json())
        )
        rows = [r for r in reply.get("output") or [] if str(r.get("jobid")) == str(job_id)]
        if not rows:
            return None
        row = rows[0]
        state = str(row.get("state") or UNKNOWN).split()[0]  # sacct says "CANCELLED by 12345"
        reason = str(row.get("reason") or "").strip()
        return JobStatus(
            job_id,
            state.rstrip("+"),  # sacct marks truncated states with "+"
            "" if reason in ("None", "(null)") else reason,
            str(row.get("exitcode") or ""),
        )

    def _session(self) -> BoundedClient:
        if self._client is None:
            s = self._settings
            self._client = BoundedClient(
                client_id=self._client_id,
                secret=self._key,
                api_base_url=s.api_base_url.rstrip("/"),
                token_url=s.token_url,
                wait_interval=s.poll_interval,
            )
        return self._client

    def _reset_session(self) -> None:
        """Drop the HTTP session, so the next request fetches a new token."""
        self.close()

    def _call(self, what: str, request: Callable[[BoundedClient], T], *, idempotent: bool = True) -> T:
        """Run one API operation, retrying transient failures with back-off within api_retries/api_timeout."""
        s = self._settings
        start = time.monotonic()
        deadline = start + s.api_timeout
        backoff = s.retry_backoff
        attempt = 0
        renewed_token = False
        while True:
            attempt += 1
            client = self._session()
            client.request_timeout = max(0.1, min(s.request_timeout, deadline - time.monotonic()))
            try:
                return request(client)
            except Exception as exc:  # classified below; anything unknown becomes an AllocationError
                kind = classify(exc, idempotent)
                error = exc
            if kind is Reaction.EXPIRED and not renewed_token:
                log.info("SFAPI refused the access token during %s; fetching a new one", what)
                self._reset_session()
                renewed_token = True
                continue
            if kind in (Reaction.EXPIRED, Reaction.CREDENTIALS):
                raise SfapiCredentialsError(
                    f"SFAPI {what}: credentials refused ({describe(error)})"
                ) from error
            if kind is Reaction.FATAL:
                raise fatal_error(what, error, idempotent) from error
            elapsed = time.monotonic() - start
            if attempt >= s.api_retries or deadline - time.monotonic() <= backoff:
                raise SfapiUnavailable(
                    f"SFAPI {what} failed {attempt} time(s) in {elapsed:.1f} s: {describe(error)}"
                ) from error
            log.warning(
                "SFAPI %s failed (%s); retry %d/%d in %.1f s",
                what,
                describe(error),
                attempt,
                s.api_retries,
                backoff,
            )
            time.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF)


def _job_id_from_task(task_id: str, status: str, result: Any) -> str:
    """The Slurm job id from a finished sbatch task (its result is a JSON string)."""
    try:
        data = json.loads(result) if isinstance(result, str) else dict(result or {})
    except (ValueError, TypeError):
        data = {}
    if status != "completed" or str(data.get("status", "")).lower() == "error" or not data.get("jobid"):
        raise JobSubmitError(f"sbatch task {task_id} {status}: {data.get('error') or 'no job id returned'}")
    return str(data["jobid"])


def _cancel_logging_errors(allocator: SfapiAllocator, job_id: str) -> None:
    """Cancel without masking the error being raised; a failure is logged with what to do by hand."""
    try:
        allocator.cancel(job_id)
    except AllocationError as exc:
        log.error("could not cancel Slurm job %s (%s): cancel it by hand (scancel %s)", job_id, exc, job_id)


# ---- the allocation as a context manager -----------------------------------------------------------
@contextmanager
def allocate(
    settings: SfapiSettings, script: str, *, on_submitted: Callable[[str], None] | None = None
) -> Iterator[str]:
    """Submit the script, wait for RUNNING, yield the job id; the job is cancelled on every way out.

    ``on_submitted(job_id)`` runs right after submission (e.g. to record the id where a crash handler
    finds it). Cancelling at the end is also what releases the realtime nodes after a normal session.
    """
    with SfapiAllocator(settings) as allocator:
        job_id = allocator.submit(script)
        try:
            if on_submitted is not None:
                on_submitted(job_id)
            allocator.wait_running(job_id, cancel_on_failure=False)
            yield job_id
        except BaseException:  # KeyboardInterrupt and GeneratorExit too: never leave nodes allocated
            _cancel_logging_errors(allocator, job_id)
            raise
        allocator.cancel(job_id)
