"""Where a session's processes run: the plan, local and NERSC/SSH backends, the session's state.

Its public names resolve on first use (PEP 562), so importing one light name never loads the
package's heavier modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from counting.lazy import lazy_exports

_WHERE = {
    "Aggregator": "tasks.launch.backends",
    "LocalAggregator": "tasks.launch.backends",
    "LocalNodes": "tasks.launch.backends",
    "Nodes": "tasks.launch.backends",
    "SlurmNodes": "tasks.launch.backends",
    "SshAggregator": "tasks.launch.backends",
    "release_recorded": "tasks.launch.backends",
    "AggregatorExited": "tasks.launch.errors",
    "NodeFailure": "tasks.launch.errors",
    "ReleaseError": "tasks.launch.errors",
    "SessionFailed": "tasks.launch.errors",
    "SessionPlan": "tasks.launch.plan",
    "free_ports": "tasks.launch.plan",
    "local_addresses": "tasks.launch.plan",
    "ProcessGroup": "tasks.launch.processes",
    "SessionState": "tasks.launch.state",
}
__all__ = [
    "Aggregator",
    "AggregatorExited",
    "free_ports",
    "local_addresses",
    "LocalAggregator",
    "LocalNodes",
    "NodeFailure",
    "Nodes",
    "ProcessGroup",
    "release_recorded",
    "ReleaseError",
    "SessionFailed",
    "SessionPlan",
    "SessionState",
    "SlurmNodes",
    "SshAggregator",
]

if TYPE_CHECKING:
    from tasks.launch.backends import (
        Aggregator,
        LocalAggregator,
        LocalNodes,
        Nodes,
        SlurmNodes,
        SshAggregator,
        release_recorded,
    )
    from tasks.launch.errors import AggregatorExited, NodeFailure, ReleaseError, SessionFailed
    from tasks.launch.plan import SessionPlan, free_ports, local_addresses
    from tasks.launch.processes import ProcessGroup
    from tasks.launch.state import SessionState


__getattr__ = lazy_exports(__name__, _WHERE)
