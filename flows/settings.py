"""The one typed settings object: defaults < TOML file < environment (STEMSTREAM_...) < CLI/init arguments.

Built at the entry point (CLI, flow) and passed down; importing this module reads nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings.sources.utils import parse_env_vars

from catalogue.settings import CatalogueSettings
from counting.dark.settings import DarkSettings
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
    postprocess: bool = Field(True, description="analyse each verified scan with py4DSTEM (images, CoM, DPC)")
    stream_phase: bool = Field(
        True,
        description="after verification, fit each scan's parallax (defocus, astigmatism, rotation: the live "
        "view's code, over the whole scan) into its HDF5 (/phase) and the catalogue (analysis stream-phase)",
    )
    alert_webhook: SecretStr | None = Field(
        None, description="URL called when a session fails or crashes (a secret: never in settings files)"
    )
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

    output_dir: Path = Field(
        Path("stemstream-output"), description="sessions, darks, re-analyses and the SQLite catalogue go here"
    )
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


def load_settings(settings_file: Path | None = None, **overrides: object) -> Settings:
    """Build settings: defaults < TOML < environment < explicit overrides (the CLI's values).

    With a settings file (written by write_settings_file, e.g. a session's), its values win over the
    environment and the TOML file, which then only supply what the file leaves out (secrets)."""
    if settings_file is None:
        return Settings(**given(**overrides))
    try:
        data = json.loads(Path(settings_file).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read settings file {settings_file}: {exc}") from None
    return Settings(**merge_overrides(data, given(**overrides)))


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


def merge_overrides(base: dict, top: dict) -> dict:
    """Nested override dicts merged section by section; ``top`` wins where both set a value."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_overrides(out[key], value)
        else:
            out[key] = value
    return out


class _Assignments(EnvSettingsSource):
    """The environment source reading given STEMSTREAM_... variables instead of os.environ."""

    def __init__(self, variables: Mapping[str, str]) -> None:
        self._variables = dict(variables)
        super().__init__(Settings)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(
            self._variables, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str
        )


def assignment_overrides(assignments: Mapping[str, str]) -> dict:
    """SECTION.FIELD=VALUE assignments (the CLI's ``--set``) as nested overrides for load_settings, each
    value parsed as its STEMSTREAM_SECTION__FIELD environment variable would be (JSON for lists)."""
    if not assignments:
        return {}
    variables = {ENV_PREFIX + key.upper().replace(".", "__"): value for key, value in assignments.items()}
    return dict(_Assignments(variables)())
