"""`stemstream scans` (list and search, show, note, rebuild) and `stemstream analyse`: the scan catalogue
from a terminal. Times are shown, and dates given, in the facility's time zone (streaming.timezone).
Every bad input (unknown id, no catalogue, an unreachable database, a bad filter) is one `error:` line."""

from __future__ import annotations

import getpass
import json
import re
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from zoneinfo import ZoneInfo

import typer
from rich import box
from rich.table import Table

from catalogue import open_catalogue
from counting.phase.summary import summary_lines
from flows.cli.common import command_settings, console, err_console, user_errors
from flows.cli.text import plain
from flows.settings import Settings

if TYPE_CHECKING:  # the catalogue's types load SQLAlchemy and msgpack: only when a command runs
    from catalogue import Catalogue, ScanQuery, ScanView

scans_app = typer.Typer(
    help="The scan catalogue: list and search scans, show one, add a note, rebuild from stop records.",
    no_args_is_help=False,
    invoke_without_command=True,
)

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def _open(settings: Settings, create: bool = False) -> Catalogue:
    return open_catalogue(settings.catalogue, settings.output_dir, create=create)


def parse_when(text: str, tz: str, end_of_day: bool = False) -> datetime:
    """A date (2026-12-06), a date and time (2026-12-06T14:30 or '2026-12-06 14:30') in the facility's
    time zone, or an age (90m, 6h, 2d, 1w); as naive UTC."""
    text = text.strip()
    m = _RELATIVE.match(text.lower())
    if m:
        return (datetime.now(UTC) - timedelta(**{_UNITS[m.group(2)]: float(m.group(1))})).replace(tzinfo=None)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"not a date: {text!r} (give 2026-12-06, 2026-12-06T14:30, or an age like 6h, 2d)"
        ) from None
    if end_of_day and len(text) == 10:  # a whole day: up to its end
        when += timedelta(days=1) - timedelta(microseconds=1)
    if when.tzinfo is None:
        when = when.replace(tzinfo=ZoneInfo(tz))
    return when.astimezone(UTC).replace(tzinfo=None)


