"""`stemstream microscope`: a written scan gets its microscope file's metadata (as a session adds it), its
stop record the link; every bad input (unknown scan, unreadable DM4, another scan's DM4, metadata already
there, nothing to find it with) is one error line and leaves the scan file as it was."""

from __future__ import annotations

from pathlib import Path

from counting.storage.durable import file_sha256
from stemstream_testing.cli import Ran, as_process, in_process
from streaming.protocol.record import ScanRecord, record_path
from tests.tasks.test_microscope import dm4_for, scan_file


def run(cwd: Path, *args: str, process: bool = False, **env: str) -> Ran:
    """`stemstream ARGS` in cwd with its own output directory and an empty settings file: in this process,
    or (process=True) as a real one."""
    clean = {"STEMSTREAM_OUTPUT_DIR": str(cwd / "out"), "STEMSTREAM_CONFIG": str(cwd / "none.toml"), **env}
    (cwd / "none.toml").write_text("")
    return (
        as_process(list(args), clean, cwd=cwd, timeout=120) if process else in_process(list(args), clean, cwd)
    )


def error_line(done: Ran) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def test_microscope_command_adds_and_shows_the_metadata(tmp_path: Path) -> None:
    h5 = scan_file(tmp_path, 17)
    dm4 = dm4_for(tmp_path / "m", 17)
    done = run(tmp_path, "microscope", str(h5), "--file", str(dm4), process=True)  # the entry point, once
    assert done.returncode == 0, done.stderr
    assert "microscope metadata from" in done.stdout and "convergence_semiangle_mrad: 24.5" in done.stdout
    record = ScanRecord.load(record_path(h5))
    assert record.extra["microscope"]["status"] == "attached" and record.sha256 == file_sha256(h5)
    shown = run(tmp_path, "microscope", str(h5), "--show")
    assert shown.returncode == 0 and "step_x_angstrom: 0.362" in shown.stdout and "HAADF: 8x8" in shown.stdout
    sha = file_sha256(h5)
    assert "nothing is replaced" in error_line(run(tmp_path, "microscope", str(h5), "--file", str(dm4)))
    assert file_sha256(h5) == sha
    # Found by microscope.dir/pattern, as in a session.
    h5b = scan_file(tmp_path, 18)
    dm4_for(tmp_path / "m", 18)
    found = run(tmp_path, "microscope", str(h5b), STEMSTREAM_MICROSCOPE__DIR=str(tmp_path / "m"))
    assert found.returncode == 0 and "scan18.dm4" in found.stdout, found.stderr


def test_microscope_command_bad_input_is_one_error_line(tmp_path: Path) -> None:
    h5 = scan_file(tmp_path, 20)
    sha = file_sha256(h5)
    (tmp_path / "bad.dm4").write_bytes(b"\x00\x00\x00\x04" + b"\x01" * 64)
    other = dm4_for(tmp_path / "m", 21)
    cases = [
        (["microscope", "nothere.h5"], "scan file nothere.h5 does not exist"),
        (["microscope", str(h5), "--file", str(tmp_path / "bad.dm4")], "cannot read DM4 file"),
        (["microscope", str(h5), "--file", str(tmp_path / "none.dm4")], "does not exist"),
        (["microscope", str(h5), "--file", str(other)], "scan21.dm4 is for scan 21, not 20"),
        (["microscope", str(h5)], "give --file, or set microscope.dir"),
    ]
    for args, message in cases:
        assert message in error_line(run(tmp_path, *args)), args
    assert "does not exist" in error_line(run(tmp_path, "microscope", "nothere.h5", process=True))
    missing = run(tmp_path, "microscope", str(h5), STEMSTREAM_MICROSCOPE__DIR=str(tmp_path / "m"))
    assert "no microscope file scan20.dm4" in error_line(missing)
    assert file_sha256(h5) == sha and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_microscope_command_updates_the_catalogue(tmp_path: Path) -> None:
    from catalogue import CatalogueSettings, ScanEntry, open_catalogue

    h5 = scan_file(tmp_path, 30)
    dm4 = dm4_for(tmp_path / "m", 30)
    (tmp_path / "out").mkdir()
    with open_catalogue(CatalogueSettings(), tmp_path / "out") as cat:
        cat.record_scan(ScanEntry.from_stop_record(record_path(h5), verified=True))
        cat.add_note(h5.name, "before the DM4 came")
    done = run(tmp_path, "microscope", str(h5), "--file", str(dm4))
    assert done.returncode == 0 and not done.stderr, done.stderr
    with open_catalogue(CatalogueSettings(), tmp_path / "out", create=False) as cat:
        scan = cat.find_scan(h5.name)
    assert scan.microscope_file == str(dm4) and scan.microscope_metadata["convergence_semiangle_mrad"] == 24.5
    assert scan.sha256 == file_sha256(h5) and scan.verified is True
    assert [n.text for n in scan.notes] == ["before the DM4 came"]
