"""The session's Prefect tasks: the only Prefect code in tasks/.

Its public names resolve on first use (PEP 562), so importing one light name never loads the
package's heavier modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from counting.lazy import lazy_exports

_WHERE = {
    "attach_microscope_metadata": "tasks.steps.metadata",
    "acquire_scan": "tasks.steps.session",
    "allocate_nodes": "tasks.steps.session",
    "arm_aggregator": "tasks.steps.session",
    "cancel_requested": "tasks.steps.session",
    "node_lost_event": "tasks.steps.session",
    "postprocess_scan": "tasks.steps.session",
    "release": "tasks.steps.session",
    "summarise": "tasks.steps.session",
    "verify_scan_file": "tasks.steps.session",
    "wait_nodes_ready": "tasks.steps.session",
}
__all__ = [
    "acquire_scan",
    "allocate_nodes",
    "arm_aggregator",
    "attach_microscope_metadata",
    "cancel_requested",
    "node_lost_event",
    "postprocess_scan",
    "release",
    "summarise",
    "verify_scan_file",
    "wait_nodes_ready",
]

if TYPE_CHECKING:
    from tasks.steps.metadata import attach_microscope_metadata
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


__getattr__ = lazy_exports(__name__, _WHERE)