def parse_shape(text: str) -> tuple[int, int]:
    """WIDTHxHEIGHT."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"shape must look like 64x64, got {text!r}") from None
    return w, h


def _local(when: datetime | None, tz: str, seconds: bool = False) -> str:
    if when is None:
        return ""
    fmt = "%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M"
    return when.replace(tzinfo=UTC).astimezone(ZoneInfo(tz)).strftime(fmt)


def _verified(v: bool | None) -> str:
    return "yes" if v else ("NO" if v is False else "?")


def _short_note(scan: ScanView) -> str:
    if not scan.notes:
        return ""
    text = scan.notes[-1].text
    more = f" (+{len(scan.notes) - 1})" if len(scan.notes) > 1 else ""
    return (text[:40] + "…" if len(text) > 40 else text) + more


@scans_app.callback()
@user_errors
def scans(
    ctx: typer.Context,
    session: Annotated[
        str | None, typer.Option(help="a session: its flow run id (or a prefix) or number")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="started at or after: 2026-12-06, '2026-12-06 14:00', 6h, 2d")
    ] = None,
    until: Annotated[str | None, typer.Option(help="started at or before (a date: up to its end)")] = None,
    shape: Annotated[str | None, typer.Option(help="scan shape WIDTHxHEIGHT, e.g. 64x64")] = None,
    dose_min: Annotated[float | None, typer.Option(help="counted electrons per frame, at least")] = None,
    dose_max: Annotated[float | None, typer.Option(help="counted electrons per frame, at most")] = None,
    min_completeness: Annotated[float | None, typer.Option(help="sector completeness in %, at least")] = None,
    max_completeness: Annotated[float | None, typer.Option(help="sector completeness in %, at most")] = None,
    status: Annotated[str | None, typer.Option(help="complete, incomplete or failed")] = None,
    note: Annotated[str | None, typer.Option(help="text in one of its notes (any case)")] = None,
    scan_number: Annotated[int | None, typer.Option("--scan", help="the detector's scan number")] = None,
    limit: Annotated[int, typer.Option(min=1, help="at most this many, newest first")] = 200,
    json_out: Annotated[bool, typer.Option("--json", help="one JSON object per scan, for scripts")] = False,
) -> None:
    """List the catalogue's scans, newest first, filtered by session, date, shape, dose, completeness, status
    or note text; `scans show ID`, `scans note ID TEXT`, `scans rebuild DIR` for more."""
    if ctx.invoked_subcommand is not None:
        return
    from catalogue import ScanQuery
    from streaming.protocol.record import ScanStatus

    settings = command_settings(ctx)
    tz = settings.streaming.timezone
    statuses = [s.value for s in ScanStatus]
    if status is not None and status not in statuses:
        raise ValueError(f"--status must be {', '.join(statuses[:-1])} or {statuses[-1]}, not {status!r}")
    width, height = parse_shape(shape) if shape else (None, None)
    query = ScanQuery(
        session=session,
        since=parse_when(since, tz) if since else None,
        until=parse_when(until, tz, end_of_day=True) if until else None,
        width=width,
        height=height,
        dose_min=dose_min,
        dose_max=dose_max,
        completeness_min=min_completeness / 100 if min_completeness is not None else None,
        completeness_max=max_completeness / 100 if max_completeness is not None else None,
        status=status,
        note=note,
        scan_number=scan_number,
        limit=limit,
    )
    _list(settings, query, json_out)


def _list(settings: Settings, query: ScanQuery, json_out: bool) -> None:
    """Print the scans the query finds: a table, or one JSON object per scan."""
    with _open(settings) as cat:
        found = cat.search(query)
        where = cat.where
    if json_out:
        for scan in found:
            typer.echo(json.dumps(scan_json(scan), default=str))
        return
    # One line per scan, the note cut to what the terminal leaves; the file name carries the start time
    # (facility time zone); `scans show` and --json give everything.
    title = f"{len(found)} scan(s) in {where}"
    table = Table(
        title=plain(title), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True
    )
    rows = [
        [
            s.uid[:8],
            s.file_name or "",
            f"{s.session_number:05d}" if s.session_number is not None else "",
            str(s.scan_number),
            s.shape,
            s.status,
            f"{100 * s.completeness:.2f}",
            f"{s.electrons_per_frame:.1f}",
            _verified(s.verified),
            str(len(s.analyses)),
        ]
        for s in found
    ]
    for k, name in enumerate(_COLUMNS):
        width = max([len(name), *(len(row[k]) for row in rows)])
        left = name in ("id", "file", "status", "verified")
        table.add_column(name, justify="left" if left else "right", no_wrap=True, min_width=width)
    table.add_column("note", no_wrap=True, overflow="ellipsis", max_width=40)
    for row, s in zip(rows, found):
        table.add_row(*map(plain, row), plain(_short_note(s)))
    console.print(table, soft_wrap=True)


_COLUMNS = (
    "id",
    "file",
    "session",
    "scan",
    "shape",
    "status",
    "complete %",
    "e-/frame",
    "verified",
    "analyses",
)


def scan_json(scan: ScanView) -> dict:
    """A scan as JSON (times in UTC, ISO)."""
    data = asdict(scan)
    data["shape"] = scan.shape
    return data


@scans_app.command()
@user_errors
def show(
    ctx: typer.Context,
    scan: Annotated[str, typer.Argument(help="the scan's uid (or its first characters), file name or id")],
    json_out: Annotated[bool, typer.Option("--json", help="everything as JSON")] = False,
) -> None:
    """Everything the catalogue holds about one scan: file, session, times, counting, dark, microscope
    metadata, notes and every analysis."""
    settings = command_settings(ctx)
    tz = settings.streaming.timezone
    with _open(settings) as cat:
        s = cat.find_scan(scan)
    if json_out:
        typer.echo(json.dumps(scan_json(s), default=str, indent=2))
        return
    t = Table(title=plain(f"scan {s.uid}"), show_header=False, title_justify="left")
    bg, xr = s.thresholds
    rows = [
        ("file", s.path or f"not written: {s.error}"),
        (
            "session",
            f"{s.session} ({s.session_number:05d})" if s.session_number is not None else s.session or "",
        ),
        ("scan number / id", f"{s.scan_number} / {s.scan_id:05d}"),
        ("shape", s.shape),
        ("started / ended", f"{_local(s.started_at, tz, True)} / {_local(s.ended_at, tz, True)} ({tz})"),
        ("status", f"{s.status}, verified: {_verified(s.verified)}"),
        ("frames", f"{s.frames_written} written, {s.complete_frames} complete of {s.expected_frames}"),
        ("completeness", f"{100 * s.completeness:.3f} %"),
        ("dose", f"{s.electrons_per_frame:.1f} counted electrons per frame ({s.events} events)"),
        ("thresholds (ADU)", f"background {_num(bg)}, x-ray {_num(xr)}" if bg is not None else "none"),
        ("dark reference", s.dark or s.dark_reference or "unknown"),
        ("sha256", s.sha256 or ""),
        (
            "microscope",
            s.microscope_file or (f"none: {s.microscope_reason}" if s.microscope_reason else "none"),
        ),
    ]
    rows += [(f"  {k}", _num(v)) for k, v in sorted(s.microscope_metadata.items())[:20]]
    rows += [("note", f"{_local(n.created_at, tz)} {n.author or ''}: {n.text}") for n in s.notes]
    for a in s.analyses:
        failed = f", FAILED: {a.error}" if a.error else ""
        rows.append((f"analysis {a.id}", f"{_local(a.created_at, tz, True)}, {a.kind}{failed}"))
        rows += [(f"  {k}", v) for k, v in _analysis_lines(a.params, a.results, a.images)]
    for key, value in rows:
        t.add_row(plain(key), plain(value))
    console.print(t, soft_wrap=True)


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else "" if v is None else str(v)


_RESULT_KEYS = ("probe_radius_px", "q_pixel_mrad", "r_pixel_angstrom", "positions_filled")


def _analysis_lines(
    params: dict, results: dict, images: dict, with_params: bool = True
) -> list[tuple[str, str]]:
    """An analysis's parameters, calibration, results and images as (label, text) lines."""
    lines = []
    changed = params.get("changed") or {}
    if changed and with_params:
        lines.append(("parameters changed", ", ".join(f"{k}={v}" for k, v in changed.items())))
    cal = results.get("calibration")
    if isinstance(cal, dict) and cal.get("status"):
        semiangle = cal.get("convergence_semiangle_mrad")
        facts = [f"step {_num(cal['step_angstrom'])} Å" if cal.get("step_angstrom") else ""]
        facts += [f"{_num(semiangle)} mrad" if semiangle else ""]
        lines.append(("calibration", ", ".join([str(cal["status"]), *filter(None, facts)])))
    for key in _RESULT_KEYS:
        if results.get(key) is not None:
            lines.append((key, _num(results[key])))
    lines += summary_lines(results.get("phase"))  # the stream's phase fit (analysis kind stream-phase)
    fitted = results.get("fitted")
    if isinstance(fitted, dict) and fitted:
        lines.append(("fitted", ", ".join(f"{k} {_num(v)}" for k, v in fitted.items() if v is not None)))
    for step in ("dpc", "parallax"):
        info = results.get(step)
        if isinstance(info, dict):
            shown = {k: v for k, v in info.items() if isinstance(v, int | float | str) and v is not None}
            if shown:
                lines.append((step, ", ".join(f"{k} {_num(v)}" for k, v in list(shown.items())[:6])))
    if images:
        first = next(iter(images.values()))
        lines.append(("images", f"{', '.join(images)} in {Path(first).parent}"))
    if results.get("warnings"):
        lines.append(("warnings", str(len(results["warnings"]))))
    return lines


