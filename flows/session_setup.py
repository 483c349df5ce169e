"""Setting a session up before anything starts: what it was asked for, its settings (node count, id, dark,
addresses), its plan and settings file, its backends, the scans the simulated camera plays, and the words
its log uses for them."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger
from prefect.runtime import flow_run as current_run

from flows.session_identity import (  # the set-up without Prefect, here where the flow finds it
    choose_dark,
    private_directory,
    session_number,
    session_plan,
    session_settings,
    simulated_dark,
    simulated_dark_frame,
)
from flows.settings import Settings, given, load_settings
from tasks.acquisition.camera import ScanRequest, scripted_scans, simulated_scans
from tasks.acquisition.result import ScanResult
from tasks.launch.backends import Aggregator, LocalAggregator, LocalNodes, Nodes, SlurmNodes, SshAggregator
from tasks.nersc.batch import walltime_seconds
from tasks.steps.session import cancel_requested

__all__ = [
    "SessionRequest",
    "choose_dark",
    "describe",
    "make_backends",
    "node_lost_message",
    "planned_scans",
    "private_directory",
    "remaining",
    "run_settings",
    "session_end",
    "session_id",
    "session_plan",
    "session_settings",
    "simulated_dark",
    "simulated_dark_frame",
]


@dataclass(frozen=True)
class SessionRequest:
    """What the session flow was asked to acquire (its parameters other than settings)."""

    camera: str  # "simulated" or "instrument"
    n_scans: int
    duration: float
    scan_width: int
    scan_height: int
    dose: float
    first_scan: int
    frame_rate: float
    script: str

    @property
    def simulated(self) -> bool:
        """The flow plays the scans itself (the simulated camera)."""
        return self.camera == "simulated"


def run_settings(settings_file: str | None, **session: object) -> Settings:
    """The settings a run starts from, loaded once: the given settings file (the CLI writes one), else the
    environment and stemstream.toml (a deployment's run); ``session`` values (flow parameters) win."""
    overrides = {"session": given(**session)} if given(**session) else {}
    return load_settings(Path(settings_file) if settings_file else None, **overrides)


def _log_to_run(message: str) -> None:
    """Log to the current run (the allocate-nodes task: its log shows in the flow run)."""
    get_run_logger().info(message)


def make_backends(backend: str, settings: Settings) -> tuple[Nodes, Aggregator]:
    """The node and aggregator backends of this kind (the one place the choice is made)."""
    if backend == "local":
        return LocalNodes(), LocalAggregator()
    return (
        SlurmNodes(settings.sfapi, settings.slurm, on_wait=_log_to_run, cancelled=cancel_requested),
        SshAggregator(settings.ssh, settings.session.aggregator_remote_command),
    )


def session_id() -> int:
    """This session's number (0-99999), from its flow run id."""
    return session_number(str(current_run.get_id() or os.getpid()))


def planned_scans(request: SessionRequest, settings: Settings) -> list[ScanRequest]:
    """The scans the simulated camera plays (none for the instrument): the script's, or n_scans of one
    shape."""
    if not request.simulated:
        return []
    if request.script:
        return scripted_scans(Path(request.script), settings.simulator)
    r = request
    return simulated_scans(r.n_scans, r.scan_width, r.scan_height, r.dose, settings.simulator, r.first_scan)


def describe(request: SessionRequest, scans: list[ScanRequest]) -> str:
    """What the camera does and when the session ends, in words."""
    if request.simulated:
        shapes = sorted({f"{s.config.scan.width}x{s.config.scan.height}" for s in scans})
        played = f" from {request.script}" if request.script else ""
        return f"{len(scans)} scan(s) of {', '.join(shapes)}{played}"
    limits = [f"after {request.n_scans} scan(s)"] if request.n_scans else []
    limits += [f"after {request.duration:g} s"] if request.duration else []
    return "counting every scan until " + (" or ".join(limits) or "the allocation ends or it is cancelled")


def session_end(settings: Settings, duration: float) -> float | None:
    """When an instrument session stops waiting for scans (monotonic), or None: until cancelled."""
    if duration:
        return time.monotonic() + duration
    if settings.session.backend == "nersc":  # the allocation's walltime, less a minute to write and release
        return time.monotonic() + max(walltime_seconds(settings.slurm.walltime) - 60, 60)
    return None


def remaining(ends: float | None) -> float | None:
    """Seconds until a monotonic end (None: no end)."""
    return None if ends is None else round(ends - time.monotonic(), 1)


def node_lost_message(result: ScanResult, left: int) -> str:
    """What a node loss cost, and that the session goes on with the others."""
    r = result.record
    return (
        f"a node streamer was lost during scan {r.scan_number}; the session continues on the {left} other "
        f"node(s), which now get its share of the frames. Scan {r.scan_number} was written {r.status}: "
        f"{r.frames_incomplete} of {r.expected_frames} frames incomplete (the frames it held), marked in its "
        f"sector_masks.\n{result.node_failure}"
    )
