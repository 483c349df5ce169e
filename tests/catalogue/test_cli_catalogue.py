"""`stemstream scans` and `stemstream analyse` as a person runs them (real files, SQLite and PostgreSQL),
and every bad input as one `error:` line with a non-zero exit: each command in this process (typer's
CliRunner) with its own environment and a wide terminal, a few as real processes (the entry point)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from stemstream_testing.catalogue_scans import write_scan
from stemstream_testing.cli import Ran, as_process, in_process
from stemstream_testing.postgres import PostgresServer
from stemstream_testing.support import free_port

JAN = datetime(2026, 1, 15, 12, 0).timestamp()
MAR = datetime(2026, 3, 15, 12, 0).timestamp()


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The command's STEMSTREAM_ environment: its own output directory and an empty settings file."""
    config = tmp_path / "stemstream.toml"
    config.write_text("# empty\n")
    return {
        "STEMSTREAM_CONFIG": str(config),
        "STEMSTREAM_OUTPUT_DIR": str(tmp_path / "out"),
        "COLUMNS": "250",
        **extra,
    }


def stemstream(env: dict[str, str], *args: str) -> Ran:
    # In process; the tables' width comes from env's COLUMNS (the tests read whole paths from the tables)
    return in_process(list(args), env)


def stemstream_process(env: dict[str, str], *args: str) -> Ran:
    return as_process(list(args), env)


def _ok(env: dict[str, str], *args: str, process: bool = False) -> str:
    r = (stemstream_process if process else stemstream)(env, *args)
    assert r.returncode == 0, r.stderr + r.stdout
    return r.stdout


def _one_error_line(r: Ran, text: str) -> None:
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], r.stderr + r.stdout
    assert "Traceback" not in r.stdout + r.stderr


@pytest.fixture
def scans(tmp_path: Path) -> dict:
    """Two sessions' scans on disk: scan 1 twice in run-a (ids 1, 2; 8x8, January), scan 1 in run-b (id 1,
    16x8, March)."""
    a, b = tmp_path / "data" / "run-a", tmp_path / "data" / "run-b"
    return {
        "a1": write_scan(a, 1, 1, started=JAN, seed=1),
        "a1again": write_scan(a, 1, 2, started=JAN + 60, seed=2),
        "b1": write_scan(b, 1, 1, 16, 8, started=MAR, seed=3, dose=40.0),
    }


def test_list_search_show_note_analyse_on_sqlite(tmp_path: Path, scans: dict) -> None:
    env = _env(tmp_path)
    out = _ok(env, "scans", "rebuild", str(tmp_path / "data"), process=True)
    assert "3 scan(s) (3 new)" in out and "catalogue.sqlite" in out
    listed = _ok(env, "scans", process=True)
    assert "3 scan(s) in sqlite:///" in listed
    for r in scans.values():
        assert Path(r.path).name in listed and r.scan_uuid[:8] in listed
    b1, a2 = scans["b1"], scans["a1again"]
    assert [
        json.loads(line)["uid"] for line in _ok(env, "scans", "--shape", "16x8", "--json").splitlines()
    ] == [b1.scan_uuid]
    assert [
        json.loads(line)["uid"] for line in _ok(env, "scans", "--since", "2026-02-01", "--json").splitlines()
    ] == [b1.scan_uuid]
    until = _ok(env, "scans", "--until", "2026-01-15", "--json").splitlines()
    assert sorted(json.loads(line)["scan_id"] for line in until) == [1, 2]
    assert _ok(env, "scans", "--dose-min", "30", "--json").count("\n") == 1
    assert "1 scan(s)" in _ok(env, "scans", "--scan", "1", "--shape", "16x8")

    out = _ok(env, "scans", "note", Path(a2.path).name, "thin", "edge,", "good", "area", "--author", "mia")
    assert f"note added to scan {a2.scan_uuid[:8]}" in out and "1 note(s)" in out
    found = _ok(env, "scans", "--note", "EDGE")
    assert "1 scan(s)" in found and Path(a2.path).name in found and "thin edge, good area" in found

    shown = _ok(env, "scans", "show", a2.scan_uuid[:10])
    assert (
        a2.scan_uuid in shown and a2.path in shown and "8x8" in shown and "mia: thin edge, good area" in shown
    )
    data = json.loads(_ok(env, "scans", "show", "2", "--json"))  # id 2: unique
    assert data["uid"] == a2.scan_uuid and data["notes"][0]["text"] == "thin edge, good area"

    out = _ok(
        env, "analyse", Path(a2.path).name, "--param", "dpc_q_highpass=0.05", "--param", "parallax=false"
    )
    assert f"analysed scan {a2.scan_uuid[:8]}" in out and "1 analyses of this scan" not in out
    assert "parameters changed: dpc_q_highpass=0.05, parallax=False" in out
    out = _ok(
        env, "analyse", a2.scan_uuid, "--set", "analysis.keep_flyback=true", "--param", "parallax=false"
    )
    assert "2 analyses of this scan" in out and "analysis.keep_flyback=True" in out
    data = json.loads(_ok(env, "scans", "show", a2.scan_uuid, "--json"))
    first, second = data["analyses"]
    assert first["params"]["dpc_q_highpass"] == 0.05 and second["params"]["keep_flyback"] is True
    assert (
        second["results"]["scan_width"] == 8 and first["results"]["scan_width"] == 7
    )  # flyback kept / dropped
    images = {Path(p).parent for a in (first, second) for p in a["images"].values()}
    assert len(images) == 2  # each analysis in its own directory: nothing overwritten
    assert "analysis 2" in _ok(env, "scans", "show", a2.scan_uuid)