@scans_app.command()
@user_errors
def note(
    ctx: typer.Context,
    scan: Annotated[str, typer.Argument(help="the scan's uid (or its first characters), file name or id")],
    text: Annotated[list[str], typer.Argument(help="the note (several words need no quotes)")],
    author: Annotated[str | None, typer.Option(help="who writes it (default: your user name)")] = None,
) -> None:
    """Add a note to a scan (kept beside earlier notes; find it again with `scans --note WORD`)."""
    settings = command_settings(ctx)
    with _open(settings) as cat:
        found = cat.find_scan(scan)
        cat.add_note(found.uid, " ".join(text), author or _user())
        count = len(cat.find_scan(found.uid).notes)
    console.print(
        f"note added to scan {found.uid[:8]} ({found.file_name}); it has {count} note(s)",
        highlight=False,
        soft_wrap=True,
    )


def _user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


@scans_app.command()
@user_errors
def rebuild(
    ctx: typer.Context,
    directory: Annotated[
        Path, typer.Argument(help="a directory of scans or sessions (searched recursively)")
    ],
) -> None:
    """Fill the catalogue from stop records, session state files and what a session could not record
    (idempotent: a scan already recorded is updated, never duplicated)."""
    from catalogue.rebuild import rebuild as rebuild_from

    settings = command_settings(ctx)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    with _open(settings, create=True) as cat:
        report = rebuild_from(cat, directory)
        where = cat.where
    for line in report.unreadable:
        err_console.print(f"[yellow]warning:[/] unreadable: {line}", highlight=False, soft_wrap=True)
    console.print(
        f"rebuilt {where} from {directory}: {report.scans} scan(s) ({report.new_scans} new), "
        f"{report.sessions} session(s), {report.pending_entries} pending entr(ies) replayed",
        highlight=False,
        soft_wrap=True,
    )


