"""`stemstream dark`: make a dark reference (flows/dark.py) from the simulated camera, a streamed dark scan
or raw files, and list the stored darks."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from flows.cli.common import command_settings, user_errors
from flows.cli.terminal import run_in_terminal
from flows.settings import Settings
from tasks.launch.errors import SessionFailed
from tasks.launch.state import SESSION_FILE, SessionState


def dark(
    ctx: typer.Context,
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
    session: Annotated[
        bool,
        typer.Option(
            "--session",
            help="record a dark scan now: an instrument session (prints `ready:`) counts the next scan the "
            "receivers deliver, beam blanked, its nodes adding up the raw frames (streaming.accumulate_dark)",
        ),
    ] = False,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="with --session: any setting, SECTION.FIELD=VALUE")
    ] = None,
) -> None:
    """Make a dark reference (float32 mean, noise, hot pixels), stored with a timestamp and catalogued."""
    from counting.dark.settings import dark_dir
    from counting.dark.store import list_darks as stored
    from flows.dark import acquire_dark

    settings = command_settings(ctx)
    if list_darks:
        for d in stored(dark_dir(settings.dark, settings.output_dir)):
            typer.echo(f"{d.path}  {d.camera}  {d.frames} frames  mean {d.mean:.2f}  noise {d.noise:.2f}  "
                       f"{d.hot_pixels} hot  {d.age_hours:.1f} h old  ({d.source})")  # fmt: skip
        return
    _check_inputs(raw, simulated, scan_dir, scan, frames, session, bool(set_))
    if session:
        settings, scan_dir = _dark_session(ctx, set_ or [])
    source = "simulated" if simulated else "scan" if scan_dir is not None else "raw"
    info, not_recorded = acquire_dark(settings, source, frames, scan_dir, scan, list(raw or []))
    typer.echo(
        f"dark: {info.path} ({info.frames} frames, mean {info.mean:.2f} ADU, noise {info.noise:.2f} ADU, "
        f"{info.hot_pixels} hot pixels; {info.source})"
    )
    if not_recorded:
        typer.echo(f"warning: not recorded in the catalogue: {not_recorded}", err=True)


def _check_inputs(
    raw: list[Path] | None,
    simulated: bool,
    scan_dir: Path | None,
    scan: int | None,
    frames: int | None,
    session: bool,
    assignments: bool,
) -> None:
    """One source, and only the options that go with it; the given files and directories exist."""
    sources = (("--simulated", simulated), ("--scan-dir", scan_dir), ("RAW", raw), ("--session", session))
    if len([name for name, on in sources if on]) != 1:
        raise ValueError("give exactly one of --simulated, --session, --scan-dir DIR or RAW files")
    if assignments and not session:
        raise ValueError("--set is for --session")
    if scan is not None and scan_dir is None:
        raise ValueError("--scan needs --scan-dir")
    if frames is not None and not simulated:
        raise ValueError("--frames is for --simulated")
    if scan_dir is not None and not scan_dir.is_dir():
        raise FileNotFoundError(f"scans directory {scan_dir} does not exist")
    for path in raw or []:
        if not path.exists():
            raise FileNotFoundError(f"raw file {path} does not exist")


def _dark_session(ctx: typer.Context, assignments: list[str]) -> tuple[Settings, Path]:
    """Run an instrument session for one scan with the nodes adding up raw frames; (settings, scans dir)."""
    settings = command_settings(ctx, [*assignments, "streaming.accumulate_dark=true"])
    s = settings.session
    t0 = time.time()
    params = dict(
        camera="instrument", n_scans=1, duration=0.0, scan_width=1, scan_height=1, dose=0.0,
        nodes=s.nodes, backend=s.backend, postprocess=False, min_completeness=s.min_completeness,
        frame_rate=0.0, script="",
    )  # fmt: skip
    run_in_terminal(settings, params, postprocess=False)  # raises when the session failed: no dark then
    sessions = [
        d for d in (settings.output_dir / "sessions").glob(f"*/{SESSION_FILE}") if d.stat().st_mtime >= t0 - 1
    ]
    if not sessions:
        raise SessionFailed("the dark session left no session directory")
    state = SessionState.load(max(sessions, key=lambda p: p.stat().st_mtime).parent)
    return settings, Path(state.scans_dir)


def register(app: typer.Typer) -> None:
    """Add `stemstream dark` to the CLI, with the CLI's error handling."""
    app.command(name="dark")(user_errors(dark))
