"""`stemstream view`: the live page at the microscope (streaming.view.server). Prints ``live: <URL>`` once the
page answers, then serves until SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Annotated

import typer

from flows.cli_common import command_settings, user_errors
from flows.settings import given


def view(
    ctx: typer.Context,
    bind: Annotated[str | None, typer.Option(help="where nodes send snapshots (default live.bind)")] = None,
    host: Annotated[
        str | None, typer.Option(help="the page's address (default live.page_host; not loopback: a token)")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="the page's port (default live.page_port; 0: any free)")
    ] = None,
    scan_dir: Annotated[
        Path | None, typer.Option(help="where the session's scan files appear (their names on the page)")
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="stop after this many seconds")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Serve the live page: each scan's images building up as the nodes count it, and the session's scans.
    Nodes connect out to it (CURVE with the aggregator's keys when streaming.curve has them)."""
    from streaming.components import server_curve
    from streaming.signals import stop_on_signals
    from streaming.view.server import LiveServer

    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING)
    live = given(bind=bind, page_host=host, page_port=port)
    settings = command_settings(ctx, streaming={"live": live} if live else None)
    server = LiveServer(settings.streaming.live, server_curve(settings.streaming.curve), scan_dir)
    done = threading.Event()
    with stop_on_signals(done.set):
        try:
            server.start()
            print(f"live: {server.url}", flush=True)
            print(f"snapshots: {server.ingest.address}", flush=True)
            done.wait(timeout)
        finally:
            server.stop()


def register(app: typer.Typer) -> None:
    """Add `stemstream view` to the CLI, with the CLI's error handling."""
    app.command(name="view")(user_errors(view))
