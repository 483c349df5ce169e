"""NERSC: the Superfacility API allocation of the node streamers and their Slurm batch script.

Its public names resolve on first use (PEP 562), so importing one light name never loads the
package's heavier modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from counting.lazy import lazy_exports

_WHERE = {
    "SlurmConfigError": "tasks.nersc.batch",
    "render_batch_script": "tasks.nersc.batch",
    "walltime_seconds": "tasks.nersc.batch",
    "AllocationCancelled": "tasks.nersc.errors",
    "AllocationError": "tasks.nersc.errors",
    "JobFailedError": "tasks.nersc.errors",
    "JobStartTimeout": "tasks.nersc.errors",
    "JobSubmitError": "tasks.nersc.errors",
    "SfapiCredentialsError": "tasks.nersc.errors",
    "SfapiRequestFailed": "tasks.nersc.errors",
    "SfapiUnavailable": "tasks.nersc.errors",
    "JobStatus": "tasks.nersc.jobs",
    "SfapiAllocator": "tasks.nersc.sfapi",
    "allocate": "tasks.nersc.sfapi",
}
__all__ = [
    "allocate",
    "AllocationCancelled",
    "AllocationError",
    "JobFailedError",
    "JobStartTimeout",
    "JobStatus",
    "JobSubmitError",
    "render_batch_script",
    "SfapiAllocator",
    "SfapiCredentialsError",
    "SfapiRequestFailed",
    "SfapiUnavailable",
    "SlurmConfigError",
    "walltime_seconds",
]

if TYPE_CHECKING:
    from tasks.nersc.batch import SlurmConfigError, render_batch_script, walltime_seconds
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
    from tasks.nersc.jobs import JobStatus
    from tasks.nersc.sfapi import SfapiAllocator, allocate


__getattr__ = lazy_exports(__name__, _WHERE)
