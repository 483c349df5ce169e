"""The `stemstream` command line: simulate, count, info, demo, and the streaming processes.

Every command builds the one Settings object (defaults < TOML < environment < these options) and passes
it down. Expected failures (any StemstreamError, bad files, bad arguments) print one error line and exit
non-zero, without a traceback.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from counting.storage.durable import file_sha256
from flows.cli import catalogue as _catalogue
from flows.cli import dark as _dark
from flows.cli import keys as _keys
from flows.cli import microscope as _microscope
from flows.cli import session as _session
from flows.cli import streaming as _streaming
from flows.cli import view as _view
from flows.cli.common import (
    check_threshold_pair,
    command_settings,
    console,
    err_console,
    parse_scan,
    print_error,
    user_errors,
)
from flows.cli.terminal import embedded_prefect, run_settings_file
from flows.settings import given
from tasks.launch.errors import SessionFailed

__all__ = ["app", "main", "user_errors"]

app = typer.Typer(
    name="stemstream",
    help="Stream 4D Camera data to HPC nodes, electron-count it, and write stempy-format sparse HDF5.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _global_options(
    ctx: typer.Context,
    settings: Annotated[
        Path | None,
        typer.Option(
            "--settings",
            help="a settings file written by a session (JSON): every setting in it wins over the "
            "environment and stemstream.toml",
        ),
    ] = None,
    settings_sha256: Annotated[
        str | None,
        typer.Option(
            "--settings-sha256",
            metavar="HEX",
            help="the settings file's SHA-256 (a session renders it into its node commands): any other "
            "content is refused (exit 2) before it is read",
        ),
    ] = None,
) -> None:
    """Stream 4D Camera data to HPC nodes, electron-count it, and write stempy-format sparse HDF5."""
    if settings is not None and not settings.is_file():
        print_error(f"settings file {settings} does not exist")
        raise typer.Exit(1)
    if settings_sha256 is not None:
        _check_settings_digest(settings, settings_sha256)
    ctx.obj = {"settings_file": settings}  # read back by flows.cli.common.command_settings


def _check_settings_digest(settings: Path | None, expected: str) -> None:
    """Exit 2 unless the settings file's SHA-256 is ``expected`` (one line naming the file, never its text)."""
    if settings is None:
        print_error("--settings-sha256 needs --settings FILE")
        raise typer.Exit(2)
    try:
        actual = file_sha256(settings)
    except OSError as exc:
        print_error(f"cannot read settings file {settings}: {exc.strerror or type(exc).__name__}")
        raise typer.Exit(2) from None
    if actual != expected.strip().lower():
        print_error(
            f"settings file {settings} does not match --settings-sha256 (its SHA-256 is {actual}): it was "
            "changed after the session wrote it; refusing to start"
        )
        raise typer.Exit(2)


