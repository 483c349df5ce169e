"""`stemstream session` and `stemstream demo`: the session flow from a terminal (flows/cli/terminal.py: the
embedded Prefect server, the `ready:` and scan lines, the summary). Exit status 0 when every scan passed
verification. Both mark the session's timeline (flows/timeline.py), write it as timeline.json into the
session's logs at exit and, with --timings, print it."""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from flows.cli.common import command_settings, console, parse_scan, user_errors
from flows.cli.terminal import embedded_prefect, run_in_terminal
from flows.session_prefect import EmbeddedServer, adopt, early_server
from flows.settings import Settings, SimulatorSettings
from flows.timeline import (
    COMMAND,
    EXIT,
    PREFECT_IMPORTED,
    PREFECT_STARTED,
    PREFECT_UP,
    SETTINGS,
    Timeline,
    cli_timeline,
)
from flows.timeline_phases import CLI_DONE, marks_table, phases, phases_table

Timings = Annotated[
    bool,
    typer.Option(
        "--timings",
        help="print where the session's seconds went (every process's marks, then the phases) at the end; "
        "it is always written to the session's logs/timeline.json",
    ),
]


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
    timings: Timings = False,
) -> None:
    """A microscope session from the terminal: book the nodes, print `ready:`, count every scan taken (of any
    shape, at any pace), verify and analyse each; ends after --scans, --duration, or Ctrl-C."""
    timeline = cli_timeline()
    timeline.mark(COMMAND, "session", process="cli")
    if camera not in ("instrument", "simulated"):
        raise typer.BadParameter(f"--camera must be instrument or simulated, not {camera!r}")
    if backend is not None and backend not in ("local", "nersc"):
        raise typer.BadParameter(f"--backend must be local or nersc, not {backend!r}")
    settings = command_settings(ctx, set_)
    timeline.mark(SETTINGS, process="cli")
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
    raise typer.Exit(_run_timed(timeline, settings, params, timings))


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
    timings: Timings = False,
) -> None:
    """A complete local session on Prefect's embedded server: node streamers, aggregator, simulated camera,
    counting, verification and py4DSTEM analysis of every scan."""
    timeline = cli_timeline()
    timeline.mark(COMMAND, "demo", process="cli")
    width, height = parse_scan(scan)
    settings = command_settings(ctx)
    timeline.mark(SETTINGS, process="cli")
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
    raise typer.Exit(_run_timed(timeline, settings, params, timings))


def _run_timed(timeline: Timeline, settings: Settings, params: dict, show: bool) -> int:
    """run_in_terminal, its Prefect server started first (before Prefect is imported, where Prefect would
    start its own: flows/session_prefect.py); the timeline is finished at this process's exit, after
    Prefect's server has stopped (an exit hook registered before the server's)."""
    atexit.register(_finish_timeline, timeline, show)
    chose_home = "PREFECT_HOME" not in os.environ
    embedded_prefect(settings.output_dir)
    server = early_server(chose_home)
    if server is not None:
        atexit.register(server.stop)  # runs before _finish_timeline (exit hooks run last-registered first)
        timeline.mark(PREFECT_STARTED, process="cli")
    if _prefect_up(timeline, server, _ahead(settings, params)):
        timeline.mark(PREFECT_UP, process="cli")
    try:
        return run_in_terminal(settings, params, params["postprocess"])
    finally:
        timeline.mark(CLI_DONE, process="cli")


def _ahead(settings: Settings, params: dict) -> Callable[[], None]:
    """What the flow will compute first and the CLI can compute while Prefect's server starts: the
    simulated camera's dark reference (flows/session_setup.py keeps it), where the session will use it."""
    from flows.session_setup import simulated_dark_frame

    def work() -> None:
        if params["camera"] == "simulated" and settings.counting.dark is None:
            simulated_dark_frame(settings.simulator.seed)

    return work


def _prefect_up(timeline: Timeline, server: EmbeddedServer | None, ahead: Callable[[], None]) -> bool:
    """The embedded Prefect server up: the CLI's own (the flow imported and ``ahead`` run while it
    starts), else started now as the flow's first call would (nothing when a server is configured but to
    ask it); False if it did not answer (the flow then says why)."""
    try:
        from prefect.client.orchestration import get_client

        timeline.mark(PREFECT_IMPORTED, process="cli")
        if server is not None:
            import flows.session  # noqa: F401  the flow's imports, while the server starts

            worker = threading.Thread(target=_quietly, args=(ahead,), name="session-ahead", daemon=True)
            worker.start()
            adopted = adopt(server)
            worker.join()  # the flow would otherwise compute the same again
            if adopted:
                return True
        with get_client(sync_client=True) as client:
            return client.api_healthcheck() is None
    except Exception:  # a measurement must not fail the session: the flow meets the same error and says it
        return False


def _quietly(work: Callable[[], None]) -> None:
    """Work done ahead is an optimisation: its failure costs nothing (the flow does it and says why)."""
    with contextlib.suppress(ValueError, MemoryError):
        work()


def _finish_timeline(timeline: Timeline, show: bool) -> None:
    """At exit: the last mark, timeline.json into the session's logs, and the tables with --timings; then
    the heap frozen, so that the interpreter's shutdown does not walk it."""
    timeline.mark(EXIT, process="cli")
    try:
        path = timeline.write()
    except OSError as exc:
        path = None
        console.print(f"could not write the session's timeline: {exc}", highlight=False, soft_wrap=True)
    if show:
        console.print(marks_table(timeline))
        console.print(phases_table(phases(timeline)))
        if path is not None:
            console.print(f"timeline: {path}", highlight=False, soft_wrap=True)
    # After this hook come the ones registered before it (logging's flushes its handlers), then the
    # interpreter's final collection of a heap of several hundred thousand objects (about 1.4 s here):
    # frozen objects are skipped by it; the standard streams are flushed all the same.
    gc.freeze()


def register(app: typer.Typer) -> None:
    """Add the session commands to the CLI, with the CLI's error handling."""
    for fn in (session, demo):
        app.command(name=fn.__name__)(user_errors(fn))