def test_bad_inputs_are_one_error_line(tmp_path: Path, scans: dict) -> None:
    env = _env(tmp_path)
    _one_error_line(stemstream_process(env, "scans"), "no scan catalogue at")  # nothing recorded yet
    _one_error_line(stemstream(env, "scans", "show", "abc"), "no scan catalogue at")
    _ok(env, "scans", "rebuild", str(tmp_path / "data"))
    _one_error_line(stemstream(env, "scans", "show", "nothing-like-it"), "no scan 'nothing-like-it'")
    _one_error_line(stemstream(env, "scans", "show", "1"), "2 scans match '1'")  # id 1 in both directories
    _one_error_line(stemstream(env, "scans", "note", "nothing-like-it", "hello"), "no scan 'nothing-like-it'")
    _one_error_line(stemstream(env, "scans", "note", "2", " "), "a note needs some text")
    _one_error_line(stemstream(env, "scans", "--since", "yesterday"), "not a date: 'yesterday'")
    _one_error_line(stemstream(env, "scans", "--shape", "8by8"), "shape must look like 64x64")
    _one_error_line(stemstream(env, "scans", "--status", "great"), "--status must be")
    _one_error_line(stemstream(env, "scans", "rebuild", str(tmp_path / "nowhere")), "is not a directory")
    _one_error_line(stemstream_process(env, "analyse", "nothing-like-it"), "no scan 'nothing-like-it'")
    _one_error_line(stemstream(env, "analyse", "2", "--param", "nope=1"), "unknown analysis parameter 'nope'")
    _one_error_line(stemstream(env, "analyse", "2", "--param", "dpc_q_highpass=high"), "wants a float")
    _one_error_line(stemstream(env, "analyse", "2", "--set", "analysis.keep_flyback=maybe"), "keep_flyback")
    Path(scans["b1"].path).rename(tmp_path / "moved.h5")
    _one_error_line(stemstream(env, "analyse", scans["b1"].scan_uuid), "is gone")
    port = free_port()  # nothing listens there
    down = _env(tmp_path, STEMSTREAM_CATALOGUE__URL=f"postgresql://stem:secret-pw@127.0.0.1:{port}/cat")
    for args in (("scans",), ("scans", "show", "2"), ("scans", "note", "2", "x"), ("analyse", "2")):
        r = stemstream(down, *args)
        _one_error_line(r, f"catalogue postgresql+psycopg://stem:***@127.0.0.1:{port}/cat is unreachable")
        assert "secret-pw" not in r.stderr + r.stdout
    bad_url = _env(tmp_path, STEMSTREAM_CATALOGUE__URL="not a url")
    _one_error_line(stemstream(bad_url, "scans"), "catalogue.url is not a database URL")


def test_the_commands_on_postgresql(tmp_path: Path, scans: dict, postgres: PostgresServer) -> None:
    url = postgres.create_database("cli")
    env = _env(tmp_path, STEMSTREAM_CATALOGUE__URL=url)
    assert "3 scan(s) (3 new)" in _ok(env, "scans", "rebuild", str(tmp_path / "data"))
    assert "0 new" in _ok(env, "scans", "rebuild", str(tmp_path / "data"))
    b1 = scans["b1"]
    _ok(env, "scans", "note", b1.scan_uuid[:8], "drift at the end")
    listed = _ok(env, "scans", "--note", "drift")
    assert "1 scan(s) in postgresql+psycopg://postgres@127.0.0.1" in listed and Path(b1.path).name in listed
    assert "16x8" in _ok(env, "scans", "show", Path(b1.path).name)
    assert not (tmp_path / "out" / "catalogue.sqlite").exists()
