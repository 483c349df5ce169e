"""A streaming session's plan: its addresses, directories, its settings file and the exact commands every
process runs.

Pure apart from choosing free loopback ports: building a plan starts nothing. Every process the session
starts gets the session's settings as one file (``stemstream --settings FILE ...``), written by the flow:
the same node command runs as local processes (local backend) and under srun in the Slurm job (NERSC
backend), so the local default exercises the real launch path.
"""

from __future__ import annotations

import shlex
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from streaming.aggregator.forwarder import offset_address
from streaming.components import client_curve
from streaming.settings import StreamingSettings
from streaming.transport.security import CurveClientConfig
from streaming.view.token import TOKEN_FILE

# The node command runs on the compute nodes; `python -m flows.cli` there is the installed package.
CLI = [sys.executable, "-m", "flows.cli"]


@dataclass(frozen=True)
class SessionPlan:
    """Everything the processes of one session need to find each other."""

    session_id: int
    session_dir: Path  # logs and the session's state file (tasks.launch.state)
    output_dir: Path  # where the scan writer puts the HDF5 files
    settings_file: Path  # the session's settings, as every process it starts reads them
    streaming: StreamingSettings  # as in the settings file (addresses, node count, keys)
    nodes_connect: str  # the aggregator's node address as the nodes reach it
    monitor_connect: str  # ...and its monitor address as the session reaches it
    max_scans: int | None = None
    settings_sha256: str | None = None  # the settings file's digest as written: every process checks it

    @property
    def n_nodes(self) -> int:
        """Node streamers in the session."""
        return self.streaming.n_nodes

    @property
    def receivers(self) -> list[str]:
        """The aggregator's receiver addresses; with forwarding processes, each receiver's address on every
        process, comma-separated (a receiver connects to all of them and ZeroMQ spreads its sectors)."""
        st = self.streaming
        return [
            ",".join(offset_address(a, i * st.aggregator_port_stride) for i in range(st.aggregator_processes))
            for a in st.receivers
        ]

    @property
    def nodes_bind(self) -> str:
        """The aggregator's node address as it binds it."""
        return self.streaming.nodes_bind

    def monitor_curve(self) -> CurveClientConfig | None:
        """The CURVE client config for watching the aggregator's monitor, loaded from the key files."""
        return client_curve(self.streaming.curve)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (loopback)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct TCP ports nobody listens on right now (held open together while chosen, so no port is
    handed out twice)."""
    held: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            held.append(s)
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in held]
    finally:
        for s in held:
            s.close()


def local_addresses(ports: list[int] | None = None) -> dict[str, object]:
    """Streaming settings for a session with every process on this machine, on loopback ports chosen now
    (or the three given: receivers, nodes, monitor)."""
    ports = ports or free_ports(3)
    return {
        "receivers": [f"tcp://127.0.0.1:{ports[0]}"],
        "nodes_bind": f"tcp://127.0.0.1:{ports[1]}",
        "monitor_bind": f"tcp://127.0.0.1:{ports[2]}",
        "writer_bind": "tcp://127.0.0.1:0",
    }


def settings_options(plan: SessionPlan, settings_file: str | Path | None = None) -> list[str]:
    """``--settings FILE`` and, when the plan knows it, ``--settings-sha256 HEX``: a process refuses a file
    changed after the session wrote it (the nodes read it from a shared directory, maybe much later)."""
    argv = ["--settings", str(settings_file or plan.settings_file)]
    if plan.settings_sha256 is not None:
        argv += ["--settings-sha256", plan.settings_sha256]
    return argv


def node_command(plan: SessionPlan, settings_file: str | Path | None = None) -> list[str]:
    """The node streamer command line: the same on every node (the aggregator assigns the roles)."""
    argv = [
        *CLI,
        *settings_options(plan, settings_file),
        "node",
        "--aggregator",
        plan.nodes_connect,
        "--output-dir",
        str(plan.output_dir),
    ]
    if plan.max_scans is not None:
        argv += ["--max-scans", str(plan.max_scans)]
    return argv


def aggregator_command(plan: SessionPlan, settings_file: str | Path | None = None) -> list[str]:
    """The aggregator command line: everything else comes from the settings file."""
    return [*CLI, *settings_options(plan, settings_file), "aggregator"]


def view_command(
    plan: SessionPlan, settings_file: str | Path | None = None, token_file: str | Path | None = None
) -> list[str]:
    """The live page's command line (streaming.view.server): scan file names from the session's scan dir;
    its token in a 0600 token file (the session's own by default; live.token written there first, else a
    random one), never here. settings_file, token_file: where they are on the aggregator host."""
    token_file = str(token_file or plan.session_dir / TOKEN_FILE)
    return [
        *CLI,
        *settings_options(plan, settings_file),
        "view",
        "--scan-dir",
        str(plan.output_dir),
        "--token-file",
        token_file,
    ]


def shell(argv: list[str]) -> str:
    """A command line as one shell-quoted string (for logs and remote shells)."""
    return shlex.join(argv)