@app.command()
@user_errors
def simulate(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", "-o", help="directory for raw files, dark.npy, truth.npz")],
    scan: Annotated[str, typer.Option(help="scan size WIDTHxHEIGHT")] = "64x64",
    dose: Annotated[float | None, typer.Option(help="mean electrons per frame")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed")] = None,
    frames_per_position: Annotated[int | None, typer.Option(min=1)] = None,
    scan_number: Annotated[int, typer.Option(min=0)] = 1,
    dark_frames: Annotated[int | None, typer.Option(min=1, help="dark frames averaged into dark.npy")] = None,
    files_per_module: Annotated[int, typer.Option(min=1)] = 1,
) -> None:
    """Simulate a scan: raw v5 sector files, a dark reference (dark.npy) and ground truth (truth.npz)."""
    from counting.simulator.files import write_simulated_scan

    width, height = parse_scan(scan)
    settings = command_settings(ctx)
    sim = settings.simulator.model_copy(
        update=given(
            scan_width=width,
            scan_height=height,
            dose=dose,
            seed=seed,
            frames_per_position=frames_per_position,
            dark_frames=dark_frames,
        )
    )
    t0 = time.perf_counter()
    result = write_simulated_scan(
        out,
        scan_number=scan_number,
        width=sim.scan_width,
        height=sim.scan_height,
        dose=sim.dose,
        seed=sim.seed,
        frames_per_position=sim.frames_per_position,
        dark_frames=sim.dark_frames,
        files_per_module=files_per_module,
        flyback=sim.flyback,
    )
    console.print(
        f"simulated scan {scan_number}: {sim.scan_width}x{sim.scan_height}, {result.frames} frames, "
        f"{result.electrons / max(result.frames, 1):.1f} electrons/frame in {time.perf_counter() - t0:.1f} s"
    )
    console.print(f"raw files: {len(result.raw_files)} in {out}")
    console.print(f"dark reference: {result.dark}")
    console.print(f"ground truth: {result.truth}")


@app.command()
@user_errors
def count(
    ctx: typer.Context,
    raw: Annotated[list[Path], typer.Argument(help="raw .data files of one scan, or a directory of them")],
    dark: Annotated[Path | None, typer.Option(help="dark reference .npy (576x576); default: no dark")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="output sparse HDF5")] = Path("scan.h5"),
    background_threshold: Annotated[
        float | None, typer.Option(help="fixed background threshold, ADU")
    ] = None,
    xray_threshold: Annotated[float | None, typer.Option(help="fixed x-ray threshold, ADU")] = None,
    gain: Annotated[
        Path | None, typer.Option(help="gain .npy (576x576); value = (raw - dark) / gain")
    ] = None,
    workers: Annotated[int | None, typer.Option(min=0, help="counting threads (0 = all cores)")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1)] = None,
    file_version: Annotated[int, typer.Option("--file-version", help="raw format version (4 or 5)")] = 5,
    force: Annotated[bool, typer.Option(help="overwrite an existing output file")] = False,
) -> None:
    """Count raw 4D Camera files offline into one stempy-format sparse HDF5."""
    from counting.dark import load_dark, load_frame_array
    from counting.offline import count_raw_scan, raw_paths
    from counting.raw import open_raw_scan
    from counting.sparse import write_counted_scan
    from streaming.components import counting_options

    check_threshold_pair(background_threshold, xray_threshold)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it")
    settings = command_settings(
        ctx,
        counting=given(
            background_threshold=background_threshold,
            xray_threshold=xray_threshold,
            workers=workers,
            batch_size=batch_size,
        ),
    )
    scan = open_raw_scan(raw_paths(raw), version=file_version)
    dark_arr = load_dark(str(dark)) if dark is not None else None
    gain_arr = load_frame_array(str(gain), "gain") if gain is not None else None
    options = counting_options(settings.counting)
    _warn_incomplete(scan.summary())
    t0 = time.perf_counter()
    with _progress() as progress:
        task = progress.add_task("counting", total=scan.num_frames)
        counted = count_raw_scan(
            scan,
            dark_arr,
            options,
            gain_arr,
            batch_size=settings.counting.batch_size,
            progress=lambda n: progress.advance(task, n),
        )
    elapsed = time.perf_counter() - t0
    if force:
        out.unlink(missing_ok=True)  # asked for; the write itself never replaces a file
    write_counted_scan(out, counted)
    _print_summary(out, counted, elapsed)


def _warn_incomplete(summary: dict) -> None:
    """Say so when the raw files miss sectors or whole frames (the output mask marks them)."""
    if summary["incomplete"] or summary["positions_missing"]:
        err_console.print(
            f"[yellow]warning:[/] {summary['incomplete']} frames miss sectors and "
            f"{summary['positions_missing']} scan positions have no frame; they are marked in the output mask"
        )


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("frames"),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )


def _print_summary(out: Path, counted: Any, elapsed: float) -> None:
    ec = counted.metadata.get("electron_counting", {})
    frames = counted.num_frames
    table = Table(title=f"counted {out}", show_header=False)
    table.add_row("scan (width x height)", f"{counted.scan.width} x {counted.scan.height}")
    table.add_row("frames", f"{frames} ({counted.complete_frames} complete)")
    table.add_row("sector completeness", f"{100 * counted.completeness:.2f} %")
    table.add_row("events", f"{counted.num_events} ({counted.num_events / max(frames, 1):.1f} per frame)")
    table.add_row(
        "thresholds (ADU)",
        f"background {ec.get('background_threshold', float('nan')):.2f}, "
        f"x-ray {ec.get('x_ray_threshold', float('nan')):.1f}"
        + (" (estimated)" if ec.get("threshold_calculated") else " (fixed)"),
    )
    table.add_row("time", f"{elapsed:.2f} s ({frames / max(elapsed, 1e-9):.0f} frames/s)")
    console.print(table)


