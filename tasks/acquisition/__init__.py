"""During a session: the camera's scans, the monitor, each scan's result and its catalogue record.

Its public names resolve on first use (PEP 562), so importing one light name never loads the
package's heavier modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from counting.lazy import lazy_exports

_WHERE = {
    "CameraRun": "tasks.acquisition.camera",
    "ScanRequest": "tasks.acquisition.camera",
    "ScanTimeout": "tasks.acquisition.camera",
    "scripted_scans": "tasks.acquisition.camera",
    "simulated_scans": "tasks.acquisition.camera",
    "wait_for_new_scan": "tasks.acquisition.camera",
    "finish_recording": "tasks.acquisition.catalogue_link",
    "record_analyses": "tasks.acquisition.catalogue_link",
    "record_scan": "tasks.acquisition.catalogue_link",
    "start_recorder": "tasks.acquisition.catalogue_link",
    "live_link": "tasks.acquisition.live",
    "live_url": "tasks.acquisition.live",
    "MonitorFollower": "tasks.acquisition.monitor",
    "latest_state": "tasks.acquisition.monitor",
    "wait_for_state": "tasks.acquisition.monitor",
    "AnalysisOutcome": "tasks.acquisition.result",
    "CameraCounts": "tasks.acquisition.result",
    "ScanResult": "tasks.acquisition.result",
}
__all__ = [
    "AnalysisOutcome",
    "CameraCounts",
    "CameraRun",
    "finish_recording",
    "latest_state",
    "live_link",
    "live_url",
    "MonitorFollower",
    "record_analyses",
    "record_scan",
    "ScanRequest",
    "ScanResult",
    "ScanTimeout",
    "scripted_scans",
    "simulated_scans",
    "start_recorder",
    "wait_for_new_scan",
    "wait_for_state",
]

if TYPE_CHECKING:
    from tasks.acquisition.camera import (
        CameraRun,
        ScanRequest,
        ScanTimeout,
        scripted_scans,
        simulated_scans,
        wait_for_new_scan,
    )
    from tasks.acquisition.catalogue_link import (
        finish_recording,
        record_analyses,
        record_scan,
        start_recorder,
    )
    from tasks.acquisition.live import live_link, live_url
    from tasks.acquisition.monitor import MonitorFollower, latest_state, wait_for_state
    from tasks.acquisition.result import AnalysisOutcome, CameraCounts, ScanResult


__getattr__ = lazy_exports(__name__, _WHERE)