def analyse(
    ctx: typer.Context,
    scan: Annotated[str, typer.Argument(help="the scan's uid (or its first characters), file name or id")],
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param", help="an analysis parameter NAME=VALUE, e.g. dpc_q_highpass=0.05 (repeatable)"
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="any setting, SECTION.FIELD=VALUE, e.g. analysis.keep_flyback=true"),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="where the images go (default: <output_dir>/reanalysis/...)")
    ] = None,
) -> None:
    """Run the analysis of a stored scan again with other parameters; the result is recorded in the
    catalogue beside the earlier ones (see `scans show ID`)."""
    from tasks.analysis.reanalyse import parse_params, reanalyse

    settings = command_settings(ctx, set_)
    params = parse_params(param)
    with _open(settings) as cat:
        done = reanalyse(cat, scan, settings.analysis, params, out or settings.output_dir)
        count = len(cat.find_scan(done.scan.uid).analyses)
    console.print(
        f"analysed scan {done.scan.uid[:8]} ({done.scan.file_name}) in {done.seconds:.1f} s: analysis "
        f"{done.analysis_id} recorded, {count} analys{'i' if count == 1 else 'e'}s of this scan",
        highlight=False,
        soft_wrap=True,
    )
    changed = done.params.get("changed") or {}
    if changed:
        console.print(
            "parameters changed: " + ", ".join(f"{k}={v}" for k, v in changed.items()), highlight=False
        )
    for key, value in _analysis_lines(done.params, done.summary, {}, with_params=False):
        console.print(f"{key}: {value}", highlight=False, soft_wrap=True)
    for warning in done.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    console.print(f"images: {done.out_dir}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add `scans` and `analyse` to the CLI, with the CLI's error handling."""
    app.add_typer(scans_app, name="scans")
    app.command(name="analyse")(user_errors(analyse))
