"""A session's identity and set-up without Prefect: its number, dark reference, settings (node count, id,
dark, addresses) and plan with its settings file. The flow sets a session up with these (flows/session_setup
re-exports them), and so can the CLI before Prefect is imported (flows/session_early.py)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sys
from pathlib import Path

import numpy as np

from counting.dark import dark_reference
from counting.durable import file_sha256
from counting.geometry import FRAME_SHAPE, ScanShape
from counting.simulator import SimulatedCamera, SimulatorConfig
from flows.settings import Settings, write_settings_file
from tasks.darks import INSTRUMENT, session_dark, simulated_camera_label
from tasks.launch.plan import SessionPlan, free_ports, local_addresses

SIMULATED_DARK = "dark.npy"  # in the session's directory


def session_number(run_id: str) -> int:
    """A session's number (0-99999) from its run id (a flow run's, or the one the CLI chose)."""
    return int(hashlib.sha256(run_id.encode()).hexdigest(), 16) % 100000


def stored_dark(settings: Settings, simulated: bool, log) -> Path | None:
    """counting.dark, else the newest stored dark of this camera (tasks.darks); None: neither (warned for
    the instrument, which then counts with a zero dark; the simulator makes its own)."""
    camera = simulated_camera_label(settings.simulator.seed) if simulated else INSTRUMENT
    dark, old_dark = session_dark(settings.counting.dark, settings.dark, settings.output_dir, camera)
    if old_dark:
        log.warning(old_dark)
    if dark is None and not simulated:
        log.warning("no dark reference (counting.dark): counting with a zero dark and fitted thresholds")
    return dark


def choose_dark(settings: Settings, simulated: bool, session_dir: Path, log) -> Path | None:
    """counting.dark, else the newest stored dark of this camera (tasks.darks), else the simulator's own."""
    dark = stored_dark(settings, simulated, log)
    if dark is None and simulated:
        dark = simulated_dark(session_dir, settings.simulator.seed)
    return dark


def simulated_dark(session_dir: Path, seed: int) -> Path:
    """The simulated camera's dark reference, from dark frames, as on the instrument before a session."""
    path = session_dir / SIMULATED_DARK
    np.save(path, simulated_dark_frame(seed))
    return path


@functools.lru_cache(maxsize=2)
def simulated_dark_frame(seed: int) -> np.ndarray:
    """The simulated camera's dark reference for a seed: this user's cached copy (``dark_cache_file``),
    else computed (about 1 s) and cached. Read-only: shared by every session of this process."""
    path = dark_cache_file(seed)
    dark = _cached_dark(path)
    if dark is None:
        cam = SimulatedCamera(SimulatorConfig(ScanShape(1, 1), seed=seed))
        dark = dark_reference(cam.dark_frames(_DARK_FRAMES))
        _keep_dark(path, dark)
    dark.flags.writeable = False
    return dark


_DARK_FRAMES = 100
# What the simulated dark is computed by: a cached copy is used only with these files unchanged.
_DARK_SOURCES = (
    "counting.dark",
    "counting.frame_pool",
    "counting.geometry",
    "counting.simulator",
    "counting.simulator_config",
    "counting.simulator_kernels",
    "counting.simulator_model",
)


def dark_cache_file(seed: int) -> Path:
    """Where this user's copy of the simulated dark for a seed is kept (XDG cache), named by the seed, the
    frames, numpy's version and the source of the code that computes it."""
    digest = hashlib.sha256(f"{seed} {_DARK_FRAMES} {np.__version__}".encode())
    for name in _DARK_SOURCES:
        digest.update(Path(sys.modules[name].__file__ or "").read_bytes())
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "stemstream" / "simulated-dark" / f"{digest.hexdigest()[:32]}.npy"


def _cached_dark(path: Path) -> np.ndarray | None:
    """The cached dark, or None (none there, or not a frame: it is then computed, the file left alone)."""
    try:
        dark = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    return dark if dark.shape == FRAME_SHAPE and dark.dtype.kind == "f" else None


def _keep_dark(path: Path, dark: np.ndarray) -> None:
    """Cache the dark for later sessions, never over a file (a hard link of a complete copy); a cache that
    cannot be written costs only the next session's second."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(tmp, "xb") as out:  # a file object: np.save would add .npy to a name
            np.save(out, dark)
        os.link(tmp, path)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


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
