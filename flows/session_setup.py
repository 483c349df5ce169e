"""Setting a session up before anything starts: what it was asked for, its settings (node count, id, dark,
addresses), its plan and settings file, its backends, the scans the simulated camera plays, and the words
its log uses for them."""

from __future__ import annotations

import functools
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prefect import get_run_logger
from prefect.runtime import flow_run as current_run

from counting.dark import dark_reference
from counting.geometry import ScanShape
from counting.simulator import SimulatedCamera, SimulatorConfig
from counting.storage.durable import file_sha256
from flows.settings import Settings, given, load_settings, write_settings_file
from tasks.acquisition.camera import ScanRequest, scripted_scans, simulated_scans
from tasks.acquisition.result import ScanResult
from tasks.darks import INSTRUMENT, session_dark, simulated_camera_label
from tasks.launch.backends import Aggregator, LocalAggregator, LocalNodes, Nodes, SlurmNodes, SshAggregator
from tasks.launch.plan import SessionPlan, free_ports, local_addresses
from tasks.nersc.batch import walltime_seconds
from tasks.steps.session import cancel_requested


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
    run_id = str(current_run.get_id() or os.getpid())
    return int(hashlib.sha256(run_id.encode()).hexdigest(), 16) % 100000


def choose_dark(settings: Settings, simulated: bool, session_dir: Path, log) -> Path | None:
    """counting.dark, else the newest stored dark of this camera (tasks.darks), else the simulator's own."""
    camera = simulated_camera_label(settings.simulator.seed) if simulated else INSTRUMENT
    dark, old_dark = session_dark(settings.counting.dark, settings.dark, settings.output_dir, camera)
    if old_dark:
        log.warning(old_dark)
    if dark is None and simulated:
        dark = simulated_dark(session_dir, settings.simulator.seed)
    if dark is None:
        log.warning("no dark reference (counting.dark): counting with a zero dark and fitted thresholds")
    return dark


def simulated_dark(session_dir: Path, seed: int) -> Path:
    """The simulated camera's dark reference, from dark frames, as on the instrument before a session."""
    path = session_dir / "dark.npy"
    np.save(path, simulated_dark_frame(seed))
    return path


@functools.lru_cache(maxsize=2)
def simulated_dark_frame(seed: int) -> np.ndarray:
    """The simulated camera's dark reference for a seed (about 1 s; the CLI computes it while Prefect's
    server starts). Read-only: shared by every session of this process."""
    cam = SimulatedCamera(SimulatorConfig(ScanShape(1, 1), seed=seed))
    dark = dark_reference(cam.dark_frames(100))
    dark.flags.writeable = False
    return dark


def session_settings(settings: Settings, dark: Path | None, number: int, simulated: bool) -> Settings:
    """The settings every process of this session runs with: the user's, plus this session's node count,
    id and dark reference, and (a local session with the simulated camera) free loopback addresses; an
    instrument session listens where streaming.receivers says, where the camera sends."""
    streaming = {"n_nodes": settings.session.nodes, "session_id": number}
    if settings.session.backend == "local" and simulated:  # its own camera: any free loopback ports
        ports = free_ports(4)  # distinct: receivers, nodes, monitor, the live view's intake
        streaming |= local_addresses(ports[:3])
        streaming["live"] = settings.streaming.live.model_copy(update={"bind": f"tcp://127.0.0.1:{ports[3]}"})
    counting = {"dark": dark} if dark is not None else {}
    return settings.model_copy(
        update={
            "streaming": settings.streaming.model_copy(update=streaming),
            "counting": settings.counting.model_copy(update=counting),
        }
    )


def session_plan(settings: Settings, session_dir: Path, max_scans: int | None = None) -> SessionPlan:
    """Where everything goes; writes the session's settings file where its processes read it."""
    scans = settings.session.scan_dir or session_dir / "scans"
    st = settings.streaming
    if settings.session.backend == "local":
        settings_file = session_dir / "settings.json"
    else:  # the nodes read it from the scan directory, which they share with this machine
        settings_file = private_directory(scans / ".stemstream") / f"settings-{st.session_id:05d}.json"
    write_settings_file(settings, settings_file)
    os.chmod(settings_file, 0o600)  # only this user's processes read it (the directory is 0700 too)
    return SessionPlan(
        session_id=st.session_id,
        session_dir=session_dir,
        output_dir=scans,
        settings_file=settings_file,
        streaming=st,
        nodes_connect=st.nodes_connect or st.nodes_bind,
        monitor_connect=st.monitor_connect or st.monitor_bind or "",
        max_scans=max_scans,
        settings_sha256=file_sha256(settings_file),  # every process it starts checks the file against it
    )


def private_directory(path: Path) -> Path:
    """``path`` as a directory only this user can enter (0700, created so or made so): nobody else can
    swap the settings file in it between the session writing it and the nodes reading it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)  # mkdir's mode is masked by the umask, and an existing directory keeps its own
    return path


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
