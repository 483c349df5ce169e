"""The one typed settings object: defaults < TOML file < environment (STEMSTREAM_...) < CLI/init arguments.

Built at the entry point (CLI, flow) and passed down; importing this module reads nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from catalogue.settings import CatalogueSettings
from counting.dark_settings import DarkSettings
from counting.settings import CountingSettings, SimulatorSettings
from streaming.settings import StreamingSettings
from tasks.settings import AnalysisSettings, MicroscopeSettings, SfapiSettings, SlurmSettings, SshSettings

ENV_PREFIX = "STEMSTREAM_"
CONFIG_ENV = "STEMSTREAM_CONFIG"  # path of the TOML file; default ./stemstream.toml when it exists


class SessionSettings(BaseModel):
    """How a session runs: where (backend), how many nodes, how long to wait for each stage."""

    backend: Literal["local", "nersc"] = Field("local", description="local processes, or SFAPI + SSH")
    nodes: int = Field(2, ge=1, description="node streamers (one per allocated node)")
    nodes_ready_timeout: float = Field(120.0, gt=0, description="seconds for every node to report ready")
    scan_timeout: float = Field(300.0, gt=0, description="seconds for a scan's counted file to appear")
    min_completeness: float = Field(
        0.99,
        ge=0,
        le=1,
        description="verification fails below this fraction of sectors; below 1.0: a warning",
    )
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
    analysis: AnalysisSettings = AnalysisSettings()
    microscope: MicroscopeSettings = MicroscopeSettings()
    dark: DarkSettings = DarkSettings()
    catalogue: CatalogueSettings = CatalogueSettings()

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


_settings_file: Path | None = None  # set once by the CLI's --settings option


def use_settings_file(path: Path | None) -> None:
    """Make every later load_settings() in this process start from this settings file (the CLI's
    ``--settings``: how a session hands its settings to the processes it starts)."""
    global _settings_file
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"settings file {path} does not exist")
    _settings_file = None if path is None else Path(path)


def load_settings(settings_file: Path | None = None, **overrides: object) -> Settings:
    """Build settings: defaults < TOML < environment < explicit overrides (the CLI's values).

    With a settings file (written by write_settings_file, e.g. a session's), its values win over the
    environment and the TOML file, which then only supply what the file leaves out (secrets)."""
    path = settings_file or _settings_file
    if path is None:
        return Settings(**given(**overrides))
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read settings file {path}: {exc}") from None
    return Settings(**_deep_merge(data, given(**overrides)))


def write_settings_file(settings: Settings, path: Path) -> Path:
    """Save settings as JSON for the processes a session starts; secret values are left out."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(settings_json(settings))
    os.replace(tmp, path)
    return path


def settings_json(settings: Settings) -> str:
    """The settings file's text (secret values left out)."""
    return json.dumps(_without_secrets(settings.model_dump(mode="python")), indent=2, default=str)


def _without_secrets(data: object) -> object:
    if isinstance(data, dict):
        return {k: _without_secrets(v) for k, v in data.items() if not isinstance(v, SecretStr)}
    if isinstance(data, list | tuple):
        return [_without_secrets(v) for v in data]
    return data


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
