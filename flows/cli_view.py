"""`stemstream view`: the live page at the microscope (streaming.view.server). Prints ``live: <URL>`` once the
page answers, then serves until SIGINT/SIGTERM. The URL carries the page's token only on a terminal; into a
log (a session's logs/view.log) it goes without, and a ``token:`` line says where the token is."""

from __future__ import annotations

import logging
import sys
import tempfile
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
    token_file: Annotated[
        Path | None, typer.Option(help="the page's token (mode 0600): read, or a random one written there")
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
    live = given(bind=bind, page_host=host, page_port=port, token_file=token_file)
    settings = command_settings(ctx, streaming={"live": live} if live else None)
    server = LiveServer(settings.streaming.live, server_curve(settings.streaming.curve), scan_dir)
    done = threading.Event()
    with stop_on_signals(done.set):
        try:
            server.start()
            print(f"live: {_page_line(server, sys.stdout.isatty())}", flush=True)
            print(f"snapshots: {server.ingest.address}", flush=True)
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


def register(app: typer.Typer) -> None:
    """Add `stemstream view` to the CLI, with the CLI's error handling."""
    app.command(name="view")(user_errors(view))
