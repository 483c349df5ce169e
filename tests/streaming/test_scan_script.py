"""Scan scripts: reading them (defaults, one-line errors) and playing them into a real aggregator and nodes,
from Python and from `stemstream send --script`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from counting.errors import PermanentError
from counting.kernel import Thresholds
from counting.pipeline import CountingOptions, count_batches
from counting.settings import SimulatorSettings
from counting.simulator import SimulatedCamera, SimulatorConfig, scan_seed
from counting.sparse import CountedScan, read_counted_scan
from stemstream_testing.options import options
from streaming.camera.script import ScanScript, ScriptedScan, ScriptError, load_script, play_script
from tests.streaming.harness import Session, start_session

pytestmark = pytest.mark.timeout(180)
FIXED = Thresholds(30.5, 600.0)
DEADLINE = (
    1.5  # the aggregator's scan_deadline in these sessions (generous: a busy 2-core machine stalls senders)
)
SIM = SimulatorSettings(scan_width=10, scan_height=6, dose=120.0, seed=9)


def _write(tmp_path: Path, data: object, name: str = "script.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _offline(config: SimulatorConfig, opts: CountingOptions) -> CountedScan:
    cam = SimulatedCamera(config)
    return count_batches(cam.iter_batches(64), cam.scan, None, opts)


def _assert_same_events(a: CountedScan, b: CountedScan) -> None:
    assert a.scan == b.scan and a.events.shape == b.events.shape
    for x, y in zip(a.events.ravel(), b.events.ravel(), strict=True):
        np.testing.assert_array_equal(x, y)


def _records(session: Session, n: int, timeout: float = 60.0) -> list[dict]:
    """The stop records of the first n scans written, in the order the scans came (scan id)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(session.output_dir.glob("FOURD_*.json"))
        if len(found) >= n:
            records = [json.loads(f.read_text()) | {"h5": f.with_suffix(".h5")} for f in found]
            return sorted(records, key=lambda r: r["scan_id"])
        time.sleep(0.05)
    raise AssertionError(f"{n} scans not written in {timeout} s")


# ------------------------------------------------------------------------------------------- reading
def test_load_script_reads_every_field_and_defaults_the_rest(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        {
            "scans": [
                {"width": 16, "height": 8, "scan_number": 1, "pause": 0.5, "seed": 3, "dose": 200},
                {},
                {"scan_number": 1, "dose": 0},
            ]
        },
    )
    script = load_script(path, SIM)
    assert script.scans == (
        ScriptedScan(16, 8, 1, 0.5, 3, 200.0),
        ScriptedScan(10, 6, 2, 0.0, scan_seed(9, 2), 120.0),  # the settings' shape and dose; its place
        ScriptedScan(10, 6, 1, 0.0, scan_seed(9, 3), 0.0),  # a reused number is another sample
    )
    assert (script.frames_per_position, script.flyback, script.detector_seed) == (1, True, 9)
    config = script.config(script.scans[0])
    assert config.scan.width == 16 and config.seed == 3 and config.dose == 200.0
    assert config.flyback and config.dark_seed == 9  # one detector: the settings' dark serves every scan
    assert isinstance(config.seed, int) and isinstance(script.scans[0].pause_before, float)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not JSON"),
        ([], 'expected {"scans": [ ... ]}'),
        ({"scans": [], "extra": 1}, 'expected {"scans": [ ... ]}'),
        ({"scans": []}, "holds no scans"),
        ({"scans": [5]}, "scans[0] must be an object"),
        ({"scans": [{"wdith": 4}]}, "scans[0] has unknown field 'wdith'"),
        ({"scans": [{}, {"width": 0}]}, "scans[1].width must be an integer in [1, 65535], got 0"),
        ({"scans": [{"height": 2.5}]}, "scans[0].height must be an integer"),
        ({"scans": [{"scan_number": -1}]}, "scans[0].scan_number must be an integer in [0, 4294967295]"),
        ({"scans": [{"seed": True}]}, "scans[0].seed must be an integer >= 0, got True"),
        ({"scans": [{"pause": -1}]}, "scans[0].pause must be a number >= 0"),
        ('{"scans": [{"pause": Infinity}]}', "scans[0].pause must be finite"),
        ({"scans": [{"dose": "high"}]}, "scans[0].dose must be a number in [0, 20000], got 'high'"),
        ({"scans": [{"width": 1}]}, "scans[0].width must be >= 2 with simulator.flyback"),
    ],
)
def test_bad_scripts_are_one_line_permanent_errors(tmp_path: Path, content: object, message: str) -> None:
    path = _write(tmp_path, content)
    with pytest.raises(ScriptError) as info:
        load_script(path, SIM)
    text = str(info.value)
    assert isinstance(info.value, PermanentError) and "\n" not in text
    assert message in text and str(path) in text


