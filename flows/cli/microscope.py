"""`stemstream microscope`: add the microscope's file (DM4 or JSON sidecar) to a written scan, as a session
does before verification (tasks/microscope.py), e.g. for a scan whose DM4 came late; or show what a scan
file holds. The stop record and the catalogue get the link."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from flows.cli.common import command_settings, user_errors


def microscope(
    ctx: typer.Context,
    scan: Annotated[Path, typer.Argument(help="a counted scan's HDF5 file")],
    file: Annotated[
        Path | None,
        typer.Option(
            "--file", help="the microscope's file (DM4 or .json); default: found by microscope.dir/pattern"
        ),
    ] = None,
    show: Annotated[bool, typer.Option("--show", help="only show the scan's microscope metadata")] = False,
) -> None:
    """Add the microscope's metadata (tags, calibrations, HAADF) to a written scan, or show it."""
    from counting.microscope_meta import attach_microscope
    from streaming.protocol.record import ScanRecord, record_path
    from tasks.microscope import (
        MicroscopeLink,
        attach_with_record,
        find_microscope_file,
        read_microscope_file,
    )

    if not scan.is_file():
        raise FileNotFoundError(f"scan file {scan} does not exist")
    settings = command_settings(ctx)
    if show:
        _show(scan)
        return
    rec_path = record_path(scan)
    record = ScanRecord.load(rec_path) if rec_path.is_file() else None
    if file is None:
        if settings.microscope.dir is None:
            raise ValueError("give --file, or set microscope.dir to find the scan's microscope file")
        if record is None:
            raise ValueError(f"{scan.name} has no stop record: give the microscope's file with --file")
        file, reason = find_microscope_file(settings.microscope, record.scan_number, record.last_data_time)
        if file is None:
            raise FileNotFoundError(reason)
    meta = read_microscope_file(file, settings.microscope)  # one clear line if unreadable
    if record is not None and meta.scan_number is not None and meta.scan_number != record.scan_number:
        raise ValueError(f"{file.name} is for scan {meta.scan_number}, not {record.scan_number}")
    link = MicroscopeLink("attached", str(file.resolve()), None, meta.summary())
    if record is not None:  # file and stop record never out of step (MicroscopeMetadataError: one line)
        if not attach_with_record(scan, meta, record, link):
            typer.echo(
                f"warning: {rec_path.name} not updated yet (staged; verification settles it)", err=True
            )
    else:
        attach_microscope(scan, meta, None)
    typer.echo(f"{scan.name}: microscope metadata from {file}")
    for key, value in meta.summary().items():
        typer.echo(f"  {key}: {value}")
    if record is not None and settings.catalogue.enabled:
        _catalogue(settings, scan, rec_path)


def _show(scan: Path) -> None:
    """Print a scan's microscope metadata (or that it has none)."""
    from counting.microscope_meta import read_microscope

    try:
        attrs, haadf = read_microscope(scan)
    except OSError as exc:
        raise ValueError(f"{scan}: not a readable HDF5 file ({exc})") from None
    if not attrs:
        typer.echo(f"{scan.name}: no microscope metadata")
        return
    for key in sorted(k for k in attrs if k != "tags"):
        typer.echo(f"{key}: {attrs[key]}")
    typer.echo(f"HAADF: {'x'.join(map(str, haadf.shape)) if haadf is not None else 'none'}")


def _catalogue(settings: Any, scan: Path, rec_path: Path) -> None:
    """Update the scan in the catalogue from its stop record (new checksum, microscope link), when it is
    there; a warning line otherwise (the stop record holds it for `stemstream scans rebuild`)."""
    try:
        from catalogue import ScanEntry, open_catalogue

        with open_catalogue(settings.catalogue, settings.output_dir, create=False) as cat:
            cat.find_scan(str(scan.resolve()))  # only a scan the catalogue has: ScanNotFound otherwise
            cat.record_scan(ScanEntry.from_stop_record(rec_path))  # session, notes, analyses are kept
    except Exception as exc:  # not catalogued, no database: the stop record holds the link for a rebuild
        typer.echo(
            f"warning: catalogue not updated: {str(exc).splitlines()[0] if str(exc) else exc!r}", err=True
        )


def register(app: typer.Typer) -> None:
    """Add `stemstream microscope` to the CLI, with the CLI's error handling."""
    app.command(name="microscope")(user_errors(microscope))
