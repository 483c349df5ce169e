"""The dark-reference settings section; composed into the one Settings object in flows/settings.py."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

HOT_SIGMA = 8.0  # a pixel is hot when its dark level is this many robust sigmas above the median


class DarkSettings(BaseModel):
    """Where dark references are kept, how they are made, and how sessions pick one."""

    dir: Path | None = Field(None, description="where darks are kept (default <output_dir>/darks)")
    use_newest: bool = Field(
        True, description="sessions count with the newest dark of their camera when counting.dark is not set"
    )
    max_age_hours: float = Field(
        24.0, gt=0, description="a session warns when the dark it uses is older than this"
    )
    hot_sigma: float = Field(
        HOT_SIGMA,
        gt=0,
        description="a pixel is hot when its dark level is this many robust sigmas above the median",
    )
    frames: int = Field(200, ge=1, description="dark frames the simulated camera gives (beam blanked)")


def dark_dir(settings: DarkSettings, output_dir: Path) -> Path:
    """The dark store: the setting, else <output_dir>/darks."""
    return (settings.dir or Path(output_dir) / "darks").expanduser()
