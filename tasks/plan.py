"""A streaming session's plan: its addresses, directories and the exact commands every process runs.

Pure: building a plan starts nothing. The same node command runs as local processes (local backend) and
under srun in the Slurm job (NERSC backend), so the local default exercises the real launch path.
"""

from __future__ import annotations

import shlex
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from counting.settings import CountingSettings
from streaming.security import CurveClientConfig
from streaming.settings import StreamingSettings

# The node command runs on the compute nodes; `python -m flows.cli` there is the installed package.
CLI = [sys.executable, "-m", "flows.cli"]


@dataclass(frozen=True)
class SessionPlan:
    """Everything the processes of one session need to find each other."""

    session_id: int
    session_dir: Path  # logs and session state
    output_dir: Path  # where the scan writer puts the HDF5 files
    n_nodes: int
    receivers: list[str]  # aggregator PULL addresses (one per receiving server, or one)
    nodes_bind: str  # aggregator ROUTER address, as it binds it
    nodes_connect: str  # ...and as the nodes reach it
    monitor_bind: str
    monitor_connect: str
    writer_port: int
    dark: Path | None
    max_scans: int | None = None
    # CURVE key files of this session's clients (nodes and the flow's monitor); None: plain sockets.
    curve_client_secret_file: Path | None = None
    curve_server_public_file: Path | None = None

    def monitor_curve(self) -> CurveClientConfig | None:
        """The CURVE client config for watching the aggregator's monitor, loaded from the key files."""
        if self.curve_client_secret_file is None or self.curve_server_public_file is None:
            return None
        return CurveClientConfig.from_files(self.curve_client_secret_file, self.curve_server_public_file)

    @property
    def state_file(self) -> Path:
        """Where the session records what it started, for cleanup on any exit."""
        return self.session_dir / "session.json"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (loopback)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def local_plan(
    session_dir: Path,
    output_dir: Path,
    n_nodes: int,
    session_id: int,
    dark: Path | None,
    max_scans: int | None = None,
) -> SessionPlan:
    """A plan with every process on this machine, on loopback ports chosen now."""
    ports = [free_port() for _ in range(4)]
    return SessionPlan(
        session_id=session_id,
        session_dir=session_dir,
        output_dir=output_dir,
        n_nodes=n_nodes,
        receivers=[f"tcp://127.0.0.1:{ports[0]}"],
        nodes_bind=f"tcp://127.0.0.1:{ports[1]}",
        nodes_connect=f"tcp://127.0.0.1:{ports[1]}",
        monitor_bind=f"tcp://127.0.0.1:{ports[2]}",
        monitor_connect=f"tcp://127.0.0.1:{ports[2]}",
        writer_port=ports[3],
        dark=dark,
        max_scans=max_scans,
    )


def node_command(plan: SessionPlan, counting: CountingSettings) -> list[str]:
    """The node streamer command line (one per node; Slurm rank 0 hosts the scan writer)."""
    argv = [
        *CLI,
        "node",
        "--aggregator",
        plan.nodes_connect,
        "--output-dir",
        str(plan.output_dir),
        "--writer-port",
        str(plan.writer_port),
    ]
    if plan.dark is not None:
        argv += ["--dark", str(plan.dark)]
    if counting.background_threshold is not None and counting.xray_threshold is not None:
        argv += [
            "--background-threshold",
            repr(counting.background_threshold),
            "--xray-threshold",
            repr(counting.xray_threshold),
        ]
    if plan.max_scans is not None:
        argv += ["--max-scans", str(plan.max_scans)]
    return argv


def node_env(plan: SessionPlan, streaming: StreamingSettings, counting: CountingSettings) -> dict[str, str]:
    """Settings the node streamers read from their environment (no secrets: CURVE keys are files)."""
    env = {
        "STEMSTREAM_STREAMING__SESSION_ID": str(plan.session_id),
        "STEMSTREAM_STREAMING__NODE_WORKERS": str(streaming.node_workers),
        "STEMSTREAM_STREAMING__NODE_BATCH": str(streaming.node_batch),
        "STEMSTREAM_STREAMING__NODE_SLOTS": str(streaming.node_slots),
        "STEMSTREAM_STREAMING__NODE_HOLD_LIMIT": str(streaming.node_hold_limit),
        "STEMSTREAM_STREAMING__NODE_DEADLINE": str(streaming.node_deadline),
        "STEMSTREAM_STREAMING__FRAME_TIMEOUT": str(streaming.frame_timeout),
        "STEMSTREAM_STREAMING__WRITER_DEADLINE": str(streaming.writer_deadline),
        "STEMSTREAM_STREAMING__NAME_TEMPLATE": streaming.name_template,
        "STEMSTREAM_COUNTING__NUMBER_OF_SAMPLES": str(counting.number_of_samples),
        "STEMSTREAM_COUNTING__SAMPLE_FRAMES": str(counting.sample_frames),
        "STEMSTREAM_COUNTING__BACKGROUND_N_SIGMA": str(counting.background_n_sigma),
        "STEMSTREAM_COUNTING__XRAY_N_SIGMA": str(counting.xray_n_sigma),
        "STEMSTREAM_COUNTING__SEED": str(counting.seed),
    }
    curve = streaming.curve
    if curve.client_secret_file is not None and curve.server_public_file is not None:
        env["STEMSTREAM_STREAMING__CURVE__CLIENT_SECRET_FILE"] = str(curve.client_secret_file)
        env["STEMSTREAM_STREAMING__CURVE__SERVER_PUBLIC_FILE"] = str(curve.server_public_file)
    return env


def aggregator_command(plan: SessionPlan, streaming: StreamingSettings) -> list[str]:
    """The aggregator command line for this session."""
    argv = [
        *CLI,
        "aggregator",
        "--nodes-bind",
        plan.nodes_bind,
        "--nodes",
        str(plan.n_nodes),
        "--monitor-bind",
        plan.monitor_bind,
        "--scan-deadline",
        str(streaming.scan_deadline),
    ]
    for r in plan.receivers:
        argv += ["--receivers", r]
    return argv


def shell(argv: list[str]) -> str:
    """A command line as one shell-quoted string (for logs and remote shells)."""
    return shlex.join(argv)
