"""The dark reference flow: a dark from a streamed dark scan, the simulated camera or raw files, stored
with a timestamp (never overwriting) and recorded in the catalogue; `stemstream dark` runs the same code.

A dark through the streaming path (the instrument): run one scan with the beam blanked in a session whose
nodes add up the raw frames (``--set streaming.accumulate_dark=true``), then this flow with ``source
"scan"`` and that session's scans directory: it adds up the nodes' shares (tasks.darks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger

from counting.dark.store import DarkInfo
from flows.settings import Settings, load_settings
from tasks.darks import (
    INSTRUMENT,
    dark_from_streamed_scan,
    make_dark,
    record_in_catalogue,
    simulated_camera_label,
    sums_from_raw,
    sums_from_simulator,
)


def acquire_dark(
    settings: Settings,
    source: Literal["simulated", "scan", "raw"],
    frames: int | None = None,
    scans_dir: Path | None = None,
    scan_number: int | None = None,
    raw: list[Path] | None = None,
) -> tuple[DarkInfo, str | None]:
    """Make, store and record a dark; returns it and why it is not in the catalogue (None: it is)."""
    if source == "simulated":
        n = frames or settings.dark.frames
        sums = sums_from_simulator(settings.simulator, n)
        label = simulated_camera_label(settings.simulator.seed)
        info = make_dark(sums, settings.dark, settings.output_dir, label, f"simulator ({n} dark frames)")
    elif source == "scan":
        if scans_dir is None:
            raise ValueError("a dark from a streamed scan needs the session's scans directory")
        info = dark_from_streamed_scan(Path(scans_dir), scan_number, settings.dark, settings.output_dir)
    elif source == "raw":
        if not raw:
            raise ValueError("a dark from raw files needs the dark scan's .data files")
        sums = sums_from_raw([Path(p) for p in raw])
        info = make_dark(sums, settings.dark, settings.output_dir, INSTRUMENT, f"raw files ({len(raw)})")
    else:
        raise ValueError(f"unknown dark source {source!r}: simulated, scan or raw")
    return info, record_in_catalogue(info, getattr(settings, "catalogue", None), settings.output_dir)


@flow(name="stemstream-dark")
def dark(
    source: Literal["simulated", "scan", "raw"] = "simulated",
    frames: int = 0,
    scans_dir: str = "",
    scan_number: int = -1,
    raw: list[str] = (),  # a tuple: defaults must not be shared mutable lists
    settings_file: str = "",
) -> dict:
    """A dark reference: the per-pixel mean of beam-blanked frames (float32), with its noise and hot pixels.

    Args:
        source: simulated = the simulated camera's dark frames; scan = a dark scan streamed through a session
            with streaming.accumulate_dark (its nodes' sums); raw = raw 4D Camera files of a dark scan.
        frames: simulated: dark frames (0 = dark.frames).
        scans_dir: scan: the session's scans directory.
        scan_number: scan: which scan (-1 = the newest with sums).
        raw: raw: the .data files (or their directory).
        settings_file: Settings to run with (JSON, as `stemstream` writes them); empty = the environment
            and stemstream.toml.
    """
    logger = get_run_logger()
    settings = load_settings(Path(settings_file) if settings_file else None)
    info, not_recorded = acquire_dark(
        settings,
        source,
        frames or None,
        Path(scans_dir) if scans_dir else None,
        scan_number if scan_number >= 0 else None,
        [Path(p) for p in raw],
    )
    logger.info(
        "dark %s: %d frames, mean %.2f ADU, noise %.2f ADU, %d hot pixels",
        info.path, info.frames, info.mean, info.noise, info.hot_pixels,
    )  # fmt: skip
    if not_recorded:
        logger.warning("dark not recorded in the catalogue: %s", not_recorded)
    return info.to_json()
