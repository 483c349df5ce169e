"""`stemstream session` and `stemstream demo`: the session flow from a terminal, on Prefect's embedded
server unless one is configured. While the flow runs, a watcher prints what a microscopist needs: one
line starting with ``ready:`` (the receiver addresses) as soon as the first scan may start, then a line per
scan as its file is written; the summary table at the end. Exit status 0 when every scan passed
verification."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from flows.settings import ENV_PREFIX, load_settings
from tasks.acquisition.live import live_url


class SessionWatcher(threading.Thread):
    """Follows the newest session directory the flow creates and prints its progress lines."""

    def __init__(self, sessions: Path, since: float, echo: Any) -> None:
        super().__init__(name="session-watcher", daemon=True)
        self.sessions, self.since, self.echo = sessions, since, echo
        self.stop_event = threading.Event()
        self.session_dir: Path | None = None
        self._ready = False
        self._live = False
        self._printed: set[str] = set()

    def run(self) -> None:
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
            state = json.loads((self.session_dir / "session.json").read_text())
        except (OSError, ValueError):
            return
        if not self._live and (url := live_url(self.session_dir)):
            self._live = True
            self.echo(f"live: {url}")
        if state.get("ready") and not self._ready:
            self._ready = True
            self.echo(f"ready: receivers {' '.join(state.get('receivers', []))}")
        scans = Path(state.get("scans_dir", self.session_dir / "scans"))
        for path in sorted(scans.glob("*.json")) if self._ready else []:
            if path.name in self._printed or path.stat().st_mtime < self.since:
                continue
            self._printed.add(path.name)
            self.echo(scan_line(path))


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


def run_in_terminal(params: dict, postprocess: bool) -> int:
    """Run the session flow with the watcher; print the summary and where things are; the exit status."""
    from flows.cli import _embedded_prefect, console, print_summary

    settings = load_settings()
    _embedded_prefect(settings.output_dir)
    from flows.session import session

    t0 = time.time()
    watcher = SessionWatcher(
        settings.output_dir / "sessions",
        t0 - 1,
        lambda line: console.print(line, highlight=False, soft_wrap=True),
    )
    watcher.start()
    try:
        state = session(**params, return_state=True)
    finally:
        watcher.stop_event.set()
        watcher.join(5)
    results = state.result(raise_on_failure=False)  # failed sessions carry their scan results too
    if isinstance(results, list) and results:
        print_summary(results)
    if watcher.session_dir is not None:
        info = json.loads((watcher.session_dir / "session.json").read_text())
        for line in (
            f"HDF5 files: {info.get('scans_dir', watcher.session_dir / 'scans')}",
            *([f"py4DSTEM images (PNG): {watcher.session_dir / 'analysis'}"] if postprocess else []),
            f"logs: {watcher.session_dir / 'logs'}",
        ):
            console.print(line, highlight=False, soft_wrap=True)  # paths whole, on one line
    elapsed = time.time() - t0
    if state.is_completed() or (
        state.is_cancelled() and isinstance(results, list) and all(r.verified for r in results)
    ):
        console.print(f"[green]session {state.name.lower()} in {elapsed:.1f} s: {state.message}[/]")
        return 0
    raise RuntimeError(f"the session failed: {state.message}")


def _scan_size(text: str) -> tuple[int, int]:
    from flows.cli import _parse_scan

    return _parse_scan(text)


def _script(path: Path | None, camera: str) -> str:
    """The script's absolute path for the flow ("" for none), checked now: one clear error, no session."""
    if path is None:
        return ""
    if camera != "simulated":
        raise typer.BadParameter("--script plays the simulated camera: use it with --camera simulated")
    from flows.settings import load_settings as _load
    from streaming.camera.script import load_script

    load_script(path, _load().simulator)  # ScriptError names the file and the field
    return str(path.resolve())


def apply_settings(assignments: list[str] | None) -> None:
    """--set SECTION.FIELD=VALUE: any setting, for this command (as STEMSTREAM_SECTION__FIELD would)."""
    for item in assignments or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"--set wants SECTION.FIELD=VALUE, got {item!r}")
        os.environ[ENV_PREFIX + key.strip().upper().replace(".", "__")] = value
    if assignments:
        load_settings()  # a wrong value is reported now, naming the setting


def session(
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
    apply_settings(set_)
    settings = load_settings()
    s = settings.session
    width, height = _scan_size(scan)
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
        script=_script(script, camera),
    )
    raise typer.Exit(run_in_terminal(params, params["postprocess"]))


def demo(
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
    from flows.cli import console

    width, height = _scan_size(scan)
    settings = load_settings()
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
        script=_script(script, "simulated"),
    )
    raise typer.Exit(run_in_terminal(params, postprocess))


def register(app: typer.Typer, wrap: Any) -> None:
    """Add the session commands to the CLI, with the CLI's error handling."""
    for fn in (session, demo):
        app.command(name=fn.__name__)(wrap(fn))