def test_missing_script_file(tmp_path: Path) -> None:
    with pytest.raises(ScriptError, match="cannot read scan script .*missing.json"):
        load_script(tmp_path / "missing.json", SIM)


def test_without_flyback_a_one_column_scan_is_fine(tmp_path: Path) -> None:
    script = load_script(
        _write(tmp_path, {"scans": [{"width": 1}]}), SIM.model_copy(update={"flyback": False})
    )
    assert script.scans[0].width == 1 and not script.config(script.scans[0]).flyback


# ------------------------------------------------------------------------------------------- playing
def test_a_script_plays_into_the_aggregator_one_file_per_scan_identical_to_offline(tmp_path: Path) -> None:
    """Three scans of different shapes, a pause, and scan number 1 again once the first scan 1 is over (a
    pause longer than the aggregator's scan deadline): three files, each what offline counting gives."""
    path = _write(
        tmp_path,
        {
            "scans": [
                {"width": 12, "height": 6, "scan_number": 1, "seed": 3, "dose": 150},
                {"width": 8, "height": 10, "scan_number": 2, "pause": 0.3, "dose": 80},
                {"width": 6, "height": 4, "scan_number": 1, "pause": DEADLINE + 0.5, "seed": 4},
            ]
        },
    )
    script = load_script(path, SIM)
    seen: list[int] = []
    session = start_session(tmp_path, 2, fixed=FIXED, scan_deadline=DEADLINE)
    try:
        t0 = time.monotonic()
        played = play_script(
            script,
            session.aggregator.receiver_endpoints,
            send_timeout=30,
            on_sent=lambda done: seen.append(done.scan.scan_number),
        )
        elapsed = time.monotonic() - t0
        records = _records(session, 3)
    finally:
        session.close()
    assert seen == [1, 2, 1] and elapsed >= 0.3 + DEADLINE + 0.5
    assert [p.scan for p in played] == list(script.scans)
    for done in played:
        frames = done.scan.width * done.scan.height
        assert [r.module for r in done.results] == [0, 1, 2, 3]
        assert done.sent == 4 * frames and done.overflowed == 0
    assert [(r["scan_number"], r["status"]) for r in records] == [
        (1, "complete"),
        (2, "complete"),
        (1, "complete"),
    ]
    for record, scan in zip(records, script.scans, strict=True):
        streamed = read_counted_scan(record["h5"])
        # The file keeps every column, the flyback included, as stempy's do.
        assert (streamed.scan.width, streamed.scan.height) == (scan.width, scan.height)
        _assert_same_events(streamed, _offline(script.config(scan), options(fixed=FIXED)))
    assert session.aggregator.stats.late == 0


def test_stemstream_send_script_prints_one_line_per_scan(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        {
            "scans": [
                {"width": 6, "height": 4, "scan_number": 5, "seed": 1},
                {"width": 4, "height": 4, "scan_number": 6, "pause": 0.1, "dose": 50},
            ]
        },
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEMSTREAM_")}
    env["STEMSTREAM_SIMULATOR__DOSE"] = "90"  # the script's defaults come from the settings
    cli = [sys.executable, "-m", "flows.cli", "send"]
    repo = Path(__file__).resolve().parents[2]
    session = start_session(tmp_path, 2, fixed=FIXED, scan_deadline=DEADLINE)
    try:
        address = session.aggregator.receiver_endpoints[0]
        run = subprocess.run(
            [*cli, "--aggregator", address, "--script", str(path)],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        records = _records(session, 2)
        both = subprocess.run(
            [*cli, "--aggregator", address, "--script", str(path), "--simulate", "4x4"],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        session.close()
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[0] == "scan 5: 6x4, seed 1, dose 90, after 0 s: sent 96 sectors"
    assert lines[1] == f"scan 6: 4x4, seed {scan_seed(0, 2)}, dose 50, after 0.1 s: sent 64 sectors"
    assert lines[2] == f"played 2 scans from {path}" and len(lines) == 3
    assert [(r["scan_number"], r["status"]) for r in records] == [(5, "complete"), (6, "complete")]
    assert both.returncode != 0
    error = " ".join(re.sub("[│╭╮╰╯─]", " ", both.stderr).split())  # typer's error panel, unwrapped
    assert "give one of --raw FILES, --simulate WIDTHxHEIGHT or --script FILE" in error


def test_play_script_realtime_needs_a_rate() -> None:
    script = ScanScript((ScriptedScan(4, 4, 1, 0.0, 0, 10.0),), 1, True, 0)
    with pytest.raises(ValueError, match="realtime needs a rate"):
        play_script(script, ["tcp://127.0.0.1:1"], realtime=True)
