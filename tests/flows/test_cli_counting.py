"""The counting CLI as a user runs it: real files, one-line errors. The commands run in this process (typer's
CliRunner); `simulate` (the module's raw scan) and one failing `count` run as real processes: the entry
point, the exit status and stderr as a shell sees them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from counting.sparse import read_counted_scan
from stemstream_testing.cli import Ran, as_process, in_process


def run(*args: str, cwd: Path | None = None, env: dict | None = None, process: bool = False) -> Ran:
    """`stemstream ARGS` with this environment's STEMSTREAM_ variables plus env."""
    given = {k: v for k, v in os.environ.items() if k.startswith("STEMSTREAM_")}
    full = {**given, "COLUMNS": "200", **(env or {})}
    return as_process(list(args), full, cwd=cwd) if process else in_process(list(args), full, cwd)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sim")
    r = run(
        "simulate",
        "--out",
        str(out),
        "--scan",
        "8x6",
        "--dose",
        "150",
        "--seed",
        "4",
        "--dark-frames",
        "20",
        process=True,
    )
    assert r.returncode == 0, r.stderr
    assert "48 frames" in r.stdout
    return out


def test_simulate_writes_raw_dark_and_truth(simulated):
    assert len(list(simulated.glob("data_scan0000000001_module*_dst0_file0.data"))) == 4
    assert np.load(simulated / "dark.npy").shape == (576, 576)
    truth = np.load(simulated / "truth.npz")
    assert len(truth["frame_numbers"]) == 48
    assert truth["electron_offsets"][-1] > 48 * 100


def test_count_estimated_then_info(simulated, tmp_path):
    out = tmp_path / "scan.h5"
    r = run("count", str(simulated), "--dark", str(simulated / "dark.npy"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "estimated" in r.stdout and "100.00 %" in r.stdout
    counted = read_counted_scan(out)
    assert (counted.scan.width, counted.scan.height, counted.num_frames) == (8, 6, 48)
    assert counted.metadata["electron_counting"]["threshold_calculated"]
    info = run("info", str(out))
    assert info.returncode == 0 and "8 x 6" in info.stdout and "background_threshold" in info.stdout


def test_count_fixed_thresholds_and_settings_from_env_and_toml(simulated, tmp_path):
    (tmp_path / "stemstream.toml").write_text("[counting]\nworkers = 1\nbatch_size = 5\n")
    out = tmp_path / "fixed.h5"
    r = run(
        "count",
        *map(str, sorted(simulated.glob("*.data"))),
        "--dark",
        str(simulated / "dark.npy"),
        "--out",
        str(out),
        "--background-threshold",
        "12",
        "--xray-threshold",
        "700",
        cwd=tmp_path,
        env={"STEMSTREAM_COUNTING__BATCH_SIZE": "7"},
    )
    assert r.returncode == 0, r.stderr
    ec = read_counted_scan(out).metadata["electron_counting"]
    assert (ec["background_threshold"], ec["x_ray_threshold"], ec["threshold_calculated"]) == (12, 700, False)


@pytest.mark.parametrize(
    "args,message",
    [
        (["count", "/nonexistent.data"], "nonexistent.data"),
        (["count", "{sim}", "--background-threshold", "5"], "give both"),
        (["count", "{sim}", "--dark", "{sim}/truth.npz"], "cannot read dark reference"),
        (["info", "/nonexistent.h5"], "no such file"),
        (["simulate", "--out", "{tmp}", "--scan", "8by8"], "scan size must look like"),
    ],
)
def test_bad_input_gives_one_clear_line_and_no_traceback(simulated, tmp_path, args, message):
    args = [a.format(sim=simulated, tmp=tmp_path) for a in args]
    r = run(*args, cwd=tmp_path)
    assert r.returncode != 0
    assert message in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_truncated_raw_file_is_named_with_its_offset(simulated, tmp_path):
    for src in simulated.glob("*.data"):
        data = src.read_bytes()
        (tmp_path / src.name).write_bytes(data[: len(data) - 1000] if "module2" in src.name else data)
    r = run("count", str(tmp_path), "--out", str(tmp_path / "x.h5"), process=True)
    assert r.returncode == 1
    assert "module2" in r.stderr and "byte" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.h5").exists()
