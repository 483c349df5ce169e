"""`stemstream replay` as a user runs it: it prints the page's address, what the file lacks, progress and a
summary, and exits when done (--exit-when-done) or serves the page until Ctrl-C (a real process, its images
read over HTTP); a missing, unreadable, truncated or foreign file and a bad --rate are one `error:` line and
exit status 2."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import urllib.request
from pathlib import Path

import h5py
import numpy as np
import pytest

from counting.geometry import ScanShape
from counting.sparse import CountedScan, write_counted_scan
from stemstream_testing.cli import Ran, in_process
from stemstream_testing.support import CLI

pytestmark = pytest.mark.timeout(120)


def run(*args: str) -> Ran:
    """`stemstream ARGS` in this process, with this environment's STEMSTREAM_ variables."""
    given = {k: v for k, v in os.environ.items() if k.startswith("STEMSTREAM_")}
    return in_process(list(args), {**given, "COLUMNS": "200"})


def scan_file(path: Path) -> Path:
    """A 10x8 counted scan: position 2 without a frame, position 6's frame missing a sector."""
    rng = np.random.default_rng(3)
    events = np.empty((80, 1), object)
    for p in range(80):
        events[p, 0] = rng.integers(0, 576 * 576, 50 if p != 2 else 0).astype(np.uint32)
    masks = np.full((80, 1), 15, np.uint8)
    masks[2, 0], masks[6, 0] = 0, 0b1011
    return write_counted_scan(
        path, CountedScan(ScanShape(10, 8), events, masks, {"stemstream": {"scan_number": 7}})
    )


def test_replay_reports_and_exits_when_done(stemstream_env: Path, tmp_path: Path):
    path = scan_file(tmp_path / "scan_00007.h5")
    r = run("replay", str(path), "--rate", "2000", "--exit-when-done", "--port", "0")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert re.fullmatch(r"live: http://127\.0\.0\.1:\d+/", lines[0])
    assert lines[1] == (
        "scan: scan_00007.h5: 10x8, 79 frames; 1 positions without a frame, 1 incomplete frames, "
        "5 sectors lost"
    )
    assert any(line.startswith("replay: 79/79 frames (100 %)") for line in lines)
    assert lines[-1].startswith("replayed: 79 frames, 3950 events in ")
    assert not r.stderr


def bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    """Files replay must refuse, with what its error says."""
    good = scan_file(tmp / "good.h5")
    truncated = tmp / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp / "notes.txt"
    text.write_text("not a scan\n")
    with h5py.File(tmp / "other.h5", "w") as f:
        f.create_dataset("data", data=np.arange(4))
    with h5py.File(tmp / "shape.h5", "w") as f:
        f.attrs["version"] = 3
        f.create_dataset("electron_events/scan_positions", data=np.arange(6)).attrs.update(Nx=3, Ny=2)
        f.create_dataset("electron_events/frames", (7,), dtype=h5py.vlen_dtype(np.uint32))
    return {
        "missing": (tmp / "nowhere.h5", "no such file"),
        "directory": (tmp, "not a file"),
        "truncated": (
            truncated,
            f"truncated file ({good.stat().st_size // 2} of {good.stat().st_size} bytes)",
        ),
        "text": (text, "not an HDF5 file"),
        "foreign": (tmp / "other.h5", "not a counted scan (no /electron_events)"),
        "shape": (tmp / "shape.h5", "7 frame slots do not fit a 3x2 scan"),
    }


def test_bad_files_and_rates_are_one_line_and_exit_2(stemstream_env: Path, tmp_path: Path):
    for what, (path, says) in bad_files(tmp_path).items():
        r = run("replay", str(path), "--exit-when-done", "--port", "0")
        assert r.returncode == 2, (what, r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), (what, r.stderr)
        assert says in r.stderr and "live:" not in r.stdout, (what, r.stderr)
    good = tmp_path / "good.h5"
    for rate in ("-1", "abc", "nan", "inf"):
        r = run("replay", str(good), "--rate", rate, "--exit-when-done", "--port", "0")
        assert r.returncode == 2 and r.stderr.count("\n") == 1, (rate, r.stderr)
        assert r.stderr.startswith("error: --rate must be frames per second, 0 or more") and rate in r.stderr


def test_replay_serves_the_page_until_interrupted(stemstream_env: Path, tmp_path: Path):
    path = scan_file(tmp_path / "scan_00007.h5")
    proc = subprocess.Popen(
        [*CLI, "replay", str(path), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        lines = []
        while not lines or not lines[-1].startswith("replayed:"):
            line = proc.stdout.readline()
            assert line, f"replay ended early: {lines} {proc.stderr.read()}"
            lines.append(line.strip())
        url = lines[0].removeprefix("live: ")
        with urllib.request.urlopen(f"{url}api/state", timeout=10) as got:
            (scan,) = json.load(got)["scans"]
        assert scan["status"] == "done" and scan["file"] == str(path) and scan["scan_number"] == 7
        assert scan["frames"] == 79 and scan["sectors_lost"] == 5
        with urllib.request.urlopen(f"{url}api/scans/{scan['key']}/frames.json", timeout=10) as got:
            frames = np.array(json.load(got)["values"])
        assert frames.shape == (80,) and frames[2] == 0 and frames.sum() == 79
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(30) == 0
        assert not proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()
