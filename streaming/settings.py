"""Settings sections for the aggregator, node streamers, senders and the live view; composed into the one Settings
object in flows/settings.py."""

from __future__ import annotations

from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator

LIVE_PORT = (
    17020  # the view's snapshot socket (nodes connect out to it); the aggregator's node socket is 17000
)
PAGE_PORT = 17080  # the view's web page
TAP_PORT = 17110  # node i's tap publishes on TAP_PORT + i
ABERRATION_PORT = 17090  # the view's aberration messages (tap.aberration)


class LiveSettings(BaseModel):
    """Live images during a scan and the counted-data tap; none of it may slow counting."""

    enabled: bool = Field(True, description="nodes send live snapshots to the view (connecting out)")
    connect: str | None = Field(
        None,
        description="where nodes reach the view's snapshot socket (default: the aggregator's host and the "
        "port of live.bind; <aggregator address>.live for an ipc:// aggregator)",
    )
    bind: str = Field(f"tcp://127.0.0.1:{LIVE_PORT}", description="where the view takes snapshots")
    interval: float = Field(0.25, ge=0.05, le=10, description="seconds between a node's snapshots of a scan")
    queue_batches: int = Field(
        1024, ge=1, description="counted batches waiting for the live images (more: dropped and counted)"
    )
    send_hwm: int = Field(4, ge=1, description="snapshots queued to the view (more: dropped and counted)")
    bf_center: tuple[float, float] | None = Field(None, description="BF disk centre (x, y) in pixels")
    bf_radius: float | None = Field(None, gt=0, description="BF disk radius; with bf_center: no estimate")
    adf_inner: float = Field(1.2, gt=0, description="ADF inner radius, in BF radii")
    adf_outer: float = Field(2.5, gt=0, description="ADF outer radius, in BF radii")
    estimate_frames: int = Field(64, ge=1, description="first counted frames the geometry is estimated from")
    page_host: str = Field(
        "127.0.0.1", description="the page's address; anything but loopback exposes it and needs a token"
    )
    page_port: int = Field(
        PAGE_PORT, ge=0, le=65535, description="the page's port (0, or taken: any free port)"
    )
    token: SecretStr | None = Field(None, description="the page's token when exposed (default: a random one)")
    token_required: bool = Field(False, description="ask for the token on loopback too")
    token_file: Path | None = Field(
        None,
        description="a file (mode 0600) holding the page's token; a session's view reads live.token from it, "
        "and writes its random token there when none is set",
    )
    max_clients: int = Field(
        16, ge=1, le=1024, description="pages following the state at once (more: refused)"
    )
    tap: bool = Field(False, description="nodes publish counted events on a PUB socket (the tap)")
    tap_host: str = Field("127.0.0.1", description="the tap's address on the node (0.0.0.0: every interface)")
    tap_port: int = Field(TAP_PORT, ge=1, le=65000, description="node i publishes on tap_port + i")
    tap_hwm: int = Field(256, ge=1, description="batches queued per tap subscriber (more: dropped, counted)")
    tap_curve: bool = Field(
        False,
        description="the tap over CURVE on loopback too (always off loopback; a shared host's other users)",
    )
    tap_clients: list[Path] = Field(
        default_factory=list,
        description="public .key files of the subscribers a tap off loopback accepts over CURVE (besides "
        "the nodes' own key)",
    )

    parallax_bins: int = Field(
        8,
        ge=0,
        le=16,
        description="live phase contrast: bins per side over the BF disk each node sums per scan position "
        "(0: off; 8 x 8 keeps 60 bins: 30 MiB per node at 512 x 512)",
    )
    parallax_max_positions: int = Field(
        512 * 512,
        ge=0,
        description="live phase contrast only for scans of at most this many positions (node memory and "
        "wire: 120 B per position at 8 x 8 bins)",
    )
    phase_interval: float = Field(
        1.0,
        ge=0.1,
        le=60,
        description="seconds between the view's phase fits during a scan (and one at its end)",
    )
    phase_scan_step_nm: float | None = Field(
        None, gt=0, description="scan step in nm: with phase_mrad_per_px the fitted defocus is in nm"
    )
    phase_mrad_per_px: float | None = Field(
        None, gt=0, description="detector mrad per pixel: with phase_scan_step_nm the defocus is in nm"
    )
    aberration: bool = Field(
        False, description="the view publishes each phase fit as a tap.aberration message (a PUB socket)"
    )
    aberration_host: str = Field(
        "127.0.0.1", description="the aberration socket's address (off loopback: CURVE, as the tap)"
    )
    aberration_port: int = Field(
        ABERRATION_PORT, ge=1, le=65535, description="the aberration socket's port on the view's host"
    )

    @model_validator(mode="after")
    def _geometry_whole(self) -> LiveSettings:
        if (self.bf_center is None) != (self.bf_radius is None):
            raise ValueError("set both live.bf_center and live.bf_radius, or neither (estimated)")
        if self.adf_outer <= self.adf_inner or self.adf_inner < 1:
            raise ValueError("need 1 <= live.adf_inner < live.adf_outer (in BF radii)")
        return self

    @model_validator(mode="after")
    def _calibration_whole(self) -> LiveSettings:
        if (self.phase_scan_step_nm is None) != (self.phase_mrad_per_px is None):
            raise ValueError("set both live.phase_scan_step_nm and live.phase_mrad_per_px, or neither")
        return self

    @property
    def exposed(self) -> bool:
        """The page listens beyond loopback."""
        return self.page_host not in ("127.0.0.1", "localhost", "::1")

    @property
    def needs_token(self) -> bool:
        """The page asks for a token: exposed, or told to."""
        return self.exposed or self.token_required

    def snapshot_address(self, aggregator: str) -> str:
        """Where a node sends its snapshots: live.connect, else the aggregator's host with live.bind's port
        (``<aggregator address>.live`` for an ipc:// aggregator)."""
        if self.connect:
            return self.connect
        if aggregator.startswith("ipc://"):
            return f"{aggregator}.live"
        scheme, _, rest = aggregator.partition("://")
        host = rest.rsplit(":", 1)[0]
        port = self.bind.rsplit(":", 1)[-1] if self.bind.startswith("tcp://") else str(LIVE_PORT)
        return f"{scheme}://{host}:{port}"


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


