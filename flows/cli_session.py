"""`stemstream session` and `stemstream demo`: the session flow from a terminal (flows/cli_terminal.py: the
embedded Prefect server, the `ready:` and scan lines, the summary). Exit status 0 when every scan passed
verification."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli_common import command_settings, console, parse_scan, user_errors
from flows.cli_terminal import run_in_terminal
from flows.settings import SimulatorSettings


def _script(path: Path | None, camera: str, simulator: SimulatorSettings) -> str:
    """The script's absolute path for the flow ("" for none), checked now: one clear error, no session."""
    if path is None:
        return ""
    if camera != "simulated":
        raise typer.BadParameter("--script plays the simulated camera: use it with --camera simulated")
    from streaming.camera.script import load_script

    load_script(path, simulator)  # ScriptError names the file and the field
    return str(path.resolve())


def session(
    ctx: typer.Context,
    camera: Annotated[
        str, typer.Option(help="instrument: count every scan the receivers deliver; simulated: play scans")
    ] = "instrument",
    scans: Annotated[int | None, typer.Option(min=0, help="stop after N scans (0: no limit)")] = None,
    duration: Annotated[
        float,
        typer.Option(min=0, help="seconds to count scans (0: the allocation's walltime, or until Ctrl-C)"),
    ] = 0.0,
    nodes: Annotated[int | None, typer.Option(min=1, help="node streamers (default: session.nodes)")] = None,
    backend: Annotated[str | None, typer.Option(help="local or nersc (default: session.backend)")] = None,
    scan: Annotated[str, typer.Option(help="simulated camera: scan size WIDTHxHEIGHT")] = "64x64",
    dose: Annotated[float | None, typer.Option(help="simulated camera: electrons per frame")] = None,
    frame_rate: Annotated[
        float, typer.Option(min=0, help="simulated camera: frames/s in real time (0: wait for the pipeline)")
    ] = 0.0,
    postprocess: Annotated[bool | None, typer.Option(help="py4DSTEM analysis of every scan")] = None,
    script: Annotated[
        Path | None,
        typer.Option(help="simulated camera: play this scan script (see `stemstream send --script`)"),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="any setting, SECTION.FIELD=VALUE (e.g. streaming.receivers='[\"tcp://0.0.0.0:6001\"]')",
        ),
    ] = None,
) -> None:
    """A microscope session from the terminal: book the nodes, print `ready:`, count every scan taken (of any
    shape, at any pace), verify and analyse each; ends after --scans, --duration, or Ctrl-C."""
    if camera not in ("instrument", "simulated"):
        raise typer.BadParameter(f"--camera must be instrument or simulated, not {camera!r}")
    if backend is not None and backend not in ("local", "nersc"):
        raise typer.BadParameter(f"--backend must be local or nersc, not {backend!r}")
    settings = command_settings(ctx, set_)
    s = settings.session
    width, height = parse_scan(scan)
    n_scans = scans if scans is not None else (3 if camera == "simulated" else 0)
    params = dict(
        camera=camera,
        n_scans=n_scans,
        duration=duration,
        scan_width=width,
        scan_height=height,
        dose=dose if dose is not None else settings.simulator.dose,
        nodes=nodes or s.nodes,
        backend=backend or s.backend,
        postprocess=s.postprocess if postprocess is None else postprocess,
        min_completeness=s.min_completeness,
        frame_rate=frame_rate,
        script=_script(script, camera, settings.simulator),
    )
    raise typer.Exit(run_in_terminal(settings, params, params["postprocess"]))


def demo(
    ctx: typer.Context,
    scans: Annotated[int, typer.Option(min=1, help="scans in the session")] = 3,
    scan: Annotated[str, typer.Option(help="scan size WIDTHxHEIGHT")] = "64x64",
    dose: Annotated[float | None, typer.Option(help="mean electrons per frame")] = None,
    nodes: Annotated[int, typer.Option(min=1, help="node streamers")] = 2,
    postprocess: Annotated[bool, typer.Option(help="py4DSTEM analysis of every scan")] = True,
    frame_rate: Annotated[
        float | None,
        typer.Option(
            min=1,
            help="camera frames/s in real time: what the pipeline cannot take is dropped and reported "
            "(default: the camera waits for the pipeline)",
        ),
    ] = None,
    script: Annotated[
        Path | None,
        typer.Option(
            help="play a microscopist's scan script instead (shapes, numbers, pauses; see send --script)"
        ),
    ] = None,
) -> None:
    """A complete local session on Prefect's embedded server: node streamers, aggregator, simulated camera,
    counting, verification and py4DSTEM analysis of every scan."""
    width, height = parse_scan(scan)
    settings = command_settings(ctx)
    what = f"the scans of {script}" if script else f"{scans} scan(s) of {width}x{height}"
    console.print(f"[bold]stemstream demo[/]: {what} through {nodes} node streamer(s)", soft_wrap=True)
    params = dict(
        camera="simulated",
        n_scans=scans,
        scan_width=width,
        scan_height=height,
        dose=dose if dose is not None else settings.simulator.dose,
        backend="local",
        nodes=nodes,
        postprocess=postprocess,
        min_completeness=settings.session.min_completeness,
        frame_rate=frame_rate or 0.0,
        script=_script(script, "simulated", settings.simulator),
    )
    raise typer.Exit(run_in_terminal(settings, params, postprocess))


def register(app: typer.Typer) -> None:
    """Add the session commands to the CLI, with the CLI's error handling."""
    for fn in (session, demo):
        app.command(name=fn.__name__)(user_errors(fn))
