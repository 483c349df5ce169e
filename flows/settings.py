"""The one typed settings object: defaults < TOML file < environment (STEMSTREAM_...) < CLI/init arguments.

Built at the entry point (CLI, flow) and passed down; importing this module reads nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from counting.settings import CountingSettings, SimulatorSettings
from streaming.settings import StreamingSettings
from tasks.remote import SshSettings
from tasks.sfapi import SfapiSettings
from tasks.slurm import SlurmSettings

ENV_PREFIX = "STEMSTREAM_"
CONFIG_ENV = "STEMSTREAM_CONFIG"  # path of the TOML file; default ./stemstream.toml when it exists


class SessionSettings(BaseModel):
    """How a session runs: where (backend), how many nodes, how long to wait for each stage."""

    backend: Literal["local", "nersc"] = Field("local", description="local processes, or SFAPI + SSH")
    nodes: int = Field(2, ge=1, description="node streamers (one per allocated node)")
    nodes_ready_timeout: float = Field(120.0, gt=0, description="seconds for every node to report ready")
    scan_timeout: float = Field(300.0, gt=0, description="seconds for a scan's counted file to appear")
    min_completeness: float = Field(1.0, ge=0, le=1, description="verification threshold")
    scan_dir: Path | None = Field(
        None,
        description="where the scan writer puts the HDF5 files (default <output_dir>/sessions/<run>/scans); "
        "with the nersc backend a directory the nodes can write and this machine can read, e.g. on CFS",
    )
    postprocess: bool = True
    alert_webhook: str | None = Field(None, description="URL called when a session fails or crashes")
    aggregator_remote_command: list[str] | None = Field(
        None,
        description="how to run stemstream on the aggregator host, e.g. ['/opt/stemstream/bin/stemstream']",
    )


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
    session: SessionSettings = SessionSettings()
    sfapi: SfapiSettings = SfapiSettings()
    slurm: SlurmSettings = SlurmSettings()
    ssh: SshSettings = SshSettings()

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


def given(**values: object) -> dict:
    """The options a user actually gave (None means not given): overrides for a settings section."""
    return {k: v for k, v in values.items() if v is not None}


def load_settings(**overrides: object) -> Settings:
    """Build settings from defaults, TOML, environment and explicit overrides (the CLI's values)."""
    return Settings(**given(**overrides))