METRICS_PORT = 17300  # Prometheus exporters: aggregator +0, view +1, nodes from +10 (streaming.metrics)


class MetricsSettings(BaseModel):
    """Prometheus metrics: each process serves GET /metrics on its own HTTP port (streaming.metrics)."""

    enabled: bool = Field(True, description="the aggregator, each node and the view serve Prometheus metrics")
    host: str = Field(
        "127.0.0.1", description="the exporters' address (loopback; 0.0.0.0 for a Prometheus on another host)"
    )
    port: int = Field(
        METRICS_PORT,
        ge=0,
        le=65000,
        description="base port: the aggregator port + 0, the view + 1, nodes the first free of + 10 .. + 73 "
        "(taken: any free port, logged); 0: any free port for every process",
    )


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

    receivers: list[str] = Field(
        default_factory=lambda: ["tcp://127.0.0.1:6001"],
        description="the aggregator's PULL addresses for the receivers (one per receiver, or a shared one)",
    )
    nodes_bind: str = Field(
        "tcp://127.0.0.1:17000", description="the aggregator's ROUTER address for the nodes"
    )
    monitor_bind: str | None = Field(
        "tcp://127.0.0.1:17001",
        description="the aggregator's PUB address for state and counters (None: none)",
    )
    nodes_connect: str | None = Field(
        None, description="the aggregator's node address as nodes reach it (when it binds tcp://*:PORT)"
    )
    monitor_connect: str | None = Field(None, description="the monitor address as the session reaches it")
    n_nodes: int = Field(1, ge=1, description="node streamers the aggregator waits for before the first scan")
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
    heartbeat: float = Field(1.0, gt=0, description="seconds between heartbeats (nodes) and monitor states")
    node_timeout: float = Field(
        10.0, gt=0, description="aggregator: seconds without a message from a node before it counts as lost"
    )
    node_workers: int = Field(1, ge=0, description="counting processes per node (0: in the node process)")
    node_batch: int = Field(32, ge=1, description="frames a node counts per batch (one shared-memory slot)")
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
    session_id: int = Field(
        0, ge=0, le=99999, description="the session's number, in stop records and {session}"
    )
    name_template: str = Field(
        "FOURD_{date}_{id:05d}_{scan:05d}.h5",
        description="scan file names: {date} yymmdd_HHMM in the facility's time zone, {id} the scan's unique "
        "id in the output directory, {scan} the detector's scan number, {session} the session id",
    )
    timezone: str = Field("America/Los_Angeles", description="the facility's time zone, for file names")
    send_rate: float | None = Field(None, gt=0, description="sender frames/s per module (None: unlimited)")
    max_scan_positions: int = Field(
        4096 * 4096,
        ge=1,
        description="the largest scan (width x height positions) accepted from the wire: a sector announcing a "
        "larger one is refused and counted, and nothing is allocated for it (aggregator, nodes, writer, view)",
    )
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
    metrics: MetricsSettings = MetricsSettings()
