"""Making, keeping and choosing dark references (plain code; the flow is flows/dark.py).

A dark comes from per-pixel sums of raw frames taken with the beam blanked (counting.dark.stats):
* a streamed dark scan: the nodes of a session run with ``streaming.accumulate_dark`` leave their shares
  of the sums beside the scans (streaming.node.dark_sums); they are added up here;
* the simulated camera's dark frames (beam blanked: noise only);
* raw 4D Camera files of a dark scan.
It is stored with a timestamp, never overwriting (counting.dark.store), and recorded in the catalogue.
Sessions then count with the newest dark of their camera unless ``counting.dark`` names one, and warn
when it is older than ``dark.max_age_hours``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from counting.dark.settings import DarkSettings, dark_dir
from counting.dark.stats import DarkSums, dark_from_sums
from counting.dark.store import DarkInfo, newest_dark, save_dark
from counting.geometry import ScanShape
from counting.settings import SimulatorSettings
from counting.simulator import SimulatedCamera, SimulatorConfig
from streaming.node.dark_sums import scan_sums

log = logging.getLogger(__name__)

INSTRUMENT = "instrument"


def simulated_camera_label(seed: int) -> str:
    """The camera a simulated dark fits: the simulated detector of this seed (its dark pattern)."""
    return f"simulated:{seed}"


def sums_from_simulator(simulator: SimulatorSettings, frames: int) -> DarkSums:
    """The simulated camera's dark frames (beam blanked) of the session seed's detector, summed."""
    camera = SimulatedCamera(SimulatorConfig(ScanShape(1, 1), seed=simulator.seed))
    sums = DarkSums()
    for frame in camera.iter_dark_frames(frames):  # one frame at a time: flat memory
        sums.add(frame)
    return sums


def sums_from_raw(paths: Sequence[Path], file_version: int = 5) -> DarkSums:
    """The complete frames of raw 4D Camera files of a dark scan, summed."""
    from counting.geometry import ALL_SECTORS
    from counting.offline import raw_paths
    from counting.raw import open_raw_scan

    scan = open_raw_scan(raw_paths(paths), version=file_version)
    sums = DarkSums()
    for batch in scan.iter_batches(64, reuse_buffer=True):
        complete = batch.sector_masks == ALL_SECTORS
        sums.add(batch.frames[complete] if not complete.all() else batch.frames)
    return sums


def make_dark(sums: DarkSums, settings: DarkSettings, output_dir: Path, camera: str, source: str) -> DarkInfo:
    """Store the dark of these sums with its statistics (never overwriting) and return where it is."""
    ref = dark_from_sums(sums, settings.hot_sigma)
    info = save_dark(dark_dir(settings, output_dir), ref, camera, source)
    log.info(
        "dark %s: %d frames, mean %.2f ADU, noise %.2f ADU, %d hot pixels (%s, %s)",
        Path(info.path).name, info.frames, info.mean, info.noise, info.hot_pixels, camera, source,
    )  # fmt: skip
    return info


def dark_from_streamed_scan(
    scans_dir: Path, scan_number: int | None, settings: DarkSettings, output_dir: Path
) -> DarkInfo:
    """The dark of a streamed dark scan: every node's share of its sums, added up."""
    found = scan_sums(scans_dir, scan_number)
    if found.sums.frames < 1:
        raise ValueError(f"dark scan {found.scan_number} in {scans_dir} has no complete frames")
    source = f"streamed scan {found.scan_number} ({len(found.files)} node(s))"
    expected = _expected_frames(scans_dir, found.scan_number)
    if expected and found.sums.frames < expected:
        log.warning(
            "dark scan %d: %d of its %d frames were complete; the dark is their mean",
            found.scan_number, found.sums.frames, expected,
        )  # fmt: skip
        source += f", {found.sums.frames} of {expected} frames complete"
    return make_dark(found.sums, settings, output_dir, INSTRUMENT, source)


def _expected_frames(scans_dir: Path, scan_number: int) -> int:
    """The frames the newest stop record of this scan number expected (0 if none is there)."""
    from streaming.protocol.record import ScanRecord

    records = sorted(scans_dir.glob(f"*_{scan_number:05d}*.json"), key=lambda p: p.stat().st_mtime)
    for path in reversed(records):
        try:
            return ScanRecord.load(path).expected_frames
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return 0


def record_in_catalogue(info: DarkInfo, catalogue_settings, output_dir: Path) -> str | None:
    """Record the dark in the scan catalogue; returns why not (the dark itself is kept either way: its
    .json beside it is enough to record it later)."""
    if catalogue_settings is None or not getattr(catalogue_settings, "enabled", False):
        return "catalogue disabled"
    try:
        from catalogue import open_catalogue
        from catalogue.entries import DarkEntry, utc

        with open_catalogue(catalogue_settings, output_dir) as cat:
            cat.record_dark(
                DarkEntry(
                    path=info.path, created_at=utc(info.created), frames=info.frames, mean=info.mean,
                    noise=info.noise, hot_pixels=info.hot_pixels, sha256=info.sha256,
                    source=info.camera if info.camera == INSTRUMENT else "simulated",
                    stats={**info.stats, "source": info.source, "camera": info.camera},
                )
            )  # fmt: skip
    except Exception as exc:  # a database that is down never costs the dark
        log.warning("dark %s not recorded in the catalogue: %s", Path(info.path).name, exc)
        return str(exc)
    return None


def session_dark(
    explicit: Path | None, settings: DarkSettings, output_dir: Path, camera: str
) -> tuple[Path | None, str | None]:
    """The dark a session counts with, and a warning if any: ``counting.dark`` when set, else the newest
    stored dark of this camera (dark.use_newest), else None."""
    if explicit is not None:
        return explicit, None
    if not settings.use_newest:
        return None, None
    dark = newest_dark(dark_dir(settings, output_dir), camera)
    if dark is None:
        return None, None
    warning = None
    if dark.age_hours > settings.max_age_hours:
        warning = (
            f"the newest dark {Path(dark.path).name} is {dark.age_hours:.1f} h old "
            f"(dark.max_age_hours = {settings.max_age_hours:g}): take a new one with `stemstream dark`"
        )
    return Path(dark.path), warning