@app.command()
@user_errors
def info(path: Annotated[Path, typer.Argument(help="a counted sparse HDF5 file")]) -> None:
    """Describe a counted scan: shape, frames, events, completeness, thresholds."""
    from counting.sparse import read_counted_scan

    counted = read_counted_scan(path)
    table = Table(title=str(path), show_header=False)
    table.add_row("scan (width x height)", f"{counted.scan.width} x {counted.scan.height}")
    table.add_row("frames per position", str(counted.frames_per_position))
    table.add_row("frames", f"{counted.num_frames} ({counted.complete_frames} complete)")
    missing = int((~counted.position_complete).sum())
    table.add_row(
        "sector completeness", f"{100 * counted.completeness:.2f} % ({missing} positions incomplete)"
    )
    table.add_row(
        "events", f"{counted.num_events} ({counted.num_events / max(counted.num_frames, 1):.1f} per frame)"
    )
    for key, value in sorted(counted.metadata.get("electron_counting", {}).items()):
        table.add_row(f"counting: {key}", f"{value}")
    console.print(table)


@app.command()
@user_errors
def soak(
    ctx: typer.Context,
    scans: Annotated[int, typer.Option(min=2, help="scans back to back in one session")] = 60,
    scan: Annotated[str, typer.Option(help="scan size WIDTHxHEIGHT")] = "64x64",
    nodes: Annotated[int, typer.Option(min=1, help="node streamers")] = 2,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the report here")] = None,
) -> None:
    """A stability run: one local session of many scans; every scan must be complete and memory flat."""
    import json

    from flows.soak import run_soak

    width, height = parse_scan(scan)
    settings = command_settings(ctx)
    embedded_prefect(settings.output_dir)
    console.print(
        f"[bold]stemstream soak[/]: {scans} scans of {width}x{height} through {nodes} node streamer(s)"
    )
    report = run_soak(
        scans, width, height, settings.simulator.dose, nodes, settings_file=str(run_settings_file(settings))
    )
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report.as_dict(), indent=2))
    console.print(
        f"{report.complete_scans}/{scans} scans complete and verified, {report.frames_lost} frames and "
        f"{report.sectors_lost} sectors lost; memory of all session processes {report.rss_early_mb:.0f} MB "
        f"early, {report.rss_late_mb:.0f} MB late (private {report.private_early_mb:.0f} / "
        f"{report.private_late_mb:.0f} MB, trend {report.private_slope_mb_per_scan:+.2f} MB/scan; "
        f"{report.samples} samples); {report.wall_s:.0f} s"
    )
    if report.complete_scans != scans or report.frames_lost:
        raise SessionFailed(f"the soak lost data: session {report.state}: {report.message}")


@app.command()
@user_errors
def alerts(
    ctx: typer.Context,
    webhook: Annotated[
        str | None,
        typer.Option(
            help="URL that gets a JSON POST {subject, body} on each failure (default: session.alert_webhook)"
        ),
    ] = None,
) -> None:
    """Alert a webhook when a session or experiment run fails, crashes or times out (needs a server)."""
    from flows.alerts import (
        BLOCK_NAME,
        FAILURE_EVENTS,
        FLOW_NAMES,
        check_server,
        check_webhook,
        redact_url,
        setup_alerts,
    )

    configured = command_settings(ctx).session.alert_webhook
    webhook = webhook or (configured.get_secret_value() if configured else None)
    if not webhook:
        raise typer.BadParameter("give --webhook URL or set session.alert_webhook in the settings")
    check_webhook(webhook)
    api = check_server()
    automation = setup_alerts(webhook, FLOW_NAMES)
    console.print(f"server {redact_url(api)}: webhook block {BLOCK_NAME!r} -> {redact_url(webhook)}")
    console.print(f"automation {automation.name!r} ({automation.id}): on {', '.join(FAILURE_EVENTS)}")
    console.print(f"  of flows {', '.join(FLOW_NAMES)}")


for _commands in (_streaming, _session, _catalogue, _view, _dark, _microscope, _keys):
    _commands.register(app)


def main() -> None:
    """Console-script entry point."""
    quiet_known_warnings()
    app(prog_name="stemstream")


def quiet_known_warnings() -> None:
    """Silence Authlib's httpx deprecation warning, which it forces to "always" on import (notes/deps.md).

    sfapi_client still uses httpx, so the warning is noise on every command that reaches SFAPI; the filter
    must be added after authlib.deprecate is imported, or its own "always" filter wins.
    """
    import authlib.deprecate

    warnings.filterwarnings("ignore", category=authlib.deprecate.AuthlibDeprecationWarning)
