"""Settings of the live view (``streaming.live``): the node's snapshots to the view at the microscope, the
view's page, the detector geometry of the live images, and the counted-data tap."""

from __future__ import annotations

from pydantic import BaseModel, Field, SecretStr, model_validator

LIVE_PORT = (
    17020  # the view's snapshot socket (nodes connect out to it); the aggregator's node socket is 17000
)
PAGE_PORT = 17080  # the view's web page
TAP_PORT = 17110  # node i's tap publishes on TAP_PORT + i


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
    tap: bool = Field(False, description="nodes publish counted events on a PUB socket (the tap)")
    tap_host: str = Field("127.0.0.1", description="the tap's address on the node (0.0.0.0: every interface)")
    tap_port: int = Field(TAP_PORT, ge=1, le=65000, description="node i publishes on tap_port + i")
    tap_hwm: int = Field(256, ge=1, description="batches queued per tap subscriber (more: dropped, counted)")

    @model_validator(mode="after")
    def _geometry_whole(self) -> LiveSettings:
        if (self.bf_center is None) != (self.bf_radius is None):
            raise ValueError("set both live.bf_center and live.bf_radius, or neither (estimated)")
        if self.adf_outer <= self.adf_inner or self.adf_inner < 1:
            raise ValueError("need 1 <= live.adf_inner < live.adf_outer (in BF radii)")
        return self

    @property
    def exposed(self) -> bool:
        """The page listens beyond loopback."""
        return self.page_host not in ("127.0.0.1", "localhost", "::1")

    @property
    def needs_token(self) -> bool:
        """The page asks for a token: exposed, or told to."""
        return self.exposed or self.token_required


def live_address(live: LiveSettings, aggregator: str) -> str:
    """Where a node sends its snapshots: live.connect, else derived from the aggregator's address."""
    if live.connect:
        return live.connect
    if aggregator.startswith("ipc://"):
        return f"{aggregator}.live"
    scheme, _, rest = aggregator.partition("://")
    host = rest.rsplit(":", 1)[0]
    port = live.bind.rsplit(":", 1)[-1] if live.bind.startswith("tcp://") else str(LIVE_PORT)
    return f"{scheme}://{host}:{port}"
