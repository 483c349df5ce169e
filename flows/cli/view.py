"""`stemstream view`: the live page at the microscope (streaming.view.server). Prints ``live: <URL>`` once the
page answers, then serves until SIGINT/SIGTERM. The URL carries the page's token only on a terminal; into a
log (a session's logs/view.log) it goes without, and a ``token:`` line says where the token is.

`stemstream replay SCAN.h5`: the same page, fed from a written counted scan through the nodes' publisher
(streaming.live.replay) instead of by nodes; a file that is not a readable counted scan, or a bad --rate,
is one ``error:`` line and exit status 2."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from flows.cli.common import command_settings, print_error, user_errors
from flows.settings import given
from flows.timeline import child_started
from flows.timeline import emit as timing

# Options `view` and `replay` share, spelled once.
PageHost = Annotated[
    str | None,
    typer.Option("--host", help="the page's address (default live.page_host; not loopback: a token)"),
]
PagePort = Annotated[
    int | None, typer.Option("--port", help="the page's port (default live.page_port; 0: any free)")
]
TokenFile = Annotated[
    Path | None,
    typer.Option("--token-file", help="the page's token (mode 0600): read, or a random one written there"),
]
Verbose = Annotated[bool, typer.Option("--verbose", "-v")]


def view(
    ctx: typer.Context,
    bind: Annotated[str | None, typer.Option(help="where nodes send snapshots (default live.bind)")] = None,
    host: PageHost = None,
    port: PagePort = None,
    scan_dir: Annotated[
        Path | None, typer.Option(help="where the session's scan files appear (their names on the page)")
    ] = None,
    token_file: TokenFile = None,
    timeout: Annotated[float | None, typer.Option(help="stop after this many seconds")] = None,
    verbose: Verbose = False,
) -> None:
    """Serve the live page: each scan's images building up as the nodes count it, and the session's scans.
    Nodes connect out to it (CURVE with the aggregator's keys when streaming.curve has them)."""
    from streaming.components import server_curve
    from streaming.metrics.view import view_exported
    from streaming.signals import stop_on_signals
    from streaming.view.server import LiveServer

    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING)
    child_started()  # timing: lines in its log (flows/timeline.py), for the session's timeline
    live = given(bind=bind, page_host=host, page_port=port, token_file=token_file)
    settings = command_settings(ctx, streaming={"live": live} if live else None)
    server = LiveServer(settings.streaming.live, server_curve(settings.streaming.curve), scan_dir)
    done = threading.Event()
    with stop_on_signals(done.set):
        try:
            server.start()
            print(f"live: {_page_line(server, sys.stdout.isatty())}", flush=True)
            print(f"snapshots: {server.ingest.address}", flush=True)
            if server.aberration is not None and server.aberration.address:  # live.aberration
                print(f"aberration: {server.aberration.address}", flush=True)
            timing("page up")
            with view_exported(
                server, settings.streaming.metrics, lambda url: print(f"metrics: {url}", flush=True)
            ):
                server.run_until(done, timeout)  # a part that stops ends the process non-zero
        finally:
            server.stop()


def _page_line(server, terminal: bool) -> str:
    """The page's address for ``live:``: with its token on a terminal (the user's own eyes), else without,
    and where to find the token (a random one goes to a 0600 file: never into a log)."""
    if not server.token or terminal:
        return server.url
    if server.token_configured:
        return f"{server.address}\ntoken: live.token, as configured (open the page with ?token=<token>)"
    if server.token_file is None:  # a random token nobody could read: a file of its own, mode 0600
        fd, name = tempfile.mkstemp(prefix="stemstream-live-token-")
        with open(fd, "w") as f:
            f.write(server.token + "\n")
        server.token_file = Path(name)
    return f"{server.address}\ntoken: in {server.token_file} (open the page with ?token=<token>)"


