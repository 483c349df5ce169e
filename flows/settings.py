"""The one typed settings object: defaults < TOML file < environment (STEMSTREAM_...) < CLI/init arguments.

Built at the entry point (CLI, flow) and passed down; importing this module reads nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

ENV_PREFIX = "STEMSTREAM_"
CONFIG_ENV = "STEMSTREAM_CONFIG"  # path of the TOML file; default ./stemstream.toml when it exists


class CountingSettings(BaseModel):
    """Electron-counting parameters (production defaults from NERSC)."""

    background_threshold: float | None = Field(None, description="fixed background threshold in ADU")
    xray_threshold: float | None = Field(None, description="fixed x-ray threshold in ADU")
    background_n_sigma: float = 4.5
    xray_n_sigma: float = 175.0
    number_of_samples: int = Field(1200, ge=1)
    sample_frames: int = Field(20, ge=1, description="distinct frames the threshold samples come from")
    seed: int = 0
    workers: int = Field(0, ge=0, description="threads for counting; 0 = all cores")
    batch_size: int = Field(64, ge=1, description="frames counted per batch (bounds memory)")


class SimulatorSettings(BaseModel):
    """The simulated 4D Camera used by the demo, tests and benchmarks."""

    scan_width: int = Field(64, ge=1)
    scan_height: int = Field(64, ge=1)
    frames_per_position: int = Field(1, ge=1)
    dose: float = Field(200.0, ge=0, description="mean electrons per frame")
    seed: int = 0
    dark_frames: int = Field(100, ge=1)


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

    receivers: list[str] = Field(default_factory=lambda: ["tcp://127.0.0.1:6001"])
    nodes_bind: str = "tcp://127.0.0.1:17000"
    monitor_bind: str | None = "tcp://127.0.0.1:17001"
    n_nodes: int = Field(1, ge=1)
    scan_deadline: float = Field(
        2.0, gt=0, description="aggregator: seconds without a sector before a scan ends"
    )
    node_deadline: float = Field(10.0, gt=0, description="node: seconds of aggregator silence mid-scan")
    frame_timeout: float = Field(5.0, gt=0, description="node: seconds a full slot may wait for sectors")
    writer_deadline: float = Field(30.0, gt=0, description="writer: seconds a scan may be silent")
    heartbeat: float = Field(1.0, gt=0)
    node_workers: int = Field(1, ge=0, description="counting processes per node (0: in the node process)")
    node_batch: int = Field(32, ge=1)
    node_slots: int = Field(16, ge=2, description="batches in flight per node (memory bound)")
    session_id: int = Field(0, ge=0, le=99999)
    name_template: str = "FOURD_{date}_{session:05d}_{scan:05d}.h5"
    send_rate: float | None = Field(None, gt=0, description="sender frames/s per module (None: unlimited)")
    curve: CurveSettings = CurveSettings()


class Settings(BaseSettings):
    """All stemstream settings."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="ignore",
        nested_model_default_partial_update=True,
    )

    output_dir: Path = Path("stemstream-output")
    counting: CountingSettings = CountingSettings()
    simulator: SimulatorSettings = SimulatorSettings()
    streaming: StreamingSettings = StreamingSettings()

    @field_validator("output_dir")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls, toml_file=config_path())
        return (init_settings, env_settings, toml, file_secret_settings)


def config_path() -> Path | None:
    """The TOML settings file: $STEMSTREAM_CONFIG, else ./stemstream.toml if present."""
    explicit = os.environ.get(CONFIG_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{CONFIG_ENV} points to {path}, which does not exist")
        return path
    local = Path("stemstream.toml")
    return local if local.is_file() else None


def load_settings(**overrides: object) -> Settings:
    """Build settings from defaults, TOML, environment and explicit overrides (the CLI's values)."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
