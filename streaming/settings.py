"""Settings sections for the aggregator, node streamers and senders; composed into the one Settings object in flows/settings.py."""

from __future__ import annotations

from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, Field, field_validator

from streaming.live_settings import LiveSettings


class CurveSettings(BaseModel):
    """CurveZMQ key files between aggregator and nodes (zmq.auth format); all unset = plain (localhost only)."""

    server_secret_file: Path | None = Field(None, description="aggregator's .key_secret file")
    server_public_file: Path | None = Field(None, description="aggregator's public .key file (for nodes)")
    client_secret_file: Path | None = Field(None, description="this node's .key_secret file")
    allowed_clients: list[Path] = Field(default_factory=list, description="node public .key files")

    @property
    def enabled(self) -> bool:
        """True when any key is configured."""
        return any([self.server_secret_file, self.server_public_file, self.client_secret_file])


class StreamingSettings(BaseModel):
    """Aggregator and node streamer parameters."""

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r} (an IANA name such as America/Los_Angeles)") from None
        return v

    receivers: list[str] = Field(default_factory=lambda: ["tcp://127.0.0.1:6001"])
    nodes_bind: str = "tcp://127.0.0.1:17000"
    monitor_bind: str | None = "tcp://127.0.0.1:17001"
    nodes_connect: str | None = Field(
        None, description="the aggregator's node address as nodes reach it (when it binds tcp://*:PORT)"
    )
    monitor_connect: str | None = Field(None, description="the monitor address as the session reaches it")
    n_nodes: int = Field(1, ge=1)
    scan_deadline: float = Field(
        2.0, gt=0, description="aggregator: seconds without a sector before a scan ends"
    )
    node_deadline: float = Field(10.0, gt=0, description="node: seconds of aggregator silence mid-scan")
    # The four sectors of a frame leave their receivers within milliseconds: a frame still missing one after
    # a second, while every slot and the hold queue are taken, has lost it. Longer timeouts cap a node at
    # (slots x batch) / frame_timeout frames/s once sectors are being lost (overload).
    frame_timeout: float = Field(
        1.0, gt=0, description="node: seconds the oldest frame may wait for sectors when no slot is free"
    )
    writer_deadline: float = Field(30.0, gt=0, description="writer: seconds a scan may be silent")
    heartbeat: float = Field(1.0, gt=0)
    node_timeout: float = Field(
        10.0, gt=0, description="aggregator: seconds without a message from a node before it counts as lost"
    )
    node_workers: int = Field(1, ge=0, description="counting processes per node (0: in the node process)")
    node_batch: int = Field(32, ge=1)
    node_slots: int = Field(16, ge=2, description="batches in flight per node (memory bound)")
    node_hold_limit: int = Field(
        1024, ge=0, description="sectors a node holds while no slot is free (memory bound: x 166 kB)"
    )
    writer_bind: str = Field(
        "tcp://127.0.0.1:0",
        description="where node 0's scan writer listens for the other nodes (port 0: any free port); on a "
        "cluster a wildcard such as tcp://0.0.0.0:17500, announced under writer_host",
    )
    writer_host: str | None = Field(
        None,
        description="the host name other nodes reach node 0 by, when writer_bind is a wildcard "
        "(default: node 0's host name)",
    )
    session_id: int = Field(0, ge=0, le=99999)
    name_template: str = Field(
        "FOURD_{date}_{id:05d}_{scan:05d}.h5",
        description="scan file names: {date} yymmdd_HHMM in the facility's time zone, {id} the scan's unique "
        "id in the output directory, {scan} the detector's scan number, {session} the session id",
    )
    timezone: str = Field("America/Los_Angeles", description="the facility's time zone, for file names")
    send_rate: float | None = Field(None, gt=0, description="sender frames/s per module (None: unlimited)")
    aggregator_receiver_hwm: int = Field(
        1000,
        ge=1,
        description="aggregator: sectors queued per receiver connection (~166 kB each; memory bound: "
        "this x connections x 166 kB, 1000 x 4 = 664 MB); when full the receivers wait, or in real time drop",
    )
    aggregator_node_hwm: int = Field(
        2000,
        ge=1,
        description="aggregator: sectors queued per node (memory bound: this x nodes x 166 kB, "
        "2000 x 2 = 664 MB); when full the aggregator waits for that node",
    )
    aggregator_stall_timeout: float = Field(
        30.0,
        gt=0,
        description="aggregator: seconds a node's full queue may block forwarding before that "
        "node is marked stalled",
    )
    aggregator_processes: int = Field(
        1,
        ge=1,
        le=64,
        description="aggregator: forwarding processes (K); K > 1 adds K - 1 processes that bind every receiver "
        "and the node address at port + i x aggregator_port_stride; receivers and nodes connect to all",
    )
    aggregator_port_stride: int = Field(
        100, ge=1, description="aggregator: port offset between forwarding processes"
    )
    node_io_threads: int = Field(
        2, ge=1, le=16, description="node: ZeroMQ I/O threads (CURVE decryption runs there, per connection)"
    )
    accumulate_dark: bool = Field(
        False,
        description="node: a dark session (beam blanked): also add each complete raw frame to per-pixel "
        "sums, left beside the scans for `stemstream dark --scan-dir` (streaming.node.dark_sums)",
    )
    curve: CurveSettings = CurveSettings()
    live: LiveSettings = LiveSettings()