def replay(
    ctx: typer.Context,
    scan: Annotated[
        Path,
        typer.Argument(
            metavar="SCAN.h5", help="a counted scan (HDF5 in stempy's layout)", show_default=False
        ),
    ],
    rate: Annotated[str, typer.Option(metavar="FPS", help="frames per second (0: as fast as it goes)")] = "0",
    exit_when_done: Annotated[
        bool, typer.Option("--exit-when-done", help="exit 0 once the page has the final images")
    ] = False,
    host: PageHost = None,
    port: PagePort = None,
    token_file: TokenFile = None,
    verbose: Verbose = False,
) -> None:
    """Replay a written counted scan through the live images and page (no camera, no nodes), in scan order,
    then serve the page until Ctrl-C. Prints live: <URL>, what the file lacks, progress and a summary."""
    from counting.sparse import SparseFormatError
    from streaming.live import replay as rp
    from streaming.view.server import LiveServer

    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING)
    fps = _frame_rate(rate)
    live = given(page_host=host, page_port=port, token_file=token_file)
    settings = command_settings(ctx, streaming={"live": live} if live else None).streaming.live
    try:
        source = rp.ScanSource(scan)
    except SparseFormatError as exc:
        _usage_error(str(exc))
    with contextlib.closing(source):
        # The intake takes only this process's own snapshots: any free loopback port, never live.bind's.
        server = LiveServer(settings.model_copy(update={"bind": "tcp://127.0.0.1:*"}))
        try:
            _serve_replay(server, source, settings, fps, exit_when_done)
        except SparseFormatError as exc:  # a part of the file unreadable, found while replaying it
            _usage_error(str(exc))
        finally:
            server.stop()


def _serve_replay(server, source, settings, fps: float, exit_when_done: bool) -> None:
    """Start the page, replay the file into it, then serve it until Ctrl-C (or not: exit_when_done)."""
    from streaming.live import replay as rp
    from streaming.signals import stop_on_signals

    done, key = threading.Event(), rp.replay_key(source)
    with stop_on_signals(done.set):
        server.start()
        print(f"live: {_page_line(server, sys.stdout.isatty())}", flush=True)
        print(_file_line(source), flush=True)
        with rp.publisher(settings, server.ingest.address) as pub:
            shown = rp.replay(
                source,
                [pub],
                key,
                rate=fps,
                stop=done,
                progress=lambda d: _progress(server, key, source, d),
                first=settings.estimate_frames,
            )
        if shown.stopped:
            print(f"replay: stopped at {shown.frames} of {shown.total_frames} frames", flush=True)
            return
        _wait_final(server, key, str(source.path))
        print(_summary(shown), flush=True)
        if not exit_when_done:
            server.run_until(done)


def _frame_rate(text: str) -> float:
    """--rate as frames/s >= 0, else one error line and exit 2."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        _usage_error(f"--rate must be frames per second, 0 or more (0: as fast as it goes), got {text!r}")
    return value


def _usage_error(message: str) -> NoReturn:
    print_error(message)
    raise typer.Exit(2)


def _file_line(source) -> str:
    """What the file holds and lacks: replayed as it is, reported here."""
    r = source.report()
    lacks = (
        f"{r['positions_without_frame']} positions without a frame, {r['incomplete_frames']} incomplete "
        f"frames, {r['sectors_lost']} sectors lost"
        if r["sectors_lost"]
        else "every frame complete"
    )
    return f"scan: {source.path.name}: {source.width}x{source.height}, {r['frames']} frames; {lacks}"


def _progress(server, key: str, source, done) -> None:
    server.state.set_file(key, str(source.path))  # once the view lists the scan: its file's name
    share = 100 * done.frames / done.total_frames if done.total_frames else 100.0
    print(
        f"replay: {done.frames}/{done.total_frames} frames ({share:.0f} %), {done.rate:.0f} frames/s",
        flush=True,
    )


def _wait_final(server, key: str, path: str, timeout: float = 15.0) -> None:
    """Until the view holds the replay's final snapshot (what the page serves next is final)."""
    from streaming.view.server import LiveViewFailed

    deadline = time.monotonic() + timeout
    while (scan := server.state.scan(key)) is None or not scan.done:
        if time.monotonic() > deadline:
            raise LiveViewFailed("replay: the live view did not receive the final images")
        time.sleep(0.02)
    server.state.set_file(key, path)


def _summary(done) -> str:
    """The replay's last line: frames, events, time, and events the masks left out."""
    elapsed = time.monotonic() - done.started
    line = (
        f"replayed: {done.frames} frames, {done.events} events in {elapsed:.2f} s ({done.rate:.0f} frames/s)"
    )
    if done.stray_events:
        line += f"; {done.stray_events} events in slots the sector masks mark empty, not replayed"
    return line


def register(app: typer.Typer) -> None:
    """Add `stemstream view` and `stemstream replay` to the CLI, with the CLI's error handling."""
    app.command(name="view")(user_errors(view))
    app.command(name="replay")(user_errors(replay))
