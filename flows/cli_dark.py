"""`stemstream dark`: make a dark reference (flows/dark.py) from the simulated camera, a streamed dark scan
or raw files, and list the stored darks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from flows.settings import load_settings


def dark(
    raw: Annotated[
        list[Path] | None, typer.Argument(help="raw .data files of a dark scan (or their directory)")
    ] = None,
    simulated: Annotated[
        bool, typer.Option("--simulated", help="the simulated camera's dark frames")
    ] = False,
    scan_dir: Annotated[
        Path | None,
        typer.Option(
            help="a session's scans directory holding a streamed dark scan's sums (accumulate_dark)"
        ),
    ] = None,
    scan: Annotated[
        int | None, typer.Option(min=0, help="with --scan-dir: the scan number (default newest)")
    ] = None,
    frames: Annotated[int | None, typer.Option(min=1, help="with --simulated: dark frames")] = None,
    list_darks: Annotated[bool, typer.Option("--list", help="list the stored darks, newest last")] = False,
) -> None:
    """Make a dark reference (float32 mean, noise, hot pixels), stored with a timestamp and catalogued."""
    from counting.dark_settings import dark_dir
    from counting.dark_store import list_darks as stored
    from flows.dark import acquire_dark

    settings = load_settings()
    if list_darks:
        for d in stored(dark_dir(settings.dark, settings.output_dir)):
            typer.echo(f"{d.path}  {d.camera}  {d.frames} frames  mean {d.mean:.2f}  noise {d.noise:.2f}  "
                       f"{d.hot_pixels} hot  {d.age_hours:.1f} h old  ({d.source})")  # fmt: skip
        return
    chosen = [name for name, on in (("--simulated", simulated), ("--scan-dir", scan_dir), ("RAW", raw)) if on]
    if len(chosen) != 1:
        raise ValueError("give exactly one of --simulated, --scan-dir DIR or RAW files")
    if scan is not None and scan_dir is None:
        raise ValueError("--scan needs --scan-dir")
    if frames is not None and not simulated:
        raise ValueError("--frames is for --simulated")
    if scan_dir is not None and not scan_dir.is_dir():
        raise FileNotFoundError(f"scans directory {scan_dir} does not exist")
    for path in raw or []:
        if not path.exists():
            raise FileNotFoundError(f"raw file {path} does not exist")
    source = "simulated" if simulated else "scan" if scan_dir is not None else "raw"
    info, not_recorded = acquire_dark(settings, source, frames, scan_dir, scan, list(raw or []))
    typer.echo(
        f"dark: {info.path} ({info.frames} frames, mean {info.mean:.2f} ADU, noise {info.noise:.2f} ADU, "
        f"{info.hot_pixels} hot pixels; {info.source})"
    )
    if not_recorded:
        typer.echo(f"warning: not recorded in the catalogue: {not_recorded}", err=True)


def register(app: typer.Typer, wrap: Any) -> None:
    """Add `stemstream dark` to the CLI, with the CLI's error handling."""
    app.command(name="dark")(wrap(dark))
