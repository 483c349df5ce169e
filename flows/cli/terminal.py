"""A session flow run from a terminal (`stemstream session`, `demo`, `dark --session`): on Prefect's embedded
server unless one is configured, with a watcher that prints what a microscopist needs: one line starting with
``ready:`` (the receiver addresses) as soon as the first scan may start, then a line per scan as its file is
written; the summary table at the end.

The settings reach the flow by one route: the command builds them once, they are written to a fresh settings
file under the output directory, and the flow gets that file's path (its ``settings_file`` parameter).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from rich.table import Table

from flows.cli.common import console
from flows.settings import Settings, write_settings_file
from tasks.acquisition.live import live_url
from tasks.launch.errors import SessionFailed
from tasks.launch.state import SessionState


class SessionWatcher(threading.Thread):
    """Follows the newest session directory the flow creates and prints its progress lines."""

    def __init__(self, sessions: Path, since: float, echo: Callable[[str], None]) -> None:
        super().__init__(name="session-watcher", daemon=True)
        self.sessions, self.since, self.echo = sessions, since, echo
        self.stop_event = threading.Event()
        self.session_dir: Path | None = None
        self._ready = False
        self._live = False
        self._metrics_looks = 300  # the logs are read for ``metrics:`` lines at most this often (30 s)
        self._printed: set[str] = set()

    def run(self) -> None:
        """Poll until stopped, then once more."""
        while not self.stop_event.wait(0.1):
            self.poll()
        self.poll()  # what arrived in the last moments

    def poll(self) -> None:
        """One look: the session's state file, then its new stop records."""
        if self.session_dir is None:
            found = [d for d in self.sessions.glob("*") if d.is_dir() and d.stat().st_mtime >= self.since]
            if not found:
                return
            self.session_dir = max(found, key=lambda d: d.stat().st_mtime).resolve()
        try:
            state = SessionState.load(self.session_dir)
        except (OSError, ValueError, TypeError):
            return
        if not state.path.exists():
            return
        if not self._live and (url := live_url(self.session_dir, with_token=True)):  # the user's terminal
            self._live = True
            self.echo(f"live: {url}")
        if state.ready and not self._ready:
            self._ready = True
            self.echo(f"ready: receivers {' '.join(state.receivers)}")
        if self._ready and self._metrics_looks > 0:
            self._metrics_looks -= 1
            if urls := metrics_urls(self.session_dir / "logs"):
                self._metrics_looks = 0
                self.echo(f"metrics: {' '.join(urls)}")
        scans = Path(state.scans_dir or self.session_dir / "scans")
        for path in sorted(scans.glob("*.json")) if self._ready else []:
            if path.name in self._printed or path.stat().st_mtime < self.since:
                continue
            self._printed.add(path.name)
            self.echo(scan_line(path))


def metrics_urls(logs: Path) -> list[str]:
    """Where Prometheus scrapes the session's processes, from their ``metrics:`` lines (streaming.metrics);
    empty while the live view shows its page but not yet its metrics (it prints them just after)."""
    urls, view_waits = [], False
    for log in sorted(logs.glob("*.log")):
        try:
            lines = log.read_text(errors="replace").splitlines()
        except OSError:
            continue
        found = [line.removeprefix("metrics: ").strip() for line in lines if line.startswith("metrics: ")]
        urls += found
        view_waits = view_waits or (not found and any(line.startswith("live: ") for line in lines))
    return [] if view_waits else urls


def scan_line(record_file: Path) -> str:
    """One line for a written scan, from its stop record."""
    from streaming.protocol.record import ScanRecord

    try:
        r = ScanRecord.load(record_file)
    except (OSError, ValueError, KeyError, TypeError):
        return f"scan: unreadable stop record {record_file.name}"
    where = Path(r.path).name if r.path else f"not written: {r.error}"
    return (
        f"scan {r.scan_number} (id {r.scan_id:05d}): {r.scan_width}x{r.scan_height}, {r.status}, "
        f"{100 * r.completeness:.2f} % complete, {r.frames_written} frames, {where}"
    )


def run_settings_file(settings: Settings) -> Path:
    """Write the command's settings to a fresh file under the output directory, for the flow to load."""
    folder = settings.output_dir / ".settings"
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%f")
    path = folder / f"{stamp}-{os.getpid()}.json"
    n = 1
    while path.exists():  # never overwrite: another command's flow may still read its file
        path, n = folder / f"{stamp}-{os.getpid()}-{n}.json", n + 1
    return write_settings_file(settings, path)


# The exit status of a session that otherwise succeeded but whose end stopped a scan mid-scan.
STOPPED_MID_SCAN = 3


def run_in_terminal(settings: Settings, params: dict, postprocess: bool) -> int:
    """Run the session flow with the watcher; print the summary and where things are; the exit status."""
    embedded_prefect(settings.output_dir)
    from flows.session import session

    settings_file = run_settings_file(settings)
    t0 = time.time()
    watcher = SessionWatcher(
        settings.output_dir / "sessions",
        t0 - 1,
        lambda line: console.print(line, highlight=False, soft_wrap=True),
    )
    watcher.start()
    try:
        state = session(**params, settings_file=str(settings_file), return_state=True)
    finally:
        watcher.stop_event.set()
        watcher.join(5)
    results = state.result(raise_on_failure=False)  # failed sessions carry their scan results too
    if isinstance(results, list) and results:
        print_summary(results)
    if watcher.session_dir is not None:
        _print_where(watcher.session_dir, postprocess)
    elapsed = time.time() - t0
    # verified None: a scan the session's end stopped mid-scan (kept incomplete): exit STOPPED_MID_SCAN
    partial = [r for r in results if r.verified is None] if isinstance(results, list) else []
    if state.is_completed() or (
        state.is_cancelled()
        and isinstance(results, list)
        and all(r.verified for r in results if r not in partial)
    ):
        console.print(f"[green]session {state.name.lower()} in {elapsed:.1f} s: {state.message}[/]")
        return STOPPED_MID_SCAN if partial else 0
    raise SessionFailed(f"the session failed: {state.message}")


def _print_where(session_dir: Path, postprocess: bool) -> None:
    """Where the session's files are: scans, images, logs (paths whole, on one line each)."""
    state = SessionState.load(session_dir)
    for line in (
        f"HDF5 files: {state.scans_dir or session_dir / 'scans'}",
        *([f"py4DSTEM images (PNG): {session_dir / 'analysis'}"] if postprocess else []),
        f"logs: {session_dir / 'logs'}",
    ):
        console.print(line, highlight=False, soft_wrap=True)


def embedded_prefect(output_dir: Path) -> None:
    """Unless a Prefect server is configured: keep the embedded one's database beside the output, quiet
    and offline. Prefect reads its own settings from the environment only, so these are set there, before
    Prefect loads; the one place the CLI writes the environment."""
    os.environ.setdefault("PREFECT_HOME", str((output_dir / ".prefect").resolve()))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


def print_summary(results: list) -> None:
    """The session's summary table in the terminal (labels from flows.summary)."""
    from flows.summary import summary_row, terminal_columns

    shown = terminal_columns(results)
    table = Table(title="session summary")
    for key in shown:
        table.add_column(key, justify="right")
    for result in results:
        row = summary_row(result)
        table.add_row(*(str(row[k]) for k in shown))
    console.print(table)
